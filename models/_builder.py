"""How the families build their timm models: ``build_model_with_cfg`` with the getter feature wrapper and the
official-checkpoint pickle allow-list, the FLatten ``pretrained_cfg``, and the input-size rule."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg

from state_dicts import OFFICIAL_CHECKPOINT_GLOBALS


def square_size(img_size) -> int:
    """``img_size`` given as an int or an (H, W) pair (timm passes ``input_size[-2:]``) -> the int side of a
    square; ValueError for a non-square native size (other inputs run with ``dynamic_img_size=True``)."""
    if isinstance(img_size, (tuple, list)):
        if len(img_size) != 2 or img_size[0] != img_size[1]:
            raise ValueError(f'img_size={tuple(img_size)} must be one square size (e.g. 224); run other input '
                             f'sizes with dynamic_img_size=True')
        img_size = img_size[0]
    return int(img_size)


def flatten_pretrained_cfg(first_conv: str, url: str = '', **kwargs) -> dict:
    """pretrained_cfg of a FLatten variant. No download address: the official ``url`` goes to ``origin_url``
    and a downloaded file is loaded with ``pretrained_cfg_overlay=dict(file=PATH)``."""
    cfg = dict(url='', origin_url=url or 'https://github.com/LeapLabTHU/FLatten-Transformer',
               num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=.9, interpolation='bicubic',
               fixed_input_size=True, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
               first_conv=first_conv, classifier='head', paper_ids='arXiv:2308.00442',
               paper_name='FLatten Transformer: Vision Transformer using Focused Linear Attention',
               notes=('weights: the official release (origin_url); load a downloaded file with '
                      'pretrained_cfg_overlay=dict(file=PATH)',))
    cfg.update(kwargs)
    return cfg


def build_backbone(cls: type, name: str, pretrained: bool, filter_fn: Callable, num_stages: int = 4,
                   **kwargs: Any) -> nn.Module:
    """timm's ``build_model_with_cfg`` with the getter feature wrapper over ``num_stages`` stage maps; a
    ``pretrained_cfg_overlay=dict(file=PATH)`` official file is read with weights_only and the allow-list above."""
    with torch.serialization.safe_globals(OFFICIAL_CHECKPOINT_GLOBALS):
        return build_model_with_cfg(cls, name, pretrained, pretrained_filter_fn=filter_fn,
                                    feature_cfg=dict(feature_cls='getter', out_indices=tuple(range(num_stages))),
                                    **kwargs)
