"""FLatten-Swin: the Swin Transformer layout with focused linear ('L') or window softmax ('S') stages.

State-dict layout matches the official ``flatten_swin`` models. Window rules (official):
  * 'L' stages use MODEL.SWIN.WINDOW_SIZE (56, or 96 at 384), clamped to the stage resolution; a clamped
    window means one global window and no shift.
  * 'S' stages use window 7 (12 when WINDOW_SIZE > 56), shifted in every other block, with a relative
    position bias and the shifted-window attention mask (-100 across region boundaries).
  * A shifted 'L' block (possible only with a window smaller than the stage) keeps the ``attn_mask``
    buffer for checkpoint compatibility; linear attention does not use it, as officially.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, trunc_normal_

from config import ConfigError
from .build import register_model
from .focused_attention import AttentionTap, FocusedLinearAttentionBase
from .layers import (PatchEmbed, WindowAttention, init_weights, relative_position_index, run_blocks,  # noqa: F401
                     shifted_window_mask, window_partition, window_reverse)


class FocusedLinearWindowAttention(FocusedLinearAttentionBase):
    """Focused linear attention inside each (square) window. x (B*nW, w*w, C) -> same shape."""

    def __init__(self, dim: int, window: int, num_heads: int, qkv_bias: bool = True,
                 proj_drop: float = 0., focusing_factor: float = 3, kernel_size: int = 5) -> None:
        super().__init__(dim, num_heads, window * window, focusing_factor, kernel_size)
        self.window = window
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc_last()

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, C).unbind(2)
        x = self.attend(q, k, v) + self.rank_restoration(v, (self.window, self.window))
        return self.proj_drop(self.proj(x))


class SwinBlock(nn.Module):
    """Pre-norm block on (B, H*W, C) tokens: (shifted) window attention then MLP."""

    def __init__(self, dim: int, resolution: Tuple[int, int], num_heads: int, window: int, shift: int,
                 attn_type: str, mlp_ratio: float = 4., qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 focusing_factor: float = 3, kernel_size: int = 5) -> None:
        super().__init__()
        self.resolution = resolution
        if min(resolution) <= window:           # one window covers the map: no partition, no shift
            window, shift = min(resolution), 0
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        if attn_type == 'L':
            self.attn = FocusedLinearWindowAttention(dim, window, num_heads, qkv_bias, drop,
                                                     focusing_factor, kernel_size)
        else:
            self.attn = WindowAttention(dim, window, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        mask = shifted_window_mask(resolution, window, shift) if shift > 0 else None
        self.register_buffer('attn_mask', mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.resolution
        B, L, C = x.shape
        y = self.norm1(x).view(B, H, W, C)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = window_reverse(self.attn(window_partition(y, self.window), mask=self.attn_mask), self.window, H, W)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path(y.reshape(B, L, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return f'resolution={self.resolution}, window={self.window}, shift={self.shift}'


class PatchMerging(nn.Module):
    """(B, H*W, C) -> (B, H/2*W/2, 2C): concatenate 2x2 neighbours, LayerNorm(4C), linear (no bias)."""

    def __init__(self, resolution: Tuple[int, int], dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.resolution
        B, _, C = x.shape
        x = x.view(B, H, W, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class SwinStage(nn.Module):
    """Blocks of one resolution, then optional patch merging. Keys: ``blocks.{j}``, ``downsample``."""

    def __init__(self, dim: int, resolution: Tuple[int, int], depth: int, num_heads: int, window: int,
                 attn_type: str, drop_path: Sequence[float], downsample: bool, use_checkpoint: bool = False,
                 **block_kwargs) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            SwinBlock(dim, resolution, num_heads, window, 0 if i % 2 == 0 else window // 2, attn_type,
                      drop_path=drop_path[i], **block_kwargs)
            for i in range(depth)])
        self.downsample = PatchMerging(resolution, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = run_blocks(self.blocks, x, self.use_checkpoint)
        return self.downsample(x) if self.downsample is not None else x


def stage_windows(window_size: int, attn_type: str) -> List[int]:
    """The (unclamped) window of each stage: WINDOW_SIZE for 'L', 7 or 12 for 'S' (official rule)."""
    return [window_size if t == 'L' else (7 if window_size <= 56 else 12) for t in attn_type]


class FLattenSwinTransformer(nn.Module):
    """FLatten-Swin classifier. forward: (B, 3, H, W) -> (B, num_classes)."""

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4., qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 drop_rate: float = 0., attn_drop_rate: float = 0., drop_path_rate: float = 0.1, ape: bool = False,
                 patch_norm: bool = True, use_checkpoint: bool = False, focusing_factor: float = 3,
                 kernel_size: int = 5, attn_type: str = 'LLLL') -> None:
        super().__init__()
        n = len(depths)
        check_swin_layout(img_size, patch_size, n, window_size, attn_type)
        self.num_classes = num_classes
        self.num_features = int(embed_dim * 2 ** (n - 1))
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, patch_norm)
        grid = self.patch_embed.grid
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim)) if ape else None
        if ape:
            trunc_normal_(self.absolute_pos_embed, std=.02)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()  # cpu: also under a meta device
        windows = stage_windows(window_size, attn_type)
        self.layers = nn.ModuleList([
            SwinStage(int(embed_dim * 2 ** i), (grid[0] // 2 ** i, grid[1] // 2 ** i), depths[i], num_heads[i],
                      windows[i], attn_type[i], dpr[sum(depths[:i]):sum(depths[:i + 1])], i < n - 1,
                      use_checkpoint, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                      attn_drop=attn_drop_rate, focusing_factor=focusing_factor, kernel_size=kernel_size)
            for i in range(n)])
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'absolute_pos_embed'}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {'relative_position_bias_table', 'positional_encoding', 'attn.scale'}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> pooled (B, num_features)."""
        x = self.patch_embed(x)
        if self.absolute_pos_embed is not None:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def check_swin_layout(img_size: int, patch_size: int, num_stages: int, window_size: int, attn_type: str) -> None:
    """Raise ConfigError unless every stage's map tiles into its (clamped) windows."""
    if img_size % patch_size:
        raise ConfigError(f'DATA.IMG_SIZE {img_size} is not divisible by MODEL.SWIN.PATCH_SIZE {patch_size}')
    res = img_size // patch_size
    for i, w in enumerate(stage_windows(window_size, attn_type)):
        if i < num_stages - 1 and res % 2:
            raise ConfigError(f'DATA.IMG_SIZE {img_size}: stage {i + 1} map {res}x{res} is odd and cannot be '
                              f'patch-merged; use a multiple of {patch_size * 2 ** (num_stages - 1)}')
        w = min(w, res)
        if res % w:
            raise ConfigError(f'DATA.IMG_SIZE {img_size}: stage {i + 1} map {res}x{res} is not divisible by its '
                              f'window {w}; change DATA.IMG_SIZE or MODEL.SWIN.WINDOW_SIZE')
        res //= 2


@register_model('flatten_swin')
def build_flatten_swin(config) -> FLattenSwinTransformer:
    s = config.MODEL.SWIN
    if len(config.MODEL.LA.ATTN_TYPE) != len(s.DEPTHS) or len(s.NUM_HEADS) != len(s.DEPTHS):
        raise ConfigError(f'MODEL.LA.ATTN_TYPE ({config.MODEL.LA.ATTN_TYPE!r}), MODEL.SWIN.DEPTHS and '
                          f'MODEL.SWIN.NUM_HEADS must all have one entry per stage')
    return FLattenSwinTransformer(
        img_size=config.DATA.IMG_SIZE, patch_size=s.PATCH_SIZE, in_chans=s.IN_CHANS,
        num_classes=config.MODEL.NUM_CLASSES, embed_dim=s.EMBED_DIM, depths=s.DEPTHS, num_heads=s.NUM_HEADS,
        window_size=s.WINDOW_SIZE, mlp_ratio=s.MLP_RATIO, qkv_bias=s.QKV_BIAS, qk_scale=s.QK_SCALE,
        drop_rate=config.MODEL.DROP_RATE, drop_path_rate=config.MODEL.DROP_PATH_RATE, ape=s.APE,
        patch_norm=s.PATCH_NORM, use_checkpoint=config.TRAIN.USE_CHECKPOINT,
        focusing_factor=config.MODEL.LA.FOCUSING_FACTOR, kernel_size=config.MODEL.LA.KERNEL_SIZE,
        attn_type=config.MODEL.LA.ATTN_TYPE)
