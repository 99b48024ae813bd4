"""``--dense``: backbone cost at dense-prediction sizes (``features_only``, ``dynamic_img_size``): forward and
forward+backward time and peak memory per model and size, and how each grows with the pixel count. The
default models come from timm's registry (no family is named here): see :func:`default_models`."""
from __future__ import annotations

import argparse
import math
import statistics
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from errors import ConfigError
from tools.bench.timing import peak_memory_mb, reset_peak_memory, sync, time_calls

SIZES = ['512x512', '512x1024', '800x1333']
TWIN_SUFFIX = '_softmax'      # the registry's name of a family's softmax twin


def default_models() -> List[str]:
    """One backbone per family this repository registers in timm (the registered model with the fewest
    parameters of each model module, counted on the meta device), and its softmax twin where one is
    registered."""
    import timm
    import models  # noqa: F401  (registers our families)
    by_module: Dict[str, List[str]] = {}
    for name in timm.list_models():
        module = timm.models.model_entrypoint(name).__module__
        if module.startswith('models.') and not name.endswith(TWIN_SUFFIX):
            by_module.setdefault(module, []).append(name)
    picks = []
    for names in by_module.values():
        with torch.device('meta'):
            smallest = min(names, key=lambda n: (sum(p.numel() for p in timm.create_model(n).parameters()), n))
        picks += [smallest] + ([smallest + TWIN_SUFFIX] if timm.is_model(smallest + TWIN_SUFFIX) else [])
    return picks



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
    sync(device)
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
    dynamic_img_size=True, drop_path_rate=0)`` (random weights, every block runs), batch ``--batch``, the image
    zero-padded to a multiple of the first feature map's stride (timm's Swin requires it); forward
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
            raise ConfigError(f'--dense-sizes {text}: give HxW, e.g. 512x1024') from None
        sizes.append((h, w))
    names = args.dense_models or default_models()
    for name in names:
        if not timm.is_model(name):
            raise ConfigError(f'--dense-models {name}: timm has no such model (see timm.list_models())')
    if device.type == 'cpu' and not _rss_follows_tensors():
        print('(peak memory: glibc mallopt unavailable; CPU peaks may miss memory the allocator kept)')
    runs: Dict[Tuple[str, Tuple[int, int]], Dict[str, List[Dict[str, Any]]]] = {}
    for _ in range(args.rounds):
        for name in names:
            torch.manual_seed(0)
            try:
                model = timm.create_model(name, features_only=True, dynamic_img_size=True, drop_path_rate=0.)
            except Exception as e:  # noqa: BLE001  (the model's own refusal, as one line)
                raise ConfigError(f'--dense-models {name}: timm cannot build it as a dense backbone (features_only, '
                                  f'dynamic_img_size): {type(e).__name__}: {" ".join(str(e).split())}') from None
            model = model.to(device)
            for h, w in sizes:
                x = torch.randn(args.batch, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
                pad = model.feature_info.reduction()[0]   # timm's Swin asks for sides its patch divides
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
        row: Dict[str, Any] = {'model': name, 'size': f'{h}x{w}',
                               'pixels': h * w, 'batch': args.batch}
        for kind, results in entry.items():
            row[f'{kind}_ms'] = statistics.median(r['ms'] for r in results)
            row[f'{kind}_ms_rounds'] = [r['ms'] for r in results]
            row[f'{kind}_cpu_ms'] = statistics.median(r['cpu_ms'] for r in results)
            row[f'{kind}_peak_mb'] = max(r['peak_mb'] for r in results)
        rows.append(row)
    fits = []
    for name in names:
        mine = [r for r in rows if r['model'] == name]
        px = [r['pixels'] for r in mine]
        fits.append({'model': name, **{f'{k}_exponent': fit_exponent(px, [r[k] for r in mine])
                                       for k in ('fwd_ms', 'fwd_bwd_ms', 'fwd_cpu_ms', 'fwd_bwd_cpu_ms',
                                                 'fwd_peak_mb', 'fwd_bwd_peak_mb')}})
    return {'rows': rows, 'exponents': fits}


def print_dense(result: Dict[str, Any]) -> None:
    """The rows and the growth exponents as two markdown tables."""
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
