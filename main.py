"""Train / evaluate a FLatten Transformer (the entry point; the run is ``runner.run``).

    python main.py --cfg cfgs/flatten_swin_t.yaml --data-path /data/imagenet [--batch-size 128] ...
    torchrun --nproc_per_node=8 main.py --cfg ... --data-path ...
    python -m torch.distributed.launch --nproc_per_node=8 main.py --cfg ...   (legacy launcher)
    python main.py --cfg ... --data-path ... --eval --resume ckpt.pth
    python main.py --cfg ... --throughput

Exit codes: 0 done; 2 a clear problem (configuration, checkpoint, data, diverged training, a distributed
peer that died or timed out), printed as one line ``ERROR: <message>`` (the full message in the log); 143 preempted by SIGTERM/SIGINT after saving a resumable checkpoint
(rerun the same command to continue); anything else is a bug (with its traceback).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from typing import List, Optional

if os.environ.get('RANK', '0').strip() not in ('', '0'):    # one copy of each warning per run: rank 0's
    warnings.filterwarnings('ignore')

from errors import UserError, one_line, report  # noqa: E402
from utils import PREEMPTED_EXIT_CODE  # noqa: E402


def build_parser(ema: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('FLatten Transformer training and evaluation')
    p.add_argument('--cfg', type=str, required=True, metavar='FILE', help='path to the config file')
    p.add_argument('--opts', default=None, nargs='+', help="override config keys: 'KEY VALUE' pairs")
    p.add_argument('--batch-size', type=int, help='batch size per process')
    p.add_argument('--data-path', type=str, help='dataset folder (train/ and val/, ImageNet layout)')
    p.add_argument('--zip', action='store_true', help='read train.zip/val.zip with their map files')
    p.add_argument('--cache-mode', type=str, default=None, choices=['no', 'full', 'part'],
                   help='zip mode caching: no, full (all images in memory), part (this rank\'s shard)')
    p.add_argument('--resume', help='checkpoint to resume from (or to evaluate with --eval)')
    p.add_argument('--use-checkpoint', action='store_true', help='gradient checkpointing to save memory')
    p.add_argument('--amp', action='store_true', help='mixed precision (see --amp-dtype)')
    p.add_argument('--amp-dtype', choices=['float16', 'bfloat16'], default=None,
                   help='float16 (with a GradScaler) or bfloat16 (no scaler)')
    p.add_argument('--device', choices=['auto', 'cuda', 'cpu'], default=None, help='auto: CUDA when available')
    p.add_argument('--output', default='output', type=str, metavar='PATH',
                   help='root of the output folder <output>/<MODEL.NAME>/<TAG> (default: output)')
    p.add_argument('--tag', help='tag of the experiment')
    p.add_argument('--eval', action='store_true', help='evaluate only')
    p.add_argument('--throughput', action='store_true', help='measure throughput only')
    p.add_argument('--compile', action='store_true',
                   help='torch.compile the model (TRAIN.COMPILE): training, --eval and --throughput; checked '
                        'against eager predictions before --eval / --throughput use it')
    p.add_argument('--pretrained', type=str, default=None, help='initial weights for fine-tuning (resized)')
    p.add_argument('--ema', action='store_true',
                   help="take the checkpoint's EMA weights ('model_ema', when it has them) for --pretrained and "
                        "--eval/--throughput --resume (MODEL.USE_EMA_WEIGHTS)")
    p.add_argument('--find-unused-params', action='store_true', help='DDP find_unused_parameters')
    p.add_argument('--tensorboard', action='store_true',
                   help='also write TensorBoard event files (needs the tensorboard package)')
    # torch.distributed.launch passes the local rank as an argument; the environment's LOCAL_RANK is used
    p.add_argument('--local-rank', '--local_rank', dest='local_rank', type=int, default=None,
                   help=argparse.SUPPRESS)
    if ema:
        p.add_argument('--model-ema', action=argparse.BooleanOptionalAction, default=True,
                       help='track an exponential moving average of the weights (default: on)')
        p.add_argument('--model-ema-decay', type=float, default=None, help='EMA decay (MODEL_EMA.DECAY)')
        p.add_argument('--model-ema-force-cpu', action='store_true',
                       help='keep the EMA on the CPU (not evaluated when training on a GPU)')
    return p


_PEER_FAILURE = re.compile(r'gloo|nccl|Connection (closed|reset) by peer|[Tt]imed out|[Tt]imeout|ProcessGroup|'
                           r'c10d|Broken pipe')


def peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another rank died or stopped responding
    (torch's DistError, or the RuntimeError the gloo/NCCL backends raise) in a multi-process run."""
    import torch.distributed as dist
    if int(os.environ.get('WORLD_SIZE', '1') or 1) <= 1:
        return False
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and bool(_PEER_FAILURE.search(str(error)))


def peer_failure_message(error: BaseException) -> str:
    backend = one_line(error)
    if len(backend) > 200:
        backend = backend[:200] + '...'
    return (f'a distributed peer failed or stopped responding (backend: {backend}); the cause is in the other '
            f"ranks' output. Fix it and rerun the same command: auto-resume continues from the last checkpoint "
            f'(DIST_TIMEOUT sets how long ranks wait)')


def main(argv: Optional[List[str]] = None, ema: bool = False) -> int:
    """Parse, configure, run; returns the exit code."""
    args = build_parser(ema).parse_args(argv)
    try:       # importing the models reads FLATTEN_ATTENTION_IMPL / DAT_NEIGHBORHOOD_IMPL: a bad one is a ConfigError
        from config import get_config
        from engine import Preempted
        from logger import log_to_file
        import runner
    except UserError as e:
        return report(e)
    try:
        runner.run(get_config(args))
    except Preempted:
        return PREEMPTED_EXIT_CODE
    except UserError as e:           # configuration, checkpoint, data, diverged training
        return report(e, log_to_file)
    except RuntimeError as e:
        if 'Expected to have finished reduction in the prior iteration' in str(e):   # DDP, unused parameters
            return report(UserError('DDP found model parameters that receive no gradient (unused in the forward); '
                                    'rerun with --find-unused-params, or set has_unused_parameters = True on the '
                                    'model class'), log_to_file)
        if not peer_failure(e):
            raise
        log_to_file(f'distributed failure: {e}')
        return report(UserError(peer_failure_message(e)), log_to_file)
    return 0


if __name__ == '__main__':
    sys.exit(main())
