"""Optimiser with two parameter groups, as officially: weight decay for matrices/kernels, none for 1-D
parameters (norms, scales), biases and the names the model lists in ``no_weight_decay()`` /
``no_weight_decay_keywords()``."""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch
import torch.nn as nn
from yacs.config import CfgNode


def param_groups(model: nn.Module, skip: Iterable[str] = (), skip_keywords: Iterable[str] = ()
                 ) -> List[Dict]:
    """[{'params': decayed}, {'params': not decayed, 'weight_decay': 0.}] (official group order)."""
    skip, skip_keywords = set(skip), tuple(skip_keywords)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith('.bias') or name in skip or any(k in name for k in skip_keywords):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{'params': decay}, {'params': no_decay, 'weight_decay': 0.}]


def build_optimizer(config: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD (nesterov) at TRAIN.BASE_LR (already scaled by the engine)."""
    skip = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else ()
    keywords = model.no_weight_decay_keywords() if hasattr(model, 'no_weight_decay_keywords') else ()
    groups = param_groups(model, skip, keywords)
    opt = config.TRAIN.OPTIMIZER
    name = opt.NAME.lower()
    if name == 'sgd':
        return torch.optim.SGD(groups, lr=config.TRAIN.BASE_LR, momentum=opt.MOMENTUM, nesterov=True,
                               weight_decay=config.TRAIN.WEIGHT_DECAY)
    return torch.optim.AdamW(groups, lr=config.TRAIN.BASE_LR, eps=opt.EPS, betas=tuple(opt.BETAS),
                             weight_decay=config.TRAIN.WEIGHT_DECAY)
