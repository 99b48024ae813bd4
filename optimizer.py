"""Optimiser with the official two parameter groups: weight decay for matrices/kernels, none for 1-D
parameters (norms), biases and the names the model lists in ``no_weight_decay()`` /
``no_weight_decay_keywords()`` (each family returns its official repository's rules). This is timm's rule
too (``param_groups_weight_decay``), so a stock timm model gets the groups timm's trainer gives it.

TRAIN.OPTIMIZER.EXTRA_NO_WEIGHT_DECAY (ours, off by default) also exempts the parameters the model names
in ``extra_no_weight_decay()`` (the model library decides which; see the README): a deviation from the
published recipe.

AdamW and SGD are built fused where the parameters' device supports it (CUDA, CPU): one kernel per
step, and the step accepts a ``found_inf`` device flag, which lets the engine skip a non-finite step
without reading anything back to the host.
"""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch
import torch.nn as nn
from yacs.config import CfgNode

FUSED_DEVICES = ('cuda', 'cpu')


def param_groups(model: nn.Module, skip: Iterable[str] = (), skip_keywords: Iterable[str] = ()
                 ) -> List[Dict]:
    """[{'params': decayed}, {'params': not decayed, 'weight_decay': 0.}] (official group order and rule:
    1-D, ``.bias``, a name in ``skip`` or containing one of ``skip_keywords`` -> no decay)."""
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


def extra_no_weight_decay(model: nn.Module) -> set:
    """Full parameter names of our extra exclusions: what the model lists in ``extra_no_weight_decay()`` (the
    model library's one rule, see the module docstring); none for a model without that method (stock timm
    models: timm's rule alone)."""
    return set(model.extra_no_weight_decay()) if hasattr(model, 'extra_no_weight_decay') else set()


def no_decay_rules(config: CfgNode, model: nn.Module) -> tuple:
    """(skip names, skip keywords) for ``param_groups``: the model's official lists, plus our extra
    exclusions when TRAIN.OPTIMIZER.EXTRA_NO_WEIGHT_DECAY."""
    skip = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    keywords = set(model.no_weight_decay_keywords()) if hasattr(model, 'no_weight_decay_keywords') else set()
    if config.TRAIN.OPTIMIZER.EXTRA_NO_WEIGHT_DECAY:
        skip |= extra_no_weight_decay(model)
    return skip, keywords


def _fusable(model: nn.Module) -> bool:
    params = [p for p in model.parameters() if p.requires_grad]
    return bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours ``optimizer.found_inf`` (skips the update on the device)."""
    return bool(getattr(optimizer, '_step_supports_amp_scaling', False)) and all(
        g.get('fused', False) for g in optimizer.param_groups)


def build_optimizer(config: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD (nesterov) at TRAIN.BASE_LR (already scaled by the engine); fused when possible."""
    groups = param_groups(model, *no_decay_rules(config, model))
    opt = config.TRAIN.OPTIMIZER
    name = opt.NAME.lower()
    fused = _fusable(model)
    if name == 'sgd':
        return torch.optim.SGD(groups, lr=config.TRAIN.BASE_LR, momentum=opt.MOMENTUM, nesterov=True,
                               weight_decay=config.TRAIN.WEIGHT_DECAY, fused=fused)
    return torch.optim.AdamW(groups, lr=config.TRAIN.BASE_LR, eps=opt.EPS, betas=tuple(opt.BETAS),
                             weight_decay=config.TRAIN.WEIGHT_DECAY, fused=fused)
