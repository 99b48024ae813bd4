"""FLatten-PVT: the Pyramid Vision Transformer (v1) with focused linear ('L') or softmax ('S') stages.

Both attention kinds take keys and values from a spatially reduced copy of the tokens:
  * 'L' stages reduce by ``int(MODEL.LA.PVT_LA_SR_RATIOS[i])`` (the official configs use '1111': none),
    'S' stages by the PVT ratios (8, 4, 2, 1);
  * a reduction is a strided conv (kernel = stride = sr) then LayerNorm, keys ``attn.sr`` / ``attn.norm``;
  * a linear block with fewer key tokens than query tokens stretches V back to the query length with
    :func:`interpolate_tokens` before its depth-wise conv (``dwc``), as the official code does.

State-dict layout matches the official ``flatten_pvt_{tiny,small,medium,large}``: ``patch_embed{i}``,
``pos_embed{i}``, ``block{i}.{j}``, an unused final ``norm`` (kept for checkpoint compatibility; the head
reads the token mean of stage 4 directly) and ``head``. Unlike the official builders, ours honour
``MODEL.NUM_CLASSES`` and ``DATA.IMG_SIZE`` (the position embeddings are sized for the image).

The attention modules, the block and the layout checks here are shared with :mod:`models.flatten_pvt_v2`.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, trunc_normal_

from config import ConfigError
from .build import register_model
from .layers import PatchEmbed, init_weights, run_blocks  # noqa: F401  (re-used by PVTv2)
from .focused_attention import AttentionTap, FocusedLinearAttentionBase, interpolate_tokens

SOFTMAX_SR_RATIOS = (8, 4, 2, 1)   # PVT's reductions, used by every softmax stage
LINEAR_POOL = 7                    # PVTv2 'linear' mode pools keys/values to 7 x 7
NUM_STAGES = 4
STRIDE = 32                        # total downsampling: the image must be a multiple of it


class SpatialReduction:
    """Mixin for PVT attention: keys and values come from a reduced copy of the tokens.

    ``linear=False``: conv (kernel = stride = sr) + LayerNorm when sr > 1, identity when sr == 1.
    ``linear=True`` (PVTv2-li): adaptive average pool to 7 x 7, 1x1 conv, LayerNorm, GELU.
    """

    def _init_reduction(self, dim: int, sr_ratio: int, linear: bool) -> None:
        self.sr_ratio, self.linear = sr_ratio, linear
        if linear:
            self.pool = nn.AdaptiveAvgPool2d(LINEAR_POOL)
            self.sr = nn.Conv2d(dim, dim, kernel_size=1)
            self.norm = nn.LayerNorm(dim)
            self.act = nn.GELU()
        elif sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def reduce(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """(B, H*W, C) tokens -> (B, n, C) tokens that keys and values are projected from."""
        if not self.linear and self.sr_ratio == 1:
            return x
        B, _, C = x.shape
        maps = x.transpose(1, 2).reshape(B, C, *hw)
        if self.linear:
            maps = self.pool(maps)
        y = self.norm(self.sr(maps).flatten(2).transpose(1, 2))
        return self.act(y) if self.linear else y


def num_kv_tokens(hw: Tuple[int, int], sr_ratio: int, linear: bool) -> int:
    """Key/value count after :class:`SpatialReduction` of an (H, W) map."""
    return LINEAR_POOL ** 2 if linear else (hw[0] // sr_ratio) * (hw[1] // sr_ratio)


class SRAttention(SpatialReduction, nn.Module):
    """Softmax attention over spatially reduced keys/values. x (B, H*W, C) -> same shape."""

    def __init__(self, dim: int, resolution: Tuple[int, int], num_heads: int, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0., proj_drop: float = 0.,
                 sr_ratio: int = 1, linear: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.dim, self.num_heads, self.resolution = dim, num_heads, resolution
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._init_reduction(dim, sr_ratio, linear)
        self.tap = AttentionTap()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).transpose(1, 2)                         # (B, h, N, d)
        k, v = self.kv(self.reduce(x, self.resolution)).reshape(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4)
        attn = self.tap(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))      # (B, h, N, n)
        x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, linear={self.linear}'


class FocusedLinearSRAttention(SpatialReduction, FocusedLinearAttentionBase):
    """Focused linear attention over spatially reduced keys/values. x (B, H*W, C) -> same shape.

    The dwc branch needs V at full resolution: reduced values are stretched back with
    :func:`interpolate_tokens` (1-D over the flattened tokens, as officially).
    """

    def __init__(self, dim: int, resolution: Tuple[int, int], num_heads: int, qkv_bias: bool = True,
                 proj_drop: float = 0., sr_ratio: int = 1, linear: bool = False, focusing_factor: float = 3,
                 kernel_size: int = 5) -> None:
        super().__init__(dim, num_heads, num_kv_tokens(resolution, sr_ratio, linear), focusing_factor,
                         kernel_size)
        self.resolution = resolution
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._init_reduction(dim, sr_ratio, linear)
        self.dwc_last()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        k, v = self.kv(self.reduce(x, self.resolution)).reshape(B, -1, 2, C).unbind(2)   # (B, n, C) each
        out = self.attend(self.q(x), k, v)
        if v.shape[1] != N:
            v = interpolate_tokens(v, self.num_heads, N)
        out = out + self.rank_restoration(v, self.resolution)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, sr_ratio={self.sr_ratio}, linear={self.linear}'


class PVTBlock(nn.Module):
    """Pre-norm block on (B, H*W, C) tokens of a fixed (H, W) map: attention then MLP.

    ``mlp`` builds the MLP from (dim, hidden); PVT-v1 uses timm's Mlp, PVTv2 its conv MLP.
    """

    def __init__(self, dim: int, resolution: Tuple[int, int], num_heads: int, attn_type: str, sr_ratio: int,
                 mlp: Callable[[int, int], nn.Module], mlp_ratio: float = 4., qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop: float = 0., attn_drop: float = 0.,
                 drop_path: float = 0., linear: bool = False, focusing_factor: float = 3,
                 kernel_size: int = 5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if attn_type == 'L':
            self.attn = FocusedLinearSRAttention(dim, resolution, num_heads, qkv_bias, drop, sr_ratio, linear,
                                                 focusing_factor, kernel_size)
        elif attn_type == 'S':
            self.attn = SRAttention(dim, resolution, num_heads, qkv_bias, qk_scale, attn_drop, drop, sr_ratio,
                                    linear)
        else:
            raise ValueError(f"attn_type must be 'L' or 'S', got {attn_type!r}")
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def tokens_to_map(x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    B, _, C = x.shape
    return x.transpose(1, 2).reshape(B, C, *hw)


def stage_sr_ratios(attn_type: str, la_sr_ratios: str) -> List[int]:
    """Per-stage reduction: PVT's (8, 4, 2, 1) for 'S' stages, the digit of PVT_LA_SR_RATIOS for 'L'."""
    return [SOFTMAX_SR_RATIOS[i] if t == 'S' else int(la_sr_ratios[i]) for i, t in enumerate(attn_type)]


def check_pvt_layout(img_size: int, attn_type: str, la_sr_ratios: str, linear: bool = False) -> None:
    """Raise ConfigError unless the image tiles every stage and every reduced stage map."""
    if len(attn_type) != NUM_STAGES or set(attn_type) - {'L', 'S'}:
        raise ConfigError(f"MODEL.LA.ATTN_TYPE must be {NUM_STAGES} letters from 'L'/'S' for PVT, got {attn_type!r}")
    if len(la_sr_ratios) != NUM_STAGES or not la_sr_ratios.isdigit() or '0' in la_sr_ratios:
        raise ConfigError(f"MODEL.LA.PVT_LA_SR_RATIOS must be {NUM_STAGES} non-zero digits, got {la_sr_ratios!r}")
    if img_size % STRIDE:
        raise ConfigError(f'DATA.IMG_SIZE {img_size} is not divisible by {STRIDE} (the PVT downsampling); '
                          f'use e.g. {max(STRIDE, img_size // STRIDE * STRIDE)}')
    if linear:
        return
    for i, sr in enumerate(stage_sr_ratios(attn_type, la_sr_ratios)):
        res = img_size // 2 ** (i + 2)
        if res % sr:
            raise ConfigError(f"DATA.IMG_SIZE {img_size}: stage {i + 1} map {res}x{res} is not divisible by its "
                              f"sr ratio {sr}; change DATA.IMG_SIZE or MODEL.LA.PVT_LA_SR_RATIOS")


class PyramidClassifier(nn.Module):
    """What the PVT and PVTv2 classifiers share: the head on pooled features, the no-decay keywords.
    Subclasses define ``forward_features`` (B, 3, H, W) -> (B, C4) and ``head``."""

    head: nn.Module

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {'positional_encoding', 'attn.scale'}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


class FLattenPVT(PyramidClassifier):
    """FLatten-PVT classifier. forward: (B, 3, H, W) -> (B, num_classes).

    Stage i (1-based) sees an (img / 2^(i+1))^2 map; its blocks' attention kind is ``attn_type[i-1]``.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dims: Sequence[int] = (64, 128, 320, 512), num_heads: Sequence[int] = (1, 2, 5, 8),
                 mlp_ratios: Sequence[float] = (8, 8, 4, 4), depths: Sequence[int] = (2, 2, 2, 2),
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop_rate: float = 0.,
                 attn_drop_rate: float = 0., drop_path_rate: float = 0., attn_type: str = 'LLLL',
                 la_sr_ratios: str = '1111', focusing_factor: float = 3, kernel_size: int = 5,
                 use_checkpoint: bool = False) -> None:
        super().__init__()
        check_pvt_layout(img_size, attn_type, la_sr_ratios)
        self.num_classes, self.use_checkpoint = num_classes, use_checkpoint
        self.resolutions = [(img_size // 2 ** (i + 2),) * 2 for i in range(NUM_STAGES)]
        srs = stage_sr_ratios(attn_type, la_sr_ratios)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        for i in range(NUM_STAGES):
            dim, res = embed_dims[i], self.resolutions[i]
            embed = (PatchEmbed(img_size, patch_size, in_chans, dim, norm=True) if i == 0 else
                     PatchEmbed(self.resolutions[i - 1][0], 2, embed_dims[i - 1], dim, norm=True))
            setattr(self, f'patch_embed{i + 1}', embed)
            setattr(self, f'pos_embed{i + 1}', nn.Parameter(torch.zeros(1, res[0] * res[1], dim)))
            setattr(self, f'pos_drop{i + 1}', nn.Dropout(drop_rate))
            mlp = partial(_timm_mlp, drop=drop_rate)
            setattr(self, f'block{i + 1}', nn.ModuleList([
                PVTBlock(dim, res, num_heads[i], attn_type[i], srs[i], mlp, mlp_ratios[i], qkv_bias, qk_scale,
                         drop_rate, attn_drop_rate, dpr[sum(depths[:i]) + j], focusing_factor=focusing_factor,
                         kernel_size=kernel_size)
                for j in range(depths[i])]))
        self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-6)   # official checkpoints carry it; never applied
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        for i in range(NUM_STAGES):
            trunc_normal_(getattr(self, f'pos_embed{i + 1}'), std=.02)
        self.apply(init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'cls_token'} | {f'pos_embed{i + 1}' for i in range(NUM_STAGES)}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> pooled stage-4 tokens (B, C4)."""
        for i in range(NUM_STAGES):
            if i > 0:
                x = tokens_to_map(x, self.resolutions[i - 1])
            x = getattr(self, f'patch_embed{i + 1}')(x)
            x = getattr(self, f'pos_drop{i + 1}')(x + getattr(self, f'pos_embed{i + 1}'))
            x = run_blocks(getattr(self, f'block{i + 1}'), x, self.use_checkpoint)
        return x.mean(dim=1)


def _timm_mlp(dim: int, hidden: int, drop: float = 0.) -> nn.Module:
    return Mlp(dim, hidden, drop=drop)


PVT_DEPTHS = {
    'flatten_pvt_tiny': (2, 2, 2, 2),
    'flatten_pvt_small': (3, 4, 6, 3),
    'flatten_pvt_medium': (3, 4, 18, 3),
    'flatten_pvt_large': (3, 8, 27, 3),
}


@register_model(*PVT_DEPTHS)
def build_flatten_pvt(config) -> FLattenPVT:
    la = config.MODEL.LA
    return FLattenPVT(
        img_size=config.DATA.IMG_SIZE, in_chans=config.MODEL.SWIN.IN_CHANS, num_classes=config.MODEL.NUM_CLASSES,
        depths=PVT_DEPTHS[config.MODEL.TYPE], drop_rate=config.MODEL.DROP_RATE,
        drop_path_rate=config.MODEL.DROP_PATH_RATE, attn_type=la.ATTN_TYPE, la_sr_ratios=str(la.PVT_LA_SR_RATIOS),
        focusing_factor=la.FOCUSING_FACTOR, kernel_size=la.KERNEL_SIZE,
        use_checkpoint=config.TRAIN.USE_CHECKPOINT)
