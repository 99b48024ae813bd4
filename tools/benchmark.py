"""Speed benchmark: focused linear attention vs its quadratic equivalent, and model throughput.

Usage: python tools/benchmark.py [--device cpu|cuda] [--batch 8] [--cfgs cfgs/flatten_swin_t.yaml ...]
Prints markdown tables; record results in BENCHMARKS.md with the machine they came from.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import load_config  # noqa: E402
from models import build_model  # noqa: E402
from models.focused_attention import equivalent_attention, linear_attention, split_heads, merge_heads  # noqa: E402


def _time(fn: Callable[[], object], device: str, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(iters):
        if device == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def attention_scaling(device: str, dim: int = 96, heads: int = 3, batch: int = 4) -> None:
    print(f'\n### Attention core, B={batch}, C={dim}, heads={heads}, {device}\n')
    print('| tokens N | linear (ms) | quadratic (ms) | speed-up |')
    print('|---:|---:|---:|---:|')
    for n in (196, 784, 3136, 6272):
        q, k, v = (torch.rand(batch, n, dim, device=device) for _ in range(3))
        with torch.no_grad():
            t_lin = _time(lambda: linear_attention(q, k, v, heads), device)
            t_quad = _time(lambda: merge_heads(equivalent_attention(q, k, heads) @ split_heads(v, heads)), device)
        print(f'| {n} | {t_lin * 1e3:.2f} | {t_quad * 1e3:.2f} | {t_quad / t_lin:.1f}x |')


def model_throughput(cfgs: List[str], device: str, batch: int) -> None:
    print(f'\n### Model throughput, batch {batch}, eval forward, {device}\n')
    print('| config | images/s |')
    print('|---|---:|')
    for path in cfgs:
        config = load_config(path)
        model = build_model(config).to(device).eval()
        x = torch.randn(batch, 3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE, device=device)
        with torch.no_grad():
            t = _time(lambda: model(x), device, warmup=1, iters=3)
        print(f'| {os.path.basename(path)} | {batch / t:.1f} |')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--cfgs', nargs='*', default=['cfgs/flatten_swin_t.yaml', 'cfgs/swin_t.yaml'])
    args = parser.parse_args()
    print(f'torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}')
    attention_scaling(args.device)
    model_throughput(args.cfgs, args.device, args.batch)


if __name__ == '__main__':
    main()
