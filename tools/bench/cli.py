"""Speed and memory benchmark: inference and training-step images/s, peak memory, FLOPs, against the official
code, over resolutions, and of the input pipeline alone.

    python tools/benchmark.py --cfgs cfgs/flatten_swin_t.yaml cfgs/swin_t.yaml --batch 8
    python tools/benchmark.py --cfgs cfgs/flatten_swin_t.yaml --reference /path/to/FLatten-Transformer --rounds 7
    python tools/benchmark.py --sweep-resolution --cfgs cfgs/flatten_pvt_t.yaml cfgs/pvt_t.yaml
    python tools/benchmark.py --data /path/to/imagenet --cfgs cfgs/flatten_swin_t.yaml --workers 8
    python tools/benchmark.py --smoke                      # CI-sized: tiny model, one timed repeat
    python tools/benchmark.py --cfgs 'timm:pvt_v2_b0,num_classes=10'   # a timm model with keyword arguments
    python tools/benchmark.py --dense                      # backbones at dense-prediction sizes
    python tools/benchmark.py --op list                    # kernels a model module declares, timed by --op NAME

(``python -m tools.benchmark ...`` is the same.) A bad argument is one line, ``ERROR: ...``, exit status 2.

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
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, Dict, Optional, Sequence

import torch

from errors import ConfigError
from tools.bench import classify, dense, op, pipeline, sweep
from tools.bench.environment import ROOT, environment
from tools.bench.timing import DTYPES


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line, with --smoke's sizes and the defaults filled in; a bad value raises ConfigError."""
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
    p.add_argument('--dense-models', nargs='+', default=None,
                   help='timm names for --dense (e.g. swin_tiny_patch4_window7_224); default: the smallest model '
                        'of each family this repository registers, and its softmax twin')
    p.add_argument('--dense-sizes', nargs='+', default=dense.SIZES, help='HxW sizes for --dense')
    args = p.parse_args(argv)
    if args.smoke:
        args.cfgs = args.cfgs or [os.path.join(ROOT, 'cfgs', 'demo', 'flatten_swin_digits.yaml')]
        args.batch, args.warmup, args.repeats, args.rounds = min(args.batch, 2), 0, 1, min(args.rounds, 2)
        args.img_size = args.img_size or ([64, 128] if args.sweep_resolution else None)
    args.cfgs = args.cfgs or [os.path.join(ROOT, 'cfgs', 'flatten_swin_t.yaml')]
    if args.reference and not os.path.isdir(args.reference):
        raise ConfigError(f'--reference {args.reference}: not a directory; pass the official checkout '
                          f'(e.g. LeapLabTHU/FLatten-Transformer)')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise ConfigError(f'--device {args.device}: CUDA is not available here; use --device cpu')
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the mode the arguments select; returns the result (also written to --json). A bad argument raises
    :class:`errors.ConfigError` (one line)."""
    args = parse_args(argv)
    if args.op == 'list':
        return {'op_list': op.list_ops()}
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
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
        result['checked'] = classify.check_args(args)
        return result
    if args.op:
        result['op'] = op.run_op(args)
    elif args.dense:
        result['dense'] = dense.run_dense(args)
        dense.print_dense(result['dense'])
    elif args.data:
        result['data'] = pipeline.run_data(args)
        pipeline.print_data(result['data'])
    elif args.sweep_resolution:
        result['sweep'] = sweep.run_sweep(args)
        sweep.print_sweep(result['sweep'])
    else:
        result['models'] = classify.run_models(args)
        classify.print_models(result['models'])
    env['loadavg_end'] = list(os.getloadavg()) if hasattr(os, 'getloadavg') else None
    print(f"\nload average at the end: {env['loadavg_end']}")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1, default=str)
    return result
