"""``--op NAME``: the implementations of one function that a model module declared
(``models.impl_choice.register_op_benchmark``) timed against each other; ``--op list`` names them."""
from __future__ import annotations

import argparse
from typing import Any, Dict, List

import torch

from errors import ConfigError
from tools.bench.timing import time_calls


def op_benchmarks() -> Dict[str, Any]:
    """Every declared op benchmark by name (importing the model modules declares them)."""
    import models  # noqa: F401
    from models.impl_choice import OP_BENCHMARKS
    return OP_BENCHMARKS


def list_ops() -> List[str]:
    """``--op list``: one line per declared op benchmark, printed."""
    lines = [f'{name}: {b.what}' for name, b in sorted(op_benchmarks().items())]
    print('\n'.join(lines))
    return lines


def run_op(args: argparse.Namespace) -> Dict[str, Any]:
    """``--op NAME``: the implementations of one function that a model module declared
    (``models.impl_choice.register_op_benchmark``), forward and forward+backward at its cases' shapes,
    median seconds per call."""
    benchmarks = op_benchmarks()
    if args.op not in benchmarks:
        raise ConfigError(f"--op {args.op}: no such op benchmark; use one of {', '.join(sorted(benchmarks))} "
                          f"(--op list)")
    bench = benchmarks[args.op]
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
