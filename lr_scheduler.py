"""Learning-rate schedules (timm), stepped once per iteration (``t_in_epochs=False``).

The schedule spans TRAIN.EPOCHS; the TRAIN.COOLDOWN_EPOCHS that follow run at the final (minimum) lr.
* cosine: warmup from WARMUP_LR, then cosine to MIN_LR over all EPOCHS (warmup counted in the cycle,
  as officially);
* linear: warmup, then linear decay to 1% of the base lr at the end of EPOCHS;
* step: warmup, then multiply by DECAY_RATE every DECAY_EPOCHS (counted from step 0, as officially).
"""
from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from yacs.config import CfgNode

LINEAR_MIN_RATE = 0.01      # linear schedule ends at 1% of the base lr (official value)


def build_scheduler(config: CfgNode, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Scheduler:
    t = config.TRAIN
    total = int(t.EPOCHS * steps_per_epoch)
    warmup = int(t.WARMUP_EPOCHS * steps_per_epoch)
    name = t.LR_SCHEDULER.NAME
    if name == 'cosine':
        return CosineLRScheduler(optimizer, t_initial=total, lr_min=t.MIN_LR, warmup_lr_init=t.WARMUP_LR,
                                 warmup_t=warmup, warmup_prefix=False, cycle_limit=1, t_in_epochs=False)
    if name == 'linear':
        # power 1 = linear; the decay phase starts after the warmup and lasts total - warmup steps
        return PolyLRScheduler(optimizer, t_initial=max(1, total - warmup), power=1.0,
                               lr_min=t.BASE_LR * LINEAR_MIN_RATE, warmup_t=warmup, warmup_lr_init=t.WARMUP_LR,
                               warmup_prefix=True, cycle_limit=1, t_in_epochs=False)
    if name == 'step':
        return StepLRScheduler(optimizer, decay_t=max(1, int(t.LR_SCHEDULER.DECAY_EPOCHS * steps_per_epoch)),
                               decay_rate=t.LR_SCHEDULER.DECAY_RATE, warmup_t=warmup,
                               warmup_lr_init=t.WARMUP_LR, warmup_prefix=False, t_in_epochs=False)
    raise ValueError(f'unknown TRAIN.LR_SCHEDULER.NAME {name!r}')
