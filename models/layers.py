"""Small pieces shared by the families: weight init, the (checkpointed) block loop, patch embedding."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from timm.layers import to_2tuple, trunc_normal_


def init_weights(m: nn.Module) -> None:
    """ViT-style init (used with ``model.apply``): truncated-normal linear weights, zero biases, unit
    LayerNorms; convolutions keep torch's default init, as officially."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """Apply blocks in order, with activation checkpointing when asked and gradients are on."""
    for blk in blocks:
        if use_checkpoint and x.requires_grad:
            x = cp.checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
    return x


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, C_in, H, W) -> (B, H/p * W/p, C), optional LayerNorm."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, norm: bool) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f'input size {tuple(x.shape[-2:])} does not match the model ({self.img_size}); '
                             f'set DATA.IMG_SIZE to the input size')
        x = self.proj(x).flatten(2).transpose(1, 2)
        return self.norm(x) if self.norm is not None else x
