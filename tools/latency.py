"""The FLatten paper's speed figure (Sec. 5.5, Fig. 7) on the machine at hand: latency of the FLatten-PVT /
FLatten-Swin models and of their softmax baselines, and the speed-up at equal ImageNet accuracy.

    python tools/latency.py --threads 2 --rounds 5 --json fig7.json --plot fig7.png       # CPU, batch 1
    python tools/latency.py --models FLatten-PVT-S PVT-L --reference /tmp/flatten_official --rounds 7
    python tools/latency.py --runtime compile --batch 8 --models FLatten-Swin-S
    python tools/latency.py --smoke                    # CI-sized: tiny models, tiny images, one round

Method: every model of the run is built once (random weights, float32, eval) on ``--device`` (CUDA when
present); each is first checked on real images (the embedded digits val set at the model's input size) to give
the eager model's predictions under the chosen ``--runtime`` (``eager``, ``compile``: torch.compile,
``onnxruntime``: the dynamo ONNX export run by ONNX Runtime); top-1 identical wherever the eager top-2 margin
exceeds the logit tolerance, logits within rtol 1e-3 / atol 1e-4 x max |logit|). Then ``--rounds`` rounds
time each model in turn (``--warmup`` untimed calls, median of ``--repeats`` timed calls per round); a model's
latency is the median over rounds, in ms per batch of ``--batch`` at 224 px. ``--reference DIR`` adds the
official code's FLatten models (tools/benchmark.py's subprocess runner, OUR weights loaded strictly), timed
in the same rounds right after ours.

Equal accuracy: the softmax models of a family, ordered by published top-1 (tools/published_top1.py), make a
piecewise-linear curve latency(top-1); each FLatten model's speed-up is the curve's latency at the FLatten
model's top-1 (linear interpolation between the two softmax models whose top-1 brackets it, exact at a
tie) divided by the FLatten model's latency. Above the most accurate softmax model the speed-up against that
model is reported as a lower bound ('>='); below the least accurate, nothing.

``--floor``: each FLatten model is timed a second time with its focused attention core free
(:func:`without_attention_core`: every focused linear attention returns its projected queries), so the time left
is the rest of the model: projections, MLPs, norms, patch embeddings, softmax stages. With ``--reference``
the report divides the official code's latency by it: the most our code could be ahead of the official code
if the attention core cost nothing, the bound that the float32 work both codes share sets. Eager runs also
time a third copy with only the focusing function free (:func:`without_focusing`): the core's products,
DWC and layouts still run, the bound for the cheapest core linear attention allows.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

if __name__ == '__main__' and not __package__:   # run as a file: tools/_root.py puts the repository root on the path
    import _root  # noqa: F401

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from tools.bench.configs import TimmSpec, build, load_cfg  # noqa: E402
from tools.bench.environment import environment  # noqa: E402
from tools.bench.official import OfficialProcess, official_cfg_name  # noqa: E402
from tools.bench.timing import make_input, time_calls  # noqa: E402
from tools.published_top1 import PAPER_CPU_SPEEDUP, TABLE, Published  # noqa: E402

RUNTIMES = ('eager', 'compile', 'onnxruntime')
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- equal accuracy
def softmax_latency_at(top1: float, curve: Sequence[Tuple[float, float]]) -> Tuple[Optional[float], str]:
    """The softmax curve's latency at ``top1``. ``curve``: (top1, latency) of the softmax models. Returns
    (latency, how): how is 'exact', 'interpolated', 'bound' (top1 above the curve: the most accurate
    model's latency, so a speed-up against it is a lower bound), 'below' or 'none' (no softmax model timed;
    latency None for both)."""
    pts = sorted(curve)
    if not pts:
        return None, 'none'
    if top1 < pts[0][0]:
        return None, 'below'
    if top1 > pts[-1][0]:
        return pts[-1][1], 'bound'
    for a, la in pts:
        if a == top1:
            return la, 'exact'
    for (a0, l0), (a1, l1) in zip(pts, pts[1:]):
        if a0 < top1 < a1:
            return l0 + (l1 - l0) * (top1 - a0) / (a1 - a0), 'interpolated'
    raise AssertionError('unreachable')


def equal_accuracy_speedups(latency: Dict[str, float], table: Sequence[Published] = TABLE) -> List[Dict[str, Any]]:
    """For each timed FLatten model with a published top-1: the softmax curve's latency at its top-1 over
    its own latency, per family. ``latency``: model name -> latency (any unit, the same for all)."""
    rows = []
    for fam in sorted({p.family for p in table}):
        soft = [p for p in table if p.family == fam and p.kind == 'softmax' and p.name in latency]
        curve = [(p.top1, latency[p.name]) for p in soft if p.top1 is not None]
        for p in table:
            if p.family != fam or p.kind != 'flatten' or p.name not in latency or p.top1 is None:
                continue
            ref, how = softmax_latency_at(p.top1, curve)
            rows.append({'family': fam, 'model': p.name, 'top1': p.top1, 'latency': latency[p.name],
                         'softmax_latency_at_top1': ref, 'how': how,
                         'speedup': None if ref is None else ref / latency[p.name],
                         'paper_cpu_speedup': PAPER_CPU_SPEEDUP.get(fam)})
    return rows


def speedups_of_rows(rows: Sequence[Dict[str, Any]], table: Sequence[Published]) -> List[Dict[str, Any]]:
    """:func:`equal_accuracy_speedups` of the measured ``rows`` (model, kind, ms, optional official_ms), with the
    official code's speed-up (the same softmax curve over the official FLatten latency) where it was timed."""
    speedups = equal_accuracy_speedups({r['model']: r['ms'] for r in rows}, table)
    official = {r['model']: r['official_ms'] for r in rows if 'official_ms' in r}
    for s in speedups:
        if s['model'] in official and s['softmax_latency_at_top1'] is not None and s['how'] != 'below':
            s['speedup_official_code'] = s['softmax_latency_at_top1'] / official[s['model']]
    return speedups


# ----------------------------------------------------------------------------- runtimes
def digits_images(n: int, size: int) -> torch.Tensor:
    """The first ``n`` images of the embedded digits val split (data/digits.py), ``size`` px, normalised
    as the val transform does (ImageNet mean / std) -> (n, 3, size, size)."""
    import numpy as np
    from PIL import Image
    from data.digits import write_digits
    with tempfile.TemporaryDirectory() as tmp:
        write_digits(tmp, size, max_train_per_class=0, max_val_per_class=-(-n // 10))
        files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(tmp, 'val')) for f in fs)[:n]
        arr = np.stack([np.asarray(Image.open(f).convert('RGB'), dtype=np.float32) / 255 for f in files])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def make_runner(model: nn.Module, runtime: str, example: torch.Tensor, compile_backend: str = 'inductor'
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> logits`` of the eval model under ``runtime``; onnxruntime is exported for ``example``'s shape
    (batch dimension dynamic) and runs on the CPU."""
    model.eval()
    if runtime == 'eager':
        return model
    if runtime == 'compile':
        return torch.compile(model, backend=compile_backend)
    if runtime == 'onnxruntime':
        import onnxruntime as ort
        tmp = tempfile.mkdtemp(prefix='latency_onnx_')
        path = os.path.join(tmp, 'model.onnx')
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings('ignore')
            torch.onnx.export(model, (example.cpu(),), path, dynamo=True, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim('batch', min=1, max=1024)},))
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])
    raise ValueError(f'runtime {runtime!r}: choose one of {RUNTIMES}')


def check_predictions(model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor
                      ) -> Dict[str, Any]:
    """``run`` against the eager model on ``images`` (engine.check_same_predictions: top-1 identical outside
    float ties, logits within float tolerance); raises a one-line ConfigError otherwise."""
    from engine import check_same_predictions
    with torch.no_grad():
        return check_same_predictions(model(images), run(images), 'this runtime')


def _attend_nothing(self: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    return q


def _with_attend(model: nn.Module, prefix: str, attend: Callable) -> nn.Module:
    """A copy of ``model`` in which every focused linear attention (:class:`models.focused_attention.
    FocusedLinearAttentionBase`) is an instance of a subclass of its class with ``attend`` replaced: torch.compile
    traces (and guards) the copy apart from the model."""
    from models.focused_attention import FocusedLinearAttentionBase
    copied = copy.deepcopy(model)
    for m in copied.modules():
        if isinstance(m, FocusedLinearAttentionBase):
            m.__class__ = type(f'{prefix}{type(m).__name__}', (type(m),), {'attend': attend})
    return copied


def without_attention_core(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose focused linear attentions output their projected queries q (B, N, C) at no
    cost; the projections around them still run. What it costs is everything but the focused attention core
    (``--floor``)."""
    return _with_attend(model, 'CoreFree', _attend_nothing)


def _relu_map(x: torch.Tensor, pos: Optional[torch.Tensor], s: torch.Tensor, p: float, heads: int) -> torch.Tensor:
    from models.focused_attention import kernel_input
    return kernel_input(x, pos, heads, s.dtype)


def _attend_unfocused(self: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    from models.focused_attention import fast_focused_linear_attention
    return fast_focused_linear_attention(q, k, v, self.scale, self.kv_positional_encoding(k.shape[1]),
                                         self.focusing_factor, self.num_heads, None if hw is None else self.dwc, hw,
                                         feature_map=_relu_map)


def without_focusing(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose focused linear attentions run the fast path with the focusing function
    replaced by one pass (relu(x + pos) into the per-head buffer): the products, normaliser, DWC and layouts
    still run, so what it costs is the model with the cheapest core this attention could have (``--floor``,
    eager only: the fast path's autograd Functions do not export)."""
    return _with_attend(model, 'Unfocused', _attend_unfocused)


# ----------------------------------------------------------------------------- run
def _img_size(config) -> int:
    return config.DATA.IMG_SIZE


def run(args: argparse.Namespace) -> Dict[str, Any]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = [p for p in TABLE if p.name in args.models] if not args.smoke else _smoke_table()
    env = environment(device)
    env['runtime'] = args.runtime
    entries = []
    try:
        for p in chosen:
            config = load_cfg(p.spec, args.img_size, args.opts if not p.spec.startswith('timm:') else ())
            model = build(config).to(device).eval()
            size = _img_size(config)
            images = digits_images(args.check_images, size).to(device)
            runner = make_runner(model, args.runtime, images)
            check = check_predictions(model, runner, images)
            x = make_input(args.batch, size, device, False)
            e = {'pub': p, 'model': model, 'runner': runner, 'x': x, 'check': check, 'ms': [], 'official': None,
                 'official_ms': [], 'floor': None, 'floor_ms': [], 'unfocused': None, 'unfocused_ms': []}
            if args.floor and p.kind == 'flatten':
                e['floor'] = make_runner(without_attention_core(model), args.runtime, images)
                if args.runtime == 'eager':
                    e['unfocused'] = without_focusing(model)
            if args.reference and p.kind == 'flatten':
                opts = {'device': args.device, 'batch': args.batch, 'img_size': size, 'dtype': 'float32',
                        'channels_last': False, 'compile': False, 'warmup': args.warmup, 'repeats': args.repeats,
                        'num_classes': config.MODEL.NUM_CLASSES, 'fused_optimizer': False}
                e['official'] = OfficialProcess(args.reference, p.spec, model, opts)
            entries.append(e)
            print(f'{p.name}: built, {args.runtime} checked on {check["images"]} digits images '
                  f'(max |diff| {check["max_abs_diff"]:.2g})', file=sys.stderr, flush=True)
        for r in range(args.rounds):
            for e in entries:
                def step(e=e):
                    with torch.no_grad():
                        e['runner'](e['x'])
                if r == 0:
                    step()                     # first call at this shape (compile, lazy init) outside the rounds
                t = time_calls(step, device, args.warmup, args.repeats)
                e['ms'].append(1e3 * t['wall_s'])
                for key in ('floor', 'unfocused'):
                    if e[key] is None:
                        continue
                    def floor_step(e=e, key=key):
                        with torch.no_grad():
                            e[key](e['x'])
                    if r == 0:
                        floor_step()
                    e[key + '_ms'].append(1e3 * time_calls(floor_step, device, args.warmup, args.repeats)['wall_s'])
                if e['official']:
                    res = e['official'].measure(['infer'])['infer']
                    e['official_ms'].append(1e3 * args.batch / res['img_s'])
            print(f'round {r + 1}/{args.rounds}, ms: ' + ', '.join(
                f'{e["pub"].name} {e["ms"][-1]:.0f}' + (f' (official {e["official_ms"][-1]:.0f})' if e['official'] else '')
                for e in entries), file=sys.stderr, flush=True)
    finally:
        for e in entries:
            if e['official']:
                e['official'].close()
    env['loadavg_end'] = list(os.getloadavg()) if hasattr(os, 'getloadavg') else None
    rows = []
    for e in entries:
        p = e['pub']
        row = {'model': p.name, 'family': p.family, 'kind': p.kind, 'top1': p.top1, 'source': p.source,
               'spec': p.spec, 'batch': args.batch, 'ms': statistics.median(e['ms']), 'ms_rounds': e['ms'],
               'check': e['check']}
        if e['official_ms']:
            row['official_ms'] = statistics.median(e['official_ms'])
            row['official_ms_rounds'] = e['official_ms']
            row['vs_official'] = row['official_ms'] / row['ms']
            row['vs_official_rounds'] = [o / m for o, m in zip(e['official_ms'], e['ms'])]
        if e['floor_ms']:
            row['floor_ms'] = statistics.median(e['floor_ms'])
            row['core_share'] = 1 - row['floor_ms'] / row['ms']
            if 'official_ms' in row:
                row['bound_vs_official'] = row['official_ms'] / row['floor_ms']
        if e['unfocused_ms']:
            row['unfocused_ms'] = statistics.median(e['unfocused_ms'])
            if 'official_ms' in row:
                row['bound_unfocused_vs_official'] = row['official_ms'] / row['unfocused_ms']
        rows.append(row)
    speedups = speedups_of_rows(rows, TABLE if not args.smoke else _smoke_table())
    return {'environment': env, 'args': {k: v for k, v in vars(args).items() if k != 'func'}, 'models': rows,
            'equal_accuracy': speedups}


def _smoke_table() -> List[Published]:
    """Two tiny softmax 'sizes' and one tiny FLatten model between them (the digits demo models), for CI."""
    demo = 'cfgs/demo/flatten_swin_digits.yaml'
    return [Published('tiny-FLatten', 'swin', 'flatten', 80.0, 'smoke', demo),
            Published('tiny-softmax-a', 'swin', 'softmax', 79.0, 'smoke', 'timm:vit_tiny_patch16_224,depth=1'),
            Published('tiny-softmax-b', 'swin', 'softmax', 81.0, 'smoke', 'timm:vit_tiny_patch16_224,depth=2')]


# ----------------------------------------------------------------------------- official issue #34
SWEEP_SIZES = (224, 448, 672, 896, 1008)      # multiples of 28 px: 7 x 7 windows tile the stage-1 map


def attention_modules(img_size: int, dim: int = 96, heads: int = 3, window: int = 7
                      ) -> Dict[str, Tuple[nn.Module, Callable[[nn.Module, torch.Tensor], torch.Tensor]]]:
    """The attention of FLatten-Swin-T's stage 1 at ``img_size`` (an (img/4)^2 token map, C=96, 3 heads) in
    three forms, each as (module, call on (B, H*W, C) tokens): 'focused linear' (global, as FLatten-Swin's
    stage 1, with its dwc), 'window softmax' (Swin's window-7 attention with relative position bias,
    partition and reverse included), 'global softmax' (fused softmax attention over all tokens)."""
    from models.flatten_swin import FocusedLinearWindowAttention
    from models.layers import WindowAttention, window_partition, window_reverse
    side = img_size // 4
    torch.manual_seed(0)
    linear = FocusedLinearWindowAttention(dim, side, heads).eval()
    win = WindowAttention(dim, window, heads).eval()
    glob = WindowAttention(dim, side, heads, rel_pos_bias=False).eval()

    def windows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        y = m(window_partition(x.view(B, side, side, C), window))
        return window_reverse(y, window, side, side).reshape(B, L, C)
    return {'focused linear': (linear, lambda m, x: m(x)), 'window softmax': (win, windows),
            'global softmax': (glob, lambda m, x: m(x))}


def attention_sweep(args: argparse.Namespace) -> Dict[str, Any]:
    """``--attention-sweep``: the three attention forms of :func:`attention_modules` at each ``--sizes``,
    batch ``--batch``, alternating within each round; global softmax only up to ``--global-max-tokens``."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    rows = []
    for size in args.sizes:
        mods = attention_modules(size)
        n = (size // 4) ** 2
        if n > args.global_max_tokens:
            mods.pop('global softmax')
        x = torch.randn(args.batch, n, 96, device=device)
        times: Dict[str, List[float]] = {k: [] for k in mods}
        with torch.no_grad():
            for _ in range(args.rounds):
                for name, (m, call) in mods.items():
                    m.to(device)
                    t = time_calls(lambda: call(m, x), device, args.warmup, args.repeats)
                    times[name].append(1e3 * t[args.clock + '_s'])
        row = {'img_size': size, 'tokens': n, **{k: statistics.median(v) for k, v in times.items()}}
        rows.append(row)
        print(f"{size} px ({n} tokens): " + ', '.join(f'{k} {row[k]:.1f} ms' for k in times), file=sys.stderr,
              flush=True)
    env['loadavg_end'] = list(os.getloadavg()) if hasattr(os, 'getloadavg') else None
    return {'environment': env, 'batch': args.batch, 'clock': args.clock, 'rows': rows}


def print_sweep(result: Dict[str, Any]) -> None:
    env = result['environment']
    print(f"stage-1 attention of FLatten-Swin-T (C=96, 3 heads), batch {result['batch']}, {env['device_name']}, "
          f"{env['threads']} threads, load average {env['loadavg_start'][0]:.1f} -> {env['loadavg_end'][0]:.1f}")
    print(f"({result['clock']} time per call: median over rounds of the median of repeats)")
    print('| image px | tokens | focused linear ms | window-7 softmax ms | global softmax ms | linear / window | '
          'linear / global |')
    print('|---:|---:|---:|---:|---:|---:|---:|')
    for r in result['rows']:
        lin, win, glob = r['focused linear'], r['window softmax'], r.get('global softmax')
        g_ms, g_ratio = ('-', '-') if glob is None else (f'{glob:.1f}', f'{lin / glob:.2f}')
        print(f"| {r['img_size']} | {r['tokens']} | {lin:.1f} | {win:.1f} | {g_ms} | {lin / win:.2f} | {g_ratio} |")


def print_report(result: Dict[str, Any]) -> None:
    env = result['environment']
    print(f"device {env['device_name']}, {env['threads']} threads, runtime {env['runtime']}, "
          f"load average start {env['loadavg_start'][0]:.1f} end {env['loadavg_end'][0]:.1f}, {env['date']}")
    print('| model | top-1 (published) | latency ms, median (min-max) | official code ms | ours vs official |')
    print('|---|---:|---:|---:|---:|')
    for r in result['models']:
        off = (f"{r['official_ms']:.1f} | {r['vs_official']:.2f}x" if 'official_ms' in r else ' | ')
        top1 = '-' if r['top1'] is None else f"{r['top1']:.1f}"
        print(f"| {r['model']} | {top1} | {r['ms']:.1f} ({min(r['ms_rounds']):.1f}-{max(r['ms_rounds']):.1f}) "
              f"| {off} |")
    floors = [r for r in result['models'] if 'floor_ms' in r]
    if floors:
        print()
        print('| FLatten model | ms | ms with the attention core free | core share | ms with the focusing '
              'function free | official code ms | bound: official / core-free | official / focusing-free |')
        print('|---|---:|---:|---:|---:|---:|---:|---:|')
        for r in floors:
            unf = f"{r['unfocused_ms']:.1f}" if 'unfocused_ms' in r else '-'
            off = (f"{r['official_ms']:.1f} | {r['bound_vs_official']:.2f}x" if 'bound_vs_official' in r
                   else '- | -')
            off += f" | {r['bound_unfocused_vs_official']:.2f}x" if 'bound_unfocused_vs_official' in r else ' | -'
            print(f"| {r['model']} | {r['ms']:.1f} | {r['floor_ms']:.1f} | {100 * r['core_share']:.0f}% | {unf} "
                  f"| {off} |")
    print()
    print('| FLatten model | top-1 | softmax latency at that top-1 | speed-up | official code\'s speed-up | paper (CPU) |')
    print('|---|---:|---|---:|---:|---:|')
    for s in result['equal_accuracy']:
        if s['speedup'] is None:
            why = 'no softmax model timed' if s['how'] == 'none' else 'below the softmax curve'
            print(f"| {s['model']} | {s['top1']} | {why} | - | - | - |")
            continue
        mark = '>=' if s['how'] == 'bound' else ''
        off = f"{mark}{s['speedup_official_code']:.2f}x" if 'speedup_official_code' in s else '-'
        print(f"| {s['model']} | {s['top1']} | {s['softmax_latency_at_top1']:.1f} ms ({s['how']}) | "
              f"{mark}{s['speedup']:.2f}x | {off} | {s['paper_cpu_speedup']}x |")


def plot(result: Dict[str, Any], path: str) -> None:
    """Top-1 against latency per family, as Fig. 7 draws it (softmax curve and FLatten points)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fams = sorted({r['family'] for r in result['models']})
    fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 4), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        for kind, style in (('softmax', 's--'), ('flatten', 'o-')):
            pts = sorted((r['ms'], r['top1'], r['model']) for r in result['models']
                         if r['family'] == fam and r['kind'] == kind and r['top1'] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=kind)
                for ms, top1, name in pts:
                    ax.annotate(name, (ms, top1), fontsize=7)
        ax.set_xlabel(f"latency (ms, batch {result['args']['batch']}, {result['environment']['device_name']})")
        ax.set_ylabel('ImageNet top-1 (published)')
        ax.set_title(fam.upper())
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--models', nargs='+', default=[t.name for t in TABLE], choices=[t.name for t in TABLE],
                   metavar='NAME', help='models of tools/published_top1.py (default: all)')
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--img-size', type=int, default=None, help='default: the config (224)')
    p.add_argument('--opts', nargs='*', default=[], help='KEY VALUE overrides for our configs')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--runtime', choices=RUNTIMES, default='eager')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--check-images', type=int, default=8, help='digits val images of the prediction check')
    p.add_argument('--reference', metavar='DIR', help="the official code's checkout: adds its FLatten models")
    p.add_argument('--floor', action='store_true',
                   help='also time each FLatten model with its attention core free: the bound on ours vs official')
    p.add_argument('--json', metavar='FILE')
    p.add_argument('--plot', metavar='FILE', help='accuracy against latency (PNG)')
    p.add_argument('--smoke', action='store_true', help='CI-sized: tiny models, one round')
    p.add_argument('--attention-sweep', action='store_true',
                   help='official issue #34: focused linear vs window-7 softmax vs global softmax attention, '
                        'one module (FLatten-Swin-T stage 1) over --sizes')
    p.add_argument('--sizes', type=int, nargs='+', default=list(SWEEP_SIZES), help='image sizes of the sweep')
    p.add_argument('--global-max-tokens', type=int, default=16384,
                   help='skip global softmax above this many tokens (its cost grows with tokens^2)')
    p.add_argument('--clock', choices=['wall', 'cpu'], default='wall',
                   help="--attention-sweep: wall time, or the process's CPU time (steadier on a shared machine "
                        'with --threads 1)')
    p.add_argument('--check', action='store_true',
                   help='only check the arguments: every model loads its config, --reference holds the FLatten ones')
    args = p.parse_args(argv)
    if args.reference and not os.path.isdir(args.reference):
        p.error(f'--reference {args.reference}: not a directory; pass the official checkout '
                '(e.g. LeapLabTHU/FLatten-Transformer)')
    if args.runtime == 'onnxruntime' and args.device != 'cpu':
        p.error('--runtime onnxruntime runs on the CPU here: add --device cpu')
    if args.smoke:
        args.rounds, args.warmup, args.repeats, args.check_images, args.img_size = 1, 0, 1, 4, 64
        args.reference = None                   # the official checkout has no tiny models
    return args


def check_args(args: argparse.Namespace) -> int:
    """``--check``: every chosen model's config loads (timm names exist), the --reference checkout has each
    FLatten config; nothing is built or timed. Returns the number of models checked."""
    import timm
    chosen = [p for p in TABLE if p.name in args.models]
    for p in chosen:
        config = load_cfg(p.spec, args.img_size)
        if isinstance(config, TimmSpec) and not timm.is_model(config.name):
            raise SystemExit(f'{p.name}: timm has no model {config.name}')
        if args.reference and p.kind == 'flatten':
            official_cfg_name(args.reference, p.spec)
    print(f'arguments ok: {len(chosen)} models, nothing measured (--check)')
    return len(chosen)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.check:
        return {'checked': check_args(args)}
    if args.attention_sweep:
        result = attention_sweep(args)
        print_sweep(result)
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(result, f, indent=1, default=str)
        return result
    result = run(args)
    print_report(result)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1, default=str)
    if args.plot:
        plot(result, args.plot)
    return result


if __name__ == '__main__':
    main()
