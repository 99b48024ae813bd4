"""The default mode: inference and training-step images/s, CPU time, peak memory and achieved TFLOP/s of each
--cfgs entry at each --img-size; with --reference against the official model, with --alternate in turns.
Also ``--check``: the arguments alone, nothing built on a device or timed."""
from __future__ import annotations

import os
import statistics
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from errors import ConfigError
from tools.bench import official
from tools.bench.configs import TimmSpec, build, check_timm, count_flops, load_cfg, num_classes
from tools.bench.environment import device_peak_tflops
from tools.bench import timing

def row_opts(args, img_size: int, classes: int) -> Dict[str, Any]:
    """The options of one measure (:func:`tools.bench.timing.measure`); ``classes``: the model's class count,
    the range of the training step's random targets."""
    from optimizer import FUSED_DEVICES       # our trainer's rule for the fused AdamW
    return {'device': args.device, 'batch': args.batch, 'img_size': img_size, 'dtype': args.dtype,
            'channels_last': args.channels_last, 'compile': args.compile, 'warmup': args.warmup,
            'repeats': args.repeats, 'num_classes': classes,
            'fused_optimizer': torch.device(args.device).type in FUSED_DEVICES}


def _achieved(flops: Optional[float], img_s: float, mode: str, peak: Optional[float]) -> Dict[str, Any]:
    if flops is None:
        return {'tflops': None, 'peak_fraction': None}
    tflops = 2 * flops * (3 if mode == 'train' else 1) * img_s / 1e12
    return {'tflops': tflops, 'peak_fraction': tflops / peak if peak else None}


def check_args(args) -> int:
    """``--check``: every config loads (every timm model builds with its keywords, on the meta device), the
    --reference checkout has each of them; nothing is built on a device or timed. Returns the number of model
    configurations checked."""
    n = 0
    for cfg_path in args.cfgs:
        for size in args.img_size or [None]:
            config = load_cfg(cfg_path, size, args.opts)
            if isinstance(config, TimmSpec):
                check_timm(config)
            elif args.reference:
                official.official_cfg_name(args.reference, cfg_path)
            n += 1
    print(f'arguments ok: {n} model configuration(s), nothing measured (--check)')
    return n


def run_models(args) -> List[Dict[str, Any]]:
    """One row per (config, resolution, mode). With --reference, ours and the official model alternate for
    ``--rounds``; with --alternate, every model of the run takes its turn in each of ``--rounds`` rounds (each
    rebuilt from the same seed per turn, so only one is resident and its peak memory is its own)."""
    device = torch.device(args.device)
    peak = device_peak_tflops(device, args.dtype)
    entries: List[Dict[str, Any]] = []
    try:
        for cfg_path in args.cfgs:
            for size in args.img_size or [None]:
                config = load_cfg(cfg_path, size, args.opts)
                model = build(config)
                opts = row_opts(args, config.DATA.IMG_SIZE, num_classes(model, config))
                if opts['num_classes'] < 1 and 'train' in args.modes:
                    raise ConfigError(f'--cfgs {cfg_path}: the model has no classifier (0 classes); a training '
                                      f'step needs one: set its class count, or --modes infer')
                e = {'cfg_path': cfg_path, 'config': config, 'opts': opts, 'official': None,
                     'flops': count_flops(model, config.DATA.IMG_SIZE) if args.flops else None,
                     'official_opts': dict(opts, dtype=args.reference_dtype or args.dtype,
                                           fused_optimizer=opts['fused_optimizer'] and args.same_optimizer),
                     'rounds': {'ours': [], 'official': []}}
                entries.append(e)
                if args.reference and not isinstance(config, TimmSpec):
                    e['official'] = official.OfficialProcess(args.reference, cfg_path, model, e['official_opts'])
                if not args.alternate:                   # all of this model's rounds now, then free it
                    _measure_rounds(e, model, args.rounds if e['official'] else 1, args.modes)
                    if e['official']:
                        e['official'].close()
                        e['official'] = None
                del model
        if args.alternate:
            for _ in range(args.rounds):
                for e in entries:
                    _measure_rounds(e, build(e['config']), 1, args.modes)
    finally:
        for e in entries:
            if e['official']:
                e['official'].close()
    return [_model_row(args, e, mode, peak) for e in entries for mode in args.modes]


def _measure_rounds(e: Dict[str, Any], model: nn.Module, rounds: int, modes: Sequence[str]) -> None:
    for _ in range(rounds):
        e['rounds']['ours'].append(timing.measure(model, e['opts'], modes))
        if e['official']:
            e['rounds']['official'].append(e['official'].measure(modes))


def _model_row(args, e: Dict[str, Any], mode: str, peak: Optional[float]) -> Dict[str, Any]:
    flops = e['flops']
    row = {'cfg': os.path.basename(e['cfg_path']), 'mode': mode, 'img_size': e['opts']['img_size'],
           'batch': args.batch, 'dtype': args.dtype, 'channels_last': args.channels_last, 'compile': args.compile,
           'gflops_per_img': None if flops is None else flops / 1e9}
    for side, results in e['rounds'].items():
        if not results:
            continue
        per = [r[mode] for r in results]
        img_s = statistics.median(p['img_s'] for p in per)
        fused = e['opts' if side == 'ours' else 'official_opts']['fused_optimizer']
        row[side] = {'img_s': img_s, 'img_s_rounds': [p['img_s'] for p in per],
                     'adamw': None if mode == 'infer' else 'fused' if fused else 'torch default',
                     'cpu_ms_per_img': 1e3 * statistics.median(p['cpu_s_per_img'] for p in per),
                     'peak_mb': max(p['peak_mb'] for p in per),
                     **_achieved(flops, img_s, mode, peak)}
    if e['rounds']['official']:
        o, r = row['ours'], row['official']
        row['ratio'] = o['img_s'] / r['img_s']
        row['ratio_rounds'] = [a / b for a, b in zip(o['img_s_rounds'], r['img_s_rounds'])]
        row['cpu_ratio'] = r['cpu_ms_per_img'] / o['cpu_ms_per_img']
    return row


def print_models(rows: List[Dict[str, Any]]) -> None:
    ref = any('official' in r for r in rows)
    alternated = not ref and any(len(r['ours']['img_s_rounds']) > 1 for r in rows)
    head = ['config', 'mode', 'res', 'batch', 'dtype', 'GFLOPs/img', 'ours img/s', 'ours CPU ms/img',
            'ours peak MiB', 'TFLOP/s', 'of peak'] + (['per-round img/s'] if alternated else [])
    if ref:
        head += ['official img/s', 'official peak MiB', 'ratio (median of rounds)', 'per-round ratios',
                 'CPU-time ratio']
    print('| ' + ' | '.join(head) + ' |')
    print('|' + '---|' * len(head))
    fmt = lambda v, f='{:.1f}': 'n/a' if v is None else f.format(v)   # noqa: E731
    for r in rows:
        o = r['ours']
        cells = [r['cfg'], r['mode'], str(r['img_size']), str(r['batch']),
                 r['dtype'] + (' CL' if r['channels_last'] else '') + (' compiled' if r['compile'] else ''),
                 fmt(r['gflops_per_img'], '{:.3f}'), fmt(o['img_s']), fmt(o['cpu_ms_per_img']),
                 fmt(o['peak_mb'], '{:.0f}'), fmt(o['tflops'], '{:.3f}'), fmt(o['peak_fraction'], '{:.1%}')]
        if alternated:
            cells.append(' '.join(f'{x:.1f}' for x in o['img_s_rounds']))
        if ref:
            f = r.get('official', {})
            cells += [fmt(f.get('img_s')), fmt(f.get('peak_mb'), '{:.0f}'), fmt(r.get('ratio'), '{:.2f}x'),
                      ' '.join(f'{x:.2f}' for x in r.get('ratio_rounds', [])), fmt(r.get('cpu_ratio'), '{:.2f}x')]
        print('| ' + ' | '.join(cells) + ' |')
    train = next((r for r in rows if r['mode'] == 'train'), None)
    if train:
        print(f"\nAdamW in the training step: ours {train['ours']['adamw']}"
              + (f", official {train['official']['adamw']}" if 'official' in train else ''))
