"""Parameter and FLOP counts of the configured models, as a markdown table.

    OMP_NUM_THREADS=2 python tools/model_stats.py                      # every cfgs/*.yaml
    OMP_NUM_THREADS=2 python tools/model_stats.py cfgs/flatten_swin_t.yaml cfgs/swin_t.yaml
    python tools/model_stats.py cfgs/flatten_swin_t.yaml --opts DATA.IMG_SIZE 256

Parameters are counted in millions (trainable and frozen alike). FLOPs are measured with fvcore's
FlopCountAnalysis on one image of DATA.IMG_SIZE (batch 1) in eval mode; fvcore counts one fused
multiply-add as one flop and skips element-wise ops (activations, softmax), the convention of the numbers
published for FLatten and Swin. The count is ``report.count_flops`` (the one a run's summary prints): plain
fvcore plus the one handle it lacks for torch's fused attention (``models.flops.FVCORE_HANDLES``), what any
fvcore user gets. Runs on CPU; ``python -m tools.model_stats`` works too.
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
from typing import List, Optional, Sequence

if __name__ == '__main__' and not __package__:   # run as a file: tools/_root.py puts the repository root on the path
    import _root  # noqa: F401

import torch.nn as nn  # noqa: E402

import errors  # noqa: E402
from report import count_flops  # noqa: E402  (the project's one FLOP counter)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

logger = logging.getLogger('model_stats')


def count_params(model: nn.Module) -> int:
    """Number of parameter elements."""
    return sum(p.numel() for p in model.parameters())


def model_row(cfg_path: str, opts: Sequence[str] = (), flops: bool = True) -> List[str]:
    """[config, MODEL.TYPE, params (M), GFLOPs] for one YAML file."""
    from config import load_config      # here, not at import: errors of the model library come from main
    from models import build_model
    config = load_config(cfg_path, list(opts))
    model = build_model(config)
    params = f'{count_params(model) / 1e6:.3f}'
    in_chans = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels   # the stem's
    gflops = f'{count_flops(model, config.DATA.IMG_SIZE, in_chans) / 1e9:.3f}' if flops else '-'
    return [os.path.splitext(os.path.basename(cfg_path))[0], config.MODEL.TYPE, params, gflops]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('configs', nargs='*', help='YAML files (default: every cfgs/*.yaml)')
    parser.add_argument('--no-flops', action='store_true', help='count parameters only (fast)')
    parser.add_argument('--opts', nargs='+', default=[], metavar='KEY VALUE',
                        help='config overrides applied to every file, e.g. DATA.IMG_SIZE 256')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    for noisy in ('fvcore', 'fvcore.nn.jit_analysis'):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    import models  # noqa: F401  (before the loop: a bad implementation choice is one error, not one per config)
    configs = args.configs or sorted(glob.glob(os.path.join(ROOT, 'cfgs', '*.yaml')))
    rows, failures = [], 0
    for path in configs:
        try:
            rows.append(model_row(path, args.opts, flops=not args.no_flops))
        except Exception as e:  # one broken config must not hide the others
            failures += 1
            logger.error('%s: %s', path, e)
            rows.append([os.path.splitext(os.path.basename(path))[0], '?', f'error: {type(e).__name__}', '-'])
        if len(configs) > 1:                 # progress on stderr; the table goes to stdout
            print(' | '.join(rows[-1]), file=sys.stderr, flush=True)
    print(markdown_table(['config', 'MODEL.TYPE', 'params (M)', 'GFLOPs'], rows))
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(errors.cli(main))
