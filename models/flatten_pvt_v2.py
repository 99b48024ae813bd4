"""FLatten-PVTv2: PVTv2 with focused linear ('L') or softmax ('S') stages.

Differences from PVT-v1 (the attention modules and block are shared with :mod:`models.flatten_pvt`):
  * overlapping patch embeddings (7x7 stride 4, then 3x3 stride 2; padding k // 2) and no position
    embeddings;
  * a 3x3 depth-wise conv inside the MLP (``mlp.dwconv.dwconv``) between fc1 and GELU;
  * a LayerNorm ``norm{i}`` closing every stage; the head reads the token mean of the normed stage 4;
  * ``linear=True`` (PVTv2-li, our ``flatten_pvt_v2_b2_li``): keys/values from a 7x7 adaptive average
    pool + 1x1 conv + LayerNorm + GELU, a ReLU after fc1. The official FLatten code has the flag but
    registers no model with it; ours sizes ``positional_encoding`` for the 49 pooled tokens, which is what
    the official code allocates whenever it runs (sr ratios '8421' at 224).

State-dict layout matches the official ``flatten_pvt_v2_b{0..5}``. Unlike the official builders, ours
honour ``MODEL.NUM_CLASSES`` and ``DATA.IMG_SIZE``.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import to_2tuple

from .build import register_model
from .flatten_pvt import (NUM_STAGES, PVTBlock, PyramidClassifier, check_pvt_layout, init_weights, run_blocks,
                          stage_sr_ratios, tokens_to_map)


class DWConv(nn.Module):
    """3x3 depth-wise conv on tokens of a fixed (H, W) map: (B, H*W, C) -> same shape."""

    def __init__(self, dim: int, resolution: Tuple[int, int]) -> None:
        super().__init__()
        self.resolution = resolution
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dwconv(tokens_to_map(x, self.resolution)).flatten(2).transpose(1, 2)


class ConvMlp(nn.Module):
    """PVTv2 MLP: fc1 -> (ReLU if linear) -> depth-wise conv -> GELU -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden: int, resolution: Tuple[int, int], drop: float = 0.,
                 linear: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden, resolution)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)
        self.relu = nn.ReLU() if linear else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.relu(self.fc1(x)))))
        return self.drop(self.fc2(x))


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlap (padding k // 2) + LayerNorm: (B, C_in, H, W) -> (B, H/s * W/s, C)."""

    def __init__(self, img_size: int, patch_size: int, stride: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.grid = (self.img_size[0] // stride, self.img_size[1] // stride)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f'input size {tuple(x.shape[-2:])} does not match the model ({self.img_size}); '
                             f'set DATA.IMG_SIZE to the input size')
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


def _init_conv(m: nn.Module) -> None:
    """PVTv2 conv init: normal with std sqrt(2 / fan_out), fan_out per group; zero bias."""
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class FLattenPVTv2(PyramidClassifier):
    """FLatten-PVTv2 classifier. forward: (B, 3, H, W) -> (B, num_classes)."""

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 embed_dims: Sequence[int] = (64, 128, 320, 512), num_heads: Sequence[int] = (1, 2, 5, 8),
                 mlp_ratios: Sequence[float] = (8, 8, 4, 4), depths: Sequence[int] = (3, 4, 6, 3),
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop_rate: float = 0.,
                 attn_drop_rate: float = 0., drop_path_rate: float = 0., attn_type: str = 'LLLL',
                 la_sr_ratios: str = '1111', linear: bool = False, focusing_factor: float = 3,
                 kernel_size: int = 5, use_checkpoint: bool = False) -> None:
        super().__init__()
        check_pvt_layout(img_size, attn_type, la_sr_ratios, linear)
        self.num_classes, self.use_checkpoint = num_classes, use_checkpoint
        self.resolutions = [(img_size // 2 ** (i + 2),) * 2 for i in range(NUM_STAGES)]
        srs = stage_sr_ratios(attn_type, la_sr_ratios)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        for i in range(NUM_STAGES):
            dim, res = embed_dims[i], self.resolutions[i]
            embed = (OverlapPatchEmbed(img_size, 7, 4, in_chans, dim) if i == 0 else
                     OverlapPatchEmbed(self.resolutions[i - 1][0], 3, 2, embed_dims[i - 1], dim))
            setattr(self, f'patch_embed{i + 1}', embed)
            mlp = partial(ConvMlp, resolution=res, drop=drop_rate, linear=linear)
            setattr(self, f'block{i + 1}', nn.ModuleList([
                PVTBlock(dim, res, num_heads[i], attn_type[i], srs[i], mlp, mlp_ratios[i], qkv_bias, qk_scale,
                         drop_rate, attn_drop_rate, dpr[sum(depths[:i]) + j], linear, focusing_factor,
                         kernel_size)
                for j in range(depths[i])]))
            setattr(self, f'norm{i + 1}', nn.LayerNorm(dim, eps=1e-6))
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)
        self.apply(_init_conv)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'cls_token'}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> pooled normed stage-4 tokens (B, C4)."""
        for i in range(NUM_STAGES):
            if i > 0:
                x = tokens_to_map(x, self.resolutions[i - 1])
            x = getattr(self, f'patch_embed{i + 1}')(x)
            x = run_blocks(getattr(self, f'block{i + 1}'), x, self.use_checkpoint)
            x = getattr(self, f'norm{i + 1}')(x)
        return x.mean(dim=1)


_WIDE = (64, 128, 320, 512)
PVT_V2_ARCHS = {   # type: (embed_dims, mlp_ratios, depths, linear)
    'flatten_pvt_v2_b0': ((32, 64, 160, 256), (8, 8, 4, 4), (2, 2, 2, 2), False),
    'flatten_pvt_v2_b1': (_WIDE, (8, 8, 4, 4), (2, 2, 2, 2), False),
    'flatten_pvt_v2_b2': (_WIDE, (8, 8, 4, 4), (3, 4, 6, 3), False),
    'flatten_pvt_v2_b2_li': (_WIDE, (8, 8, 4, 4), (3, 4, 6, 3), True),
    'flatten_pvt_v2_b3': (_WIDE, (8, 8, 4, 4), (3, 4, 18, 3), False),
    'flatten_pvt_v2_b4': (_WIDE, (8, 8, 4, 4), (3, 8, 27, 3), False),
    'flatten_pvt_v2_b5': (_WIDE, (4, 4, 4, 4), (3, 6, 40, 3), False),
}


@register_model(*PVT_V2_ARCHS)
def build_flatten_pvt_v2(config) -> FLattenPVTv2:
    la = config.MODEL.LA
    dims, mlp_ratios, depths, linear = PVT_V2_ARCHS[config.MODEL.TYPE]
    return FLattenPVTv2(
        img_size=config.DATA.IMG_SIZE, in_chans=config.MODEL.SWIN.IN_CHANS, num_classes=config.MODEL.NUM_CLASSES,
        embed_dims=dims, mlp_ratios=mlp_ratios, depths=depths, drop_rate=config.MODEL.DROP_RATE,
        drop_path_rate=config.MODEL.DROP_PATH_RATE, attn_type=la.ATTN_TYPE, la_sr_ratios=str(la.PVT_LA_SR_RATIOS),
        linear=linear, focusing_factor=la.FOCUSING_FACTOR, kernel_size=la.KERNEL_SIZE,
        use_checkpoint=config.TRAIN.USE_CHECKPOINT)
