"""CPU inference latency of one model: torch eager, torch.compile and ONNX Runtime, measured alternating.

    OMP_NUM_THREADS=2 python tools/bench_onnx.py flatten_swin_t --batches 1 8 --rounds 3 --threads 2

Random weights, eval mode, float32. Each round times every runner once per batch size (median of
``--iters`` calls after one warm-up call), so that load changes on a shared machine hit all runners alike;
the table gives the median over rounds in ms per batch. ONNX files come from torch.onnx's dynamo exporter
(one per batch size, as tools/export.py writes them); ONNX Runtime runs with ``--threads`` intra-op threads.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import warnings
from typing import Callable, Dict, List, Optional, Sequence

if __name__ == '__main__' and not __package__:   # run as a file: tools/_root.py puts the repository root on the path
    import _root  # noqa: F401

import torch  # noqa: E402

import errors  # noqa: E402
from tools.bench.timing import time_calls  # noqa: E402


def _time(fn: Callable[[], object], iters: int) -> float:
    """Median ms of ``iters`` calls after one warm-up call."""
    return 1e3 * time_calls(fn, torch.device('cpu'), 1, iters)['wall_s']


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('model', nargs='?', default='flatten_swin_t')
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 8])
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--iters', type=int, default=3)
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args(argv)
    import onnxruntime as ort
    import timm
    import models  # noqa: F401
    if not timm.is_model(args.model):
        raise errors.ConfigError(f'{args.model}: timm has no such model (see timm.list_models())')
    torch.set_num_threads(args.threads)
    model = timm.create_model(args.model).eval()
    size = model.pretrained_cfg['input_size'][-1]
    inputs = {b: torch.randn(b, 3, size, size) for b in args.batches}
    compiled = torch.compile(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings('ignore')
        for b, x in inputs.items():
            path = os.path.join(tmp, f'{b}.onnx')
            torch.onnx.export(model, (x,), path, dynamo=True, verbose=False)
            sessions[b] = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
            compiled(x)                                                  # compile outside the timed rounds
            print(f'batch {b}: exported and compiled', file=sys.stderr, flush=True)
        runners: Dict[str, Callable[[int], Callable[[], object]]] = {
            'torch eager': lambda b: (lambda: model(inputs[b])),
            'torch.compile': lambda b: (lambda: compiled(inputs[b])),
            'ONNX Runtime': lambda b: (lambda: sessions[b].run(None, {sessions[b].get_inputs()[0].name:
                                                                      inputs[b].numpy()})),
        }
        results: Dict[str, Dict[int, List[float]]] = {r: {b: [] for b in args.batches} for r in runners}
        for _ in range(args.rounds):
            for b in args.batches:
                for name, make in runners.items():
                    results[name][b].append(_time(make(b), args.iters))
                    print(f'{name}, batch {b}: {results[name][b][-1]:.0f} ms', file=sys.stderr, flush=True)
    header = ' | '.join(f'batch {b} (ms)' for b in args.batches)
    print(f'| {args.model}, CPU, {args.threads} threads | {header} |')
    print('|---|' + '---:|' * len(args.batches))
    for name, per_batch in results.items():
        cells = [f'{statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})' for v in per_batch.values()]
        print(f'| {name} | ' + ' | '.join(cells) + ' |')
    return 0


if __name__ == '__main__':
    sys.exit(errors.cli(main))
