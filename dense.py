"""Glue for torchvision's detectors: a timm feature backbone of any family here under torchvision's
FeaturePyramidNetwork, as the ``backbone`` of FasterRCNN / MaskRCNN / RetinaNet.

torchvision's own ``BackboneWithFPN`` picks layers by child-module name (``IntermediateLayerGetter``), which a
timm ``features_only`` model does not expose, hence this small wrapper. smp needs nothing: it takes our timm
names directly (``smp.UPerNet('tu-<name>', encoder_weights=None, dynamic_img_size=True)``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

__all__ = ['FeaturePyramidBackbone']


class FeaturePyramidBackbone(nn.Module):
    """timm feature backbone + torchvision FPN: (B, 3, H, W) -> OrderedDict of (B, out_channels, h_i, w_i).

    ``body`` is a ``timm.create_model(name, features_only=True, dynamic_img_size=True)`` model (anything
    whose forward returns the NCHW maps listed by ``body.feature_info``). The levels are named '0', '1', ...
    in stride order, then the extra block's ('pool' for the default max-pool level, 'p6'/'p7' for RetinaNet's
    ``LastLevelP6P7``). With four maps these are the names torchvision's default anchor generator and
    ``MultiScaleRoIAlign(['0', '1', '2', '3'])`` expect; a three-map backbone (Visformer v1, strides 8/16/32)
    needs an ``AnchorGenerator`` with four sizes and ``MultiScaleRoIAlign(backbone.featmap_names)``.
    """

    def __init__(self, body: nn.Module, out_channels: int = 256,
                 extra_blocks: Optional[ExtraFPNBlock] = None) -> None:
        super().__init__()
        self.body = body
        self.out_channels = out_channels          # read by torchvision's detectors
        channels = list(body.feature_info.channels())
        self.featmap_names: List[str] = [str(i) for i in range(len(channels))]
        self.fpn = FeaturePyramidNetwork(channels, out_channels,
                                         extra_blocks=extra_blocks if extra_blocks is not None else LastLevelMaxPool())

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        maps = self.body(x)
        return self.fpn(OrderedDict(zip(self.featmap_names, maps)))
