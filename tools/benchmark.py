"""Speed and memory benchmark: inference and training-step images/s, peak memory, FLOPs, against the official
code, over resolutions, and of the input pipeline alone.

    python tools/benchmark.py --cfgs cfgs/flatten_swin_t.yaml cfgs/swin_t.yaml --batch 8
    python tools/benchmark.py --cfgs cfgs/flatten_swin_t.yaml --reference /path/to/FLatten-Transformer --rounds 7
    python tools/benchmark.py --sweep-resolution --cfgs cfgs/flatten_pvt_t.yaml cfgs/pvt_t.yaml
    python tools/benchmark.py --data /path/to/imagenet --cfgs cfgs/flatten_swin_t.yaml --workers 8
    python tools/benchmark.py --smoke                      # CI-sized: tiny model, one timed repeat

Method: models come from ``models.build_model(load_config(cfg, opts))`` (random weights). Each measure runs
``--warmup`` untimed calls, then ``--repeats`` timed calls (CUDA synchronised before and after each), and
reports the median. Inference is ``model(x)`` under ``torch.no_grad``; a training step is forward,
cross-entropy on random labels, backward and an AdamW step as each codebase's trainer builds it: ours fused
wherever torch has a fused kernel (optimizer.py: CUDA and CPU), the official code's plain ``AdamW`` (its
optimizer.py: torch's default, for-each on CUDA, a per-tensor loop on CPU); ``--same-optimizer`` gives the
official side ours, for a model-only ratio. ``--dtype`` runs both under
autocast. Peak memory is CUDA's max_memory_allocated, or on CPU the process's peak resident set (VmHWM,
reset before each measure where Linux allows). FLOPs are fvcore counts at batch 1 (one multiply-add = one
FLOP, the convention of the published numbers); achieved TFLOP/s counts 2 FLOPs per multiply-add and a
training step as 3x the forward, and is compared with the device's dense peak where it is known.

``--reference DIR`` imports the official code from a user's checkout of an official repository in the
Swin-Transformer codebase layout (``config.py`` with ``_C``, ``models.build_model``, ``cfgs/<same name>.yaml``;
e.g. LeapLabTHU/FLatten-Transformer) in a subprocess (never copied here), loads OUR random weights into it
(strict), and alternates rounds: ours, official, ours, ... Each round is one full measure (warm-up +
repeats) on each side; the table gives the median over rounds and the ratio ours/official (images/s;
> 1 means ours is faster).

Numbers depend on the machine and its load: the JSON records device, torch version, thread count, load
average, date and git commit. Speed targets live in BENCHMARKS.md, never in tests.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import io
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense peak TFLOP/s (no sparsity) by device-name substring: {dtype: peak}. Vendor datasheet figures.
DEVICE_PEAKS = {
    'H200': {'float32': 67.0, 'tf32': 494.7, 'bfloat16': 989.4, 'float16': 989.4},
    'H100 SXM': {'float32': 67.0, 'tf32': 494.7, 'bfloat16': 989.4, 'float16': 989.4},
    'H100 PCIe': {'float32': 51.2, 'tf32': 378.0, 'bfloat16': 756.0, 'float16': 756.0},
    'H100': {'float32': 67.0, 'tf32': 494.7, 'bfloat16': 989.4, 'float16': 989.4},
    'A100': {'float32': 19.5, 'tf32': 156.0, 'bfloat16': 312.0, 'float16': 312.0},
    'A800': {'float32': 19.5, 'tf32': 156.0, 'bfloat16': 312.0, 'float16': 312.0},
    'L40S': {'float32': 91.6, 'tf32': 183.0, 'bfloat16': 362.0, 'float16': 362.0},
    'RTX 4090': {'float32': 82.6, 'tf32': 82.6, 'bfloat16': 165.2, 'float16': 165.2},
    'V100': {'float32': 15.7, 'tf32': 15.7, 'bfloat16': 0.0, 'float16': 125.0},
}
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


# ----------------------------------------------------------------------------- measurement (model-agnostic)
def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA allocator stats, or the process's VmHWM on Linux)."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak since :func:`reset_peak_memory`: CUDA max allocated, or the peak RSS of this process (MiB)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> Dict[str, float]:
    """Median wall and process-CPU seconds of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    wall, cpu = [], []
    for _ in range(repeats):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {'wall_s': statistics.median(wall), 'cpu_s': statistics.median(cpu), 'wall_all_s': wall}


def _autocast(device: torch.device, dtype: str):
    if dtype == 'float32':
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def make_input(batch: int, img_size: int, device: torch.device, channels_last: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size, generator=g).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def measure_inference(model: nn.Module, x: torch.Tensor, dtype: str, warmup: int, repeats: int) -> Dict[str, float]:
    device = x.device
    model.eval()

    def step():
        # no_grad rather than inference_mode: models that cache tensors (e.g. index plans of a fast path) must
        # stay usable for the training measure that follows
        with torch.no_grad(), _autocast(device, dtype):
            model(x)

    step()                                   # first call outside the peak window (lazy init, compile)
    reset_peak_memory(device)
    res = time_calls(step, device, warmup, repeats)
    res['peak_mb'] = peak_memory_mb(device)
    res['img_s'] = x.shape[0] / res['wall_s']
    res['cpu_s_per_img'] = res['cpu_s'] / x.shape[0]
    return res


def measure_train(model: nn.Module, x: torch.Tensor, num_classes: int, dtype: str, warmup: int,
                  repeats: int, fused: bool = False) -> Dict[str, float]:
    """Forward + cross-entropy + backward + AdamW step; float16 uses a GradScaler. ``fused``: the fused AdamW
    kernel (what our optimizer.py builds where the device has one), else torch's default implementation."""
    device = x.device
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, **({'fused': True} if fused else {}))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == 'float16')
    target = torch.randint(0, num_classes, (x.shape[0],), generator=torch.Generator().manual_seed(0)).to(device)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss = loss_fn(model(x), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    step()
    reset_peak_memory(device)
    res = time_calls(step, device, warmup, repeats)
    res['peak_mb'] = peak_memory_mb(device)
    res['img_s'] = x.shape[0] / res['wall_s']
    res['cpu_s_per_img'] = res['cpu_s'] / x.shape[0]
    return res


def measure(model: nn.Module, opts: Dict[str, Any], modes: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """The measures of one model on one side; ``opts``: device, batch, img_size, dtype, channels_last,
    compile, warmup, repeats, num_classes, fused_optimizer."""
    device = torch.device(opts['device'])
    model = model.to(device)
    if opts['channels_last']:
        model = model.to(memory_format=torch.channels_last)
    run = torch.compile(model) if opts['compile'] else model
    x = make_input(opts['batch'], opts['img_size'], device, opts['channels_last'])
    out = {}
    if 'infer' in modes:
        out['infer'] = measure_inference(run, x, opts['dtype'], opts['warmup'], opts['repeats'])
    if 'train' in modes:
        out['train'] = measure_train(run, x, opts['num_classes'], opts['dtype'], opts['warmup'], opts['repeats'],
                                     opts['fused_optimizer'])
    return out


# ----------------------------------------------------------------------------- our models
class TimmSpec:
    """``timm:<name>[,key=value...]`` in --cfgs: a model straight from timm, e.g.
    ``timm:swin_tiny_patch4_window7_224`` or ``timm:pvt_v2_b0,sr_ratios=(1,1,1,1)`` (global softmax keys);
    each value is a Python literal passed to ``timm.create_model``."""

    def __init__(self, spec: str, img_size: Optional[int]) -> None:
        self.name, self.kwargs = parse_timm_spec(spec)
        self.DATA = argparse.Namespace(IMG_SIZE=img_size or 224)
        self.MODEL = argparse.Namespace(NUM_CLASSES=1000)


def parse_timm_spec(spec: str) -> Tuple[str, Dict[str, Any]]:
    """'name,key=literal,...' -> (name, kwargs); commas inside brackets belong to the value."""
    parts, depth, cur = [], 0, ''
    for ch in spec:
        depth += ch in '([{'
        depth -= ch in ')]}'
        if ch == ',' and depth == 0:
            parts.append(cur)
            cur = ''
        else:
            cur += ch
    parts.append(cur)
    kwargs = {}
    for item in parts[1:]:
        key, sep, value = item.partition('=')
        try:
            if not sep:
                raise ValueError
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise SystemExit(f"--cfgs timm:{spec}: '{item}' is not key=<python literal>; "
                             "e.g. timm:pvt_v2_b0,sr_ratios=(1,1,1,1)") from None
    return parts[0], kwargs


def load_cfg(path: str, img_size: Optional[int] = None, opts: Sequence[str] = ()):
    if path.startswith('timm:'):
        return TimmSpec(path[len('timm:'):], img_size)
    sys.path.insert(0, ROOT)
    from config import load_config
    from errors import ConfigError
    extra = list(opts) + (['DATA.IMG_SIZE', str(img_size)] if img_size else [])
    try:
        return load_config(path, opts=extra)
    except ConfigError as e:                     # a missing file or a wrong key: one line, not a traceback
        raise SystemExit(f'--cfgs {path}: {e}') from None


def build(config) -> nn.Module:
    torch.manual_seed(0)
    if isinstance(config, TimmSpec):
        import timm
        try:
            return timm.create_model(config.name, img_size=config.DATA.IMG_SIZE, **config.kwargs)
        except TypeError:                        # models without an img_size argument (CNNs)
            return timm.create_model(config.name, **config.kwargs)
    from models import build_model
    return build_model(config)


def count_flops(model: nn.Module, img_size: int) -> Optional[float]:
    """fvcore multiply-adds of one image, counted as ``tools/model_stats.py`` counts them (the one counting
    rule: the op handles model modules declare, explicit attention formulas), or None
    without fvcore or when tracing fails."""
    try:
        import fvcore  # noqa: F401
    except ImportError:
        return None
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from model_stats import count_flops as fvcore_flops
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return float(fvcore_flops(model, img_size))
    except Exception as err:                      # tracing can fail on exotic ops: report n/a, keep timing
        logging.getLogger(__name__).warning('fvcore could not count FLOPs (%s: %s); reporting n/a',
                                            type(err).__name__, err)
        return None


def device_peak_tflops(device: torch.device, dtype: str) -> Optional[float]:
    """Dense peak of the device for the math the dtype selects (float32 -> TF32 when it is allowed)."""
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in DEVICE_PEAKS.items():
        if key in name:
            if dtype == 'float32' and torch.backends.cuda.matmul.allow_tf32:
                return peaks['tf32']
            return peaks[dtype] or None
    return None


def environment(device: torch.device) -> Dict[str, Any]:
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else (platform.processor() or
                                                                             platform.machine())
    if device.type == 'cpu':
        try:
            with open('/proc/cpuinfo') as f:
                name = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
        except (OSError, StopIteration):
            pass
    from models.focused_attention import get_attention_impl
    return {'device': str(device), 'device_name': name, 'torch': torch.__version__,
            'threads': torch.get_num_threads(), 'cpu_count': os.cpu_count(),
            'loadavg_start': list(os.getloadavg()) if hasattr(os, 'getloadavg') else None,
            'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'git_commit': commit, 'git_dirty': dirty, 'python': platform.python_version(),
            'attention_impl': get_attention_impl()}


# ----------------------------------------------------------------------------- the official code (subprocess)
WORKER_FLAG = '--official-worker'


def _install_timm_shims() -> None:
    """Old timm import paths the official code uses, aliased to timm 1.x modules when they are missing."""
    import importlib
    import timm
    for old, new in (('timm.models.layers', 'timm.layers'), ('timm.models.registry', 'timm.models'),
                     ('timm.models.helpers', 'timm.models')):
        try:
            importlib.import_module(old)
        except ImportError:
            sys.modules[old] = importlib.import_module(new)
    _ = timm


def build_official(ref_dir: str, cfg_name: str, img_size: int, num_classes: int) -> nn.Module:
    """The official model for ``cfg_name`` (a file of DIR/cfgs), built with the official config and builder."""
    sys.path.insert(0, ref_dir)
    _install_timm_shims()
    import config as official_config          # DIR/config.py
    from models import build_model as official_build
    cfg = official_config._C.clone()
    cfg.defrost()
    cfg.merge_from_file(os.path.join(ref_dir, 'cfgs', cfg_name))
    cfg.DATA.IMG_SIZE = img_size
    cfg.MODEL.NUM_CLASSES = num_classes
    cfg.freeze()
    return official_build(cfg)


def official_worker(argv: List[str]) -> None:
    """Subprocess side of ``--reference``: build, load weights, then answer 'measure' lines on stdin."""
    spec = json.loads(argv[0])
    proto = os.fdopen(os.dup(1), 'w')
    sys.stdout = sys.stderr                   # the official code prints while building
    torch.set_num_threads(spec['threads'])
    with contextlib.redirect_stdout(io.StringIO()):
        model = build_official(spec['ref_dir'], spec['cfg_name'], spec['opts']['img_size'],
                               spec['opts']['num_classes'])
        model.load_state_dict(torch.load(spec['weights'], map_location='cpu', weights_only=True), strict=True)
    proto.write(json.dumps({'ready': True}) + '\n')
    proto.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get('quit'):
            break
        with contextlib.redirect_stdout(io.StringIO()):
            res = measure(model, spec['opts'], cmd['modes'])
        proto.write(json.dumps(res) + '\n')
        proto.flush()


def official_cfg_name(ref_dir: str, cfg_path: str) -> str:
    """The official config of the same name as ours; a one-line error when the checkout lacks it."""
    cfg_name = os.path.basename(cfg_path)
    if not os.path.isfile(os.path.join(ref_dir, 'cfgs', cfg_name)):
        raise SystemExit(f'--reference {ref_dir}: no cfgs/{cfg_name} there; pass the root of the official '
                         f'checkout (e.g. LeapLabTHU/FLatten-Transformer) and a config it ships')
    return cfg_name


class OfficialProcess:
    """The official model in a subprocess that measures on request (so rounds alternate)."""

    def __init__(self, ref_dir: str, cfg_path: str, model: nn.Module, opts: Dict[str, Any]) -> None:
        cfg_name = official_cfg_name(ref_dir, cfg_path)
        self.tmp = tempfile.TemporaryDirectory()
        weights = os.path.join(self.tmp.name, 'weights.pth')
        torch.save(model.state_dict(), weights)
        spec = {'ref_dir': os.path.abspath(ref_dir), 'cfg_name': cfg_name, 'weights': weights, 'opts': opts,
                'device': opts['device'], 'threads': torch.get_num_threads()}
        # the official checkout's config.py / models/ must win over ours: drop this repository from the path,
        # keep the rest (a --target site of carried wheels, say)
        keep = [d for d in os.environ.get('PYTHONPATH', '').split(os.pathsep)
                if d and os.path.realpath(d) != os.path.realpath(ROOT)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(keep))
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), WORKER_FLAG, json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=self.tmp.name)
        ready = self.proc.stdout.readline()
        if not ready:
            raise SystemExit('--reference: the official model failed to build or load our weights '
                             '(its error is printed above)')

    def measure(self, modes: Sequence[str]) -> Dict[str, Dict[str, float]]:
        self.proc.stdin.write(json.dumps({'modes': list(modes)}) + '\n')
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit('--reference: the official worker died (see its error above)')
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write(json.dumps({'quit': True}) + '\n')
            self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.tmp.cleanup()


# ----------------------------------------------------------------------------- modes
def _row_opts(args, config, img_size: int) -> Dict[str, Any]:
    from optimizer import FUSED_DEVICES       # our trainer's rule for the fused AdamW
    return {'device': args.device, 'batch': args.batch, 'img_size': img_size, 'dtype': args.dtype,
            'channels_last': args.channels_last, 'compile': args.compile, 'warmup': args.warmup,
            'repeats': args.repeats, 'num_classes': config.MODEL.NUM_CLASSES,
            'fused_optimizer': torch.device(args.device).type in FUSED_DEVICES}


def _achieved(flops: Optional[float], img_s: float, mode: str, peak: Optional[float]) -> Dict[str, Any]:
    if flops is None:
        return {'tflops': None, 'peak_fraction': None}
    tflops = 2 * flops * (3 if mode == 'train' else 1) * img_s / 1e12
    return {'tflops': tflops, 'peak_fraction': tflops / peak if peak else None}


def check_args(args) -> int:
    """``--check``: every config loads (every timm name exists), the --reference checkout has each of them;
    nothing is built or timed. Returns the number of model configurations checked."""
    import timm
    n = 0
    for cfg_path in args.cfgs:
        for size in args.img_size or [None]:
            config = load_cfg(cfg_path, size, args.opts)
            if isinstance(config, TimmSpec) and not timm.is_model(config.name):
                raise SystemExit(f'--cfgs timm:{config.name}: timm has no such model (see timm.list_models())')
            if args.reference and not isinstance(config, TimmSpec):
                official_cfg_name(args.reference, cfg_path)
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
                opts = _row_opts(args, config, config.DATA.IMG_SIZE)
                e = {'cfg_path': cfg_path, 'config': config, 'opts': opts, 'official': None,
                     'flops': count_flops(model, config.DATA.IMG_SIZE) if args.flops else None,
                     'official_opts': dict(opts, dtype=args.reference_dtype or args.dtype,
                                           fused_optimizer=opts['fused_optimizer'] and args.same_optimizer),
                     'rounds': {'ours': [], 'official': []}}
                entries.append(e)
                if args.reference and not isinstance(config, TimmSpec):
                    e['official'] = OfficialProcess(args.reference, cfg_path, model, e['official_opts'])
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
        e['rounds']['ours'].append(measure(model, e['opts'], modes))
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


def run_sweep(args) -> List[Dict[str, Any]]:
    """Time and memory per image vs token count for each config, from the base size up to 4x the pixels."""
    rows = []
    for cfg_path in args.cfgs:
        base = load_cfg(cfg_path, None, args.opts).DATA.IMG_SIZE
        sizes = args.img_size or [base, int(round(base * 2 ** 0.5 / 32)) * 32, 2 * base]
        for size in sizes:
            config = load_cfg(cfg_path, size, args.opts)
            model = build(config)
            res = measure(model, _row_opts(args, config, size), ['infer'])['infer']
            rows.append({'cfg': os.path.basename(cfg_path), 'img_size': size, 'tokens_stage1': (size // 4) ** 2,
                         'ms_per_img': 1e3 * res['wall_s'] / args.batch,
                         'cpu_ms_per_img': 1e3 * res['cpu_s_per_img'], 'peak_mb': res['peak_mb']})
            del model
    for r in rows:
        first = next(x for x in rows if x['cfg'] == r['cfg'])
        r['time_growth'] = r['ms_per_img'] / first['ms_per_img']
        r['token_growth'] = r['tokens_stage1'] / first['tokens_stage1']
    return rows


def print_sweep(rows: List[Dict[str, Any]]) -> None:
    print('| config | res | stage-1 tokens | x tokens | ms/img | x time | CPU ms/img | peak MiB |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|')
    for r in rows:
        print(f"| {r['cfg']} | {r['img_size']} | {r['tokens_stage1']} | {r['token_growth']:.2f} | "
              f"{r['ms_per_img']:.1f} | {r['time_growth']:.2f} | {r['cpu_ms_per_img']:.1f} | {r['peak_mb']:.0f} |")


def run_data(args) -> List[Dict[str, Any]]:
    """Images/s of the training input pipeline alone (decode + augment + collate, N workers)."""
    sys.path.insert(0, ROOT)
    from data.build import build_train_loader, patch_randaugment_posterize
    patch_randaugment_posterize()          # as runner.run does: RandAugment 'inc1' under Pillow >= 12
    rows = []
    for cfg_path in args.cfgs:
        for workers in args.workers:
            config = load_cfg(cfg_path, None, list(args.opts) + [
                'DATA.DATA_PATH', args.data, 'DATA.BATCH_SIZE', str(args.batch), 'DATA.NUM_WORKERS', str(workers)])
            _, loader, _ = build_train_loader(config)
            it = iter(loader)
            for _ in range(min(args.warmup, 2)):
                next(it)
            t0, n = time.perf_counter(), 0
            for _ in range(args.data_batches):
                try:
                    images, _, _ = next(it)
                except StopIteration:
                    break
                n += images.shape[0]
            dt = time.perf_counter() - t0
            rows.append({'cfg': os.path.basename(cfg_path), 'workers': workers, 'images': n, 'img_s': n / dt,
                         'img_size': config.DATA.IMG_SIZE})
            del it, loader
    return rows


def print_data(rows: List[Dict[str, Any]]) -> None:
    print('| config | res | workers | images | pipeline img/s |')
    print('|---|---:|---:|---:|---:|')
    for r in rows:
        print(f"| {r['cfg']} | {r['img_size']} | {r['workers']} | {r['images']} | {r['img_s']:.1f} |")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument('--cfgs', nargs='+', default=None,
                   help='config files, or timm:<name>[,key=value...] for a timm model with keyword arguments '
                        '(default: cfgs/flatten_swin_t.yaml)')
    p.add_argument('--opts', nargs='*', default=[], help='KEY VALUE config overrides for every config')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--img-size', type=int, nargs='*', default=None, help='resolution(s); default: the config')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--dtype', choices=sorted(DTYPES), default='float32', help='autocast dtype')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--compile', action='store_true', help='torch.compile the model (both sides)')
    p.add_argument('--attention-impl', choices=['reference', 'fast', 'triton'], default=None,
                   help='focused linear attention implementation (default: the library default)')
    p.add_argument('--modes', nargs='+', choices=['infer', 'train'], default=['infer', 'train'])
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    p.add_argument('--no-flops', dest='flops', action='store_false', help='skip the fvcore FLOP count')
    p.add_argument('--reference', metavar='DIR',
                   help='official checkout in the Swin-Transformer codebase layout to compare with '
                        '(e.g. LeapLabTHU/FLatten-Transformer)')
    p.add_argument('--rounds', type=int, default=5, help='alternating rounds with --reference or --alternate')
    p.add_argument('--alternate', action='store_true',
                   help='measure all --cfgs in turn in each of --rounds rounds (comparisons on a noisy machine)')
    p.add_argument('--reference-dtype', choices=sorted(DTYPES), default=None,
                   help="the official side's autocast dtype (default: --dtype); its --amp is float16")
    p.add_argument('--same-optimizer', action='store_true',
                   help="give the official side our fused AdamW (default: its own plain AdamW, as its trainer)")
    p.add_argument('--sweep-resolution', action='store_true')
    p.add_argument('--data', metavar='PATH', help='time the input pipeline on this dataset instead')
    p.add_argument('--workers', type=int, nargs='+', default=[4])
    p.add_argument('--data-batches', type=int, default=20)
    p.add_argument('--json', metavar='FILE', help='write results and environment here')
    p.add_argument('--smoke', action='store_true', help='CI-sized run: tiny model, one repeat, no targets')
    p.add_argument('--check', action='store_true',
                   help='only check the arguments: every config loads, --reference holds each; measure nothing')
    p.add_argument('--op', metavar='NAME',
                   help='time the implementations of one function against each other (declared by the model '
                        'modules; --op list names them)')
    p.add_argument('--dense', action='store_true',
                   help='backbone forward / forward+backward time and peak memory at dense-prediction sizes '
                        '(features_only, dynamic_img_size; --batch, --rounds, --dense-models, --dense-sizes)')
    p.add_argument('--dense-models', nargs='+', default=DENSE_MODELS,
                   help=f'timm names for --dense (timm_swin_t = timm\'s swin_tiny_patch4_window7_224); '
                        f'default: {" ".join(DENSE_MODELS)}')
    p.add_argument('--dense-sizes', nargs='+', default=DENSE_SIZES, help='HxW sizes for --dense')
    args = p.parse_args(argv)
    if args.op:
        sys.path.insert(0, ROOT)
        import models  # noqa: F401  (the model modules declare their op benchmarks)
        from models.impl_choice import OP_BENCHMARKS
        if args.op == 'list':
            print('\n'.join(f'{name}: {b.what}' for name, b in sorted(OP_BENCHMARKS.items())))
            raise SystemExit(0)
        if args.op not in OP_BENCHMARKS:
            p.error(f"--op {args.op}: no such op benchmark; use one of {', '.join(sorted(OP_BENCHMARKS))} "
                    f"(--op list)")
    if args.smoke:
        args.cfgs = args.cfgs or [os.path.join(ROOT, 'cfgs', 'demo', 'flatten_swin_digits.yaml')]
        args.batch, args.warmup, args.repeats, args.rounds = min(args.batch, 2), 0, 1, min(args.rounds, 2)
        args.img_size = args.img_size or ([64, 128] if args.sweep_resolution else None)
    args.cfgs = args.cfgs or [os.path.join(ROOT, 'cfgs', 'flatten_swin_t.yaml')]
    if args.reference and not os.path.isdir(args.reference):
        p.error(f'--reference {args.reference}: not a directory; pass the official checkout '
                f'(e.g. LeapLabTHU/FLatten-Transformer)')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        p.error(f'--device {args.device}: CUDA is not available here; use --device cpu')
    return args


# ----------------------------------------------------------------------------- op micro-benchmarks
def run_op(args: argparse.Namespace) -> Dict[str, Any]:
    """``--op NAME``: the implementations of one function that a model module declared
    (``models.impl_choice.register_op_benchmark``), forward and forward+backward at its cases' shapes,
    median seconds per call."""
    from models.impl_choice import OP_BENCHMARKS
    bench = OP_BENCHMARKS[args.op]
    device = torch.device(args.device)
    impls, notes = bench.impls()
    for note in notes:
        print(f'({note})')
    rows = []
    for label, inputs in bench.cases(args.batch, device):
        row: Dict[str, Any] = dict(label)
        for name, fn in impls.items():
            with torch.no_grad():
                row[f'{name}_fwd_s'] = time_calls(lambda: fn(*inputs), device, args.warmup, args.repeats)['wall_s']
            leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
            row[f'{name}_fwd_bwd_s'] = time_calls(lambda: fn(*leaves).sum().backward(), device, args.warmup,
                                                  args.repeats)['wall_s']
        rows.append(row)
        print(', '.join(f'{k} {v}' for k, v in label.items()) + f', batch {args.batch}: fwd '
              + ' / '.join(f"{n} {row[f'{n}_fwd_s'] * 1e3:.1f}" for n in impls) + ' ms; fwd+bwd '
              + ' / '.join(f"{n} {row[f'{n}_fwd_bwd_s'] * 1e3:.1f}" for n in impls) + ' ms')
    return {'op': args.op, 'what': bench.what, 'impls': list(impls), 'rows': rows}


# ----------------------------------------------------------------------------- dense-prediction backbones
DENSE_MODELS = ['flatten_swin_t', 'flatten_swin_t_softmax', 'timm_swin_t', 'flatten_pvt_v2_b2',
                'flatten_pvt_v2_b2_softmax', 'flatten_cswin_t', 'dat_tiny', 'L2ViT_Tiny']
DENSE_SIZES = ['512x512', '512x1024', '800x1333']
DENSE_ALIASES = {'timm_swin_t': 'swin_tiny_patch4_window7_224'}      # timm's own Swin-T, for reference
DENSE_PAD = {'timm_swin_t': 4}     # timm's Swin asks for sides divisible by its patch: zero-pad the image to it


def _rss_mb() -> float:
    """Current resident set of this process (MiB; 0 where /proc is missing)."""
    try:
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith('VmRSS:'))
    except (OSError, StopIteration):
        return 0.


def _rss_follows_tensors() -> bool:
    """glibc only: serve every allocation above 128 KiB with mmap, returned to the system on free (a fixed
    threshold, where glibc would otherwise raise it up to 32 MiB and keep freed blocks resident), so that the
    resident set follows the live tensors and a peak-RSS window measures what one call needs."""
    import ctypes
    try:
        return bool(ctypes.CDLL('libc.so.6').mallopt(-3, 128 * 1024))          # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _dense_measure(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> Dict[str, Any]:
    """Median wall and process-CPU ms of ``fn`` and its peak memory above what was held before it (CUDA:
    allocated bytes; CPU: the process's resident set, VmHWM - VmRSS). On a shared CPU the CPU time (one
    thread) is the steadier measure: waiting for a core counts in wall time only."""
    _sync(device)
    reset_peak_memory(device)                            # the window holds the --warmup calls too
    before = torch.cuda.memory_allocated(device) / 2 ** 20 if device.type == 'cuda' else _rss_mb()
    res = time_calls(fn, device, warmup, repeats)
    return {'ms': 1e3 * res['wall_s'], 'ms_all': [1e3 * t for t in res['wall_all_s']],
            'cpu_ms': 1e3 * res['cpu_s'], 'peak_mb': peak_memory_mb(device) - before}


def fit_exponent(pixels: Sequence[float], values: Sequence[float]) -> Optional[float]:
    """Least-squares slope k of log(value) = a + k log(pixels): cost ~ pixels^k (1 = linear, 2 = quadratic)."""
    if len(pixels) < 2 or min(values) <= 0:
        return None
    lx = [math.log(p) for p in pixels]
    ly = [math.log(v) for v in values]
    mx, my = statistics.mean(lx), statistics.mean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def run_dense(args: argparse.Namespace) -> Dict[str, Any]:
    """Backbone cost at dense-prediction sizes: ``timm.create_model(name, features_only=True,
    dynamic_img_size=True, drop_path_rate=0)`` (random weights, every block runs), batch ``--batch``; forward
    under no_grad (eval) and forward + backward of the sum of every map's mean (train mode). Peak memory is
    above what the process held before the call (CUDA: allocated; CPU: resident set, allocations above 128
    KiB mmap-served so that freed memory leaves it, see ``_rss_follows_tensors``). Each of
    ``--rounds`` rounds builds and measures every model in turn at every size (alternating, for a shared
    machine); the table gives the median over rounds, the peak memory the largest."""
    import timm
    import models  # noqa: F401  (registers our families)
    device = torch.device(args.device)
    sizes = []
    for text in args.dense_sizes:
        try:
            h, w = (int(v) for v in text.lower().split('x'))
        except ValueError:
            raise SystemExit(f'--dense-sizes {text}: give HxW, e.g. 512x1024') from None
        sizes.append((h, w))
    for name in args.dense_models:
        if not timm.is_model(DENSE_ALIASES.get(name, name)):
            raise SystemExit(f'--dense-models {name}: timm has no such model (see timm.list_models())')
    if device.type == 'cpu' and not _rss_follows_tensors():
        print('(peak memory: glibc mallopt unavailable; CPU peaks may miss memory the allocator kept)')
    runs: Dict[Tuple[str, Tuple[int, int]], Dict[str, List[Dict[str, Any]]]] = {}
    for _ in range(args.rounds):
        for name in args.dense_models:
            torch.manual_seed(0)
            model = timm.create_model(DENSE_ALIASES.get(name, name), features_only=True, dynamic_img_size=True,
                                      drop_path_rate=0.).to(device)
            for h, w in sizes:
                x = torch.randn(args.batch, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
                pad = DENSE_PAD.get(name, 1)
                x = nn.functional.pad(x, (0, (-w) % pad, 0, (-h) % pad))

                def forward() -> None:
                    with torch.no_grad():
                        model(x)

                def forward_backward() -> None:
                    model.zero_grad(set_to_none=True)
                    sum(m.float().mean() for m in model(x)).backward()

                entry = runs.setdefault((name, (h, w)), {'fwd': [], 'fwd_bwd': []})
                model.eval()
                entry['fwd'].append(_dense_measure(forward, device, args.warmup, args.repeats))
                model.train()
                model.zero_grad(set_to_none=True)        # the window then holds the gradients it allocates
                entry['fwd_bwd'].append(_dense_measure(forward_backward, device, args.warmup, args.repeats))
                print(f"{name} {h}x{w}: forward {entry['fwd'][-1]['ms']:.0f} ms, forward+backward "
                      f"{entry['fwd_bwd'][-1]['ms']:.0f} ms", flush=True)
            model = None                                 # free it before the next model is built
    rows = []
    for (name, (h, w)), entry in runs.items():
        row: Dict[str, Any] = {'model': name, 'timm_name': DENSE_ALIASES.get(name, name), 'size': f'{h}x{w}',
                               'pixels': h * w, 'batch': args.batch}
        for kind, results in entry.items():
            row[f'{kind}_ms'] = statistics.median(r['ms'] for r in results)
            row[f'{kind}_ms_rounds'] = [r['ms'] for r in results]
            row[f'{kind}_cpu_ms'] = statistics.median(r['cpu_ms'] for r in results)
            row[f'{kind}_peak_mb'] = max(r['peak_mb'] for r in results)
        rows.append(row)
    fits = []
    for name in args.dense_models:
        mine = [r for r in rows if r['model'] == name]
        px = [r['pixels'] for r in mine]
        fits.append({'model': name, **{f'{k}_exponent': fit_exponent(px, [r[k] for r in mine])
                                       for k in ('fwd_ms', 'fwd_bwd_ms', 'fwd_cpu_ms', 'fwd_bwd_cpu_ms',
                                                 'fwd_peak_mb', 'fwd_bwd_peak_mb')}})
    return {'rows': rows, 'exponents': fits}


def print_dense(result: Dict[str, Any]) -> None:
    fmt = lambda v, f='{:.0f}': 'n/a' if v is None else f.format(v)   # noqa: E731
    print('| backbone | size | forward ms | forward CPU ms | forward+backward ms | forward+backward CPU ms | '
          'forward peak MiB | forward+backward peak MiB |')
    print('|---|---|---:|---:|---:|---:|---:|---:|')
    for r in result['rows']:
        print(f"| {r['model']} | {r['size']} | {fmt(r['fwd_ms'])} | {fmt(r['fwd_cpu_ms'])} | "
              f"{fmt(r['fwd_bwd_ms'])} | {fmt(r['fwd_bwd_cpu_ms'])} | {fmt(r['fwd_peak_mb'])} | "
              f"{fmt(r['fwd_bwd_peak_mb'])} |")
    print('\nGrowth exponents k (cost ~ pixels^k, least squares over the sizes):\n')
    print('| backbone | wall fwd | wall fwd+bwd | CPU fwd | CPU fwd+bwd | memory fwd | memory fwd+bwd |')
    print('|---|---:|---:|---:|---:|---:|---:|')
    for f in result['exponents']:
        print(f"| {f['model']} | " + ' | '.join(fmt(f[k], '{:.2f}') for k in (
            'fwd_ms_exponent', 'fwd_bwd_ms_exponent', 'fwd_cpu_ms_exponent', 'fwd_bwd_cpu_ms_exponent',
            'fwd_peak_mb_exponent', 'fwd_bwd_peak_mb_exponent')) + ' |')


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, ROOT)
    from models.focused_attention import set_attention_impl
    if args.attention_impl:
        set_attention_impl(args.attention_impl)
    device = torch.device(args.device)
    env = environment(device)
    print(f"{env['device_name']} ({env['device']}), torch {env['torch']}, {env['threads']} threads, "
          f"load {env['loadavg_start']}, attention '{env['attention_impl']}', commit {env['git_commit']}"
          f"{' (+ local changes)' if env['git_dirty'] else ''}, {env['date']}\n")
    result: Dict[str, Any] = {'environment': env, 'args': vars(args)}
    if args.check:
        result['checked'] = check_args(args)
        return result
    if args.op:
        result['op'] = run_op(args)
    elif args.dense:
        result['dense'] = run_dense(args)
        print_dense(result['dense'])
    elif args.data:
        result['data'] = run_data(args)
        print_data(result['data'])
    elif args.sweep_resolution:
        result['sweep'] = run_sweep(args)
        print_sweep(result['sweep'])
    else:
        result['models'] = run_models(args)
        print_models(result['models'])
    env['loadavg_end'] = list(os.getloadavg()) if hasattr(os, 'getloadavg') else None
    print(f"\nload average at the end: {env['loadavg_end']}")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1, default=str)
    return result


if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == WORKER_FLAG:
        official_worker(sys.argv[2:])
    else:
        sys.path.insert(0, ROOT)
        import errors
        sys.exit(errors.cli(lambda: main() and 0))     # main returns the results; a UserError is one line, exit 2
