"""FLatten-CSwin: the CSWin Transformer layout with focused linear ('L') or LePE softmax ('S') stages.

State-dict layout matches the official ``FLatten_CSWin_*`` models: ``stage1_conv_embed.{0,2}``,
``stage{i}.{j}.{qkv,norm1,proj,attns.{k},mlp,norm2}``, ``merge{i}.{conv,norm}``, ``norm``, ``head``.

Token layout of one block (resolution R x R, C channels):
  * a branch attends inside rectangular windows ("stripes") of H_sp x W_sp tokens and adds a locally
    enhanced positional encoding (LePE): a 3x3 depth-wise conv ``get_v`` on V, run per window (zero
    padded at window borders);
  * with stripe width s < R there are two branches of C/2 channels and heads/2 each: branch 0 takes
    channels [:C/2] in vertical stripes (H_sp = R, W_sp = s), branch 1 channels [C/2:] in horizontal
    stripes (H_sp = s, W_sp = R); with s == R, and always in the last stage, one branch covers the whole
    map with all channels and heads (key ``attns.0``).

Stripe widths (official rules):
  * 'L' stages use MODEL.LA.CSWIN_LA_SPLIT_SIZE (one width per stage; the last stage ignores it). The
    shipped configs use width == resolution (global linear attention). A linear branch has both LePE
    and the dwc rank-restoration branch: output = attention + dwc(v) + lepe.
  * 'S' stages use the architecture's widths (1, 2, 7, 7; 1, 2, 12, 12 for base_384), clamped to the
    stage resolution when the image is smaller (ours: the official code would fail there).

Differences from the official code (weights stay compatible):
  * With a linear stripe width smaller than the resolution, the official code reshapes the per-window
    tokens back to one (B, L, C) sequence before the attention product, so the windows of an image are
    attended jointly, and its dwc then fails on the mis-shaped values. Here every window is its own
    attention problem (attention, dwc and LePE per window), exactly as in the softmax branches; for
    width == resolution (every shipped config) there is one window and both agree exactly.
  * The builder honours DATA.IMG_SIZE (positional encodings are sized by the stripes it implies) and
    MODEL.NUM_CLASSES, and a size that does not tile is a ConfigError naming the key to change.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from einops import rearrange
from einops.layers.torch import Rearrange
from timm.layers import DropPath, Mlp

from config import ConfigError
from .build import register_model
from .layers import init_weights, run_blocks
from .focused_attention import AttentionTap, FocusedLinearAttentionBase, merge_heads, split_heads

PATCH_STRIDE = 4          # the 7x7 stride-4 convolutional stem
NUM_STAGES = 4


# ----------------------------------------------------------------------------- stripes
def stripe_shape(resolution: int, branch: int, split: int) -> Tuple[int, int]:
    """(H_sp, W_sp) of a branch: -1 whole map, 0 vertical stripes of width split, 1 horizontal ones."""
    if branch == -1:
        return resolution, resolution
    return (resolution, split) if branch == 0 else (split, resolution)


def to_windows(x: torch.Tensor, resolution: int, window: Tuple[int, int]) -> torch.Tensor:
    """(B, R*R, C) row-major tokens -> (B * nW, H_sp * W_sp, C), windows row-major within each image."""
    hs, ws = window
    return rearrange(x, 'b (nh hs nw ws) c -> (b nh nw) (hs ws) c', hs=hs, ws=ws,
                     nh=resolution // hs, nw=resolution // ws)


def from_windows(x: torch.Tensor, resolution: int, window: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`to_windows`: (B * nW, H_sp * W_sp, C) -> (B, R*R, C)."""
    hs, ws = window
    return rearrange(x, '(b nh nw) (hs ws) c -> b (nh hs nw ws) c', hs=hs, ws=ws,
                     nh=resolution // hs, nw=resolution // ws)


class StripeLePE:
    """Mixin for both branch kinds: the stripe geometry and the LePE conv ``get_v``."""

    resolution: int
    window: Tuple[int, int]
    get_v: nn.Conv2d

    def init_stripes(self, dim: int, resolution: int, branch: int, split: int) -> None:
        self.resolution = resolution
        self.window = stripe_shape(resolution, branch, split)
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def lepe(self, v: torch.Tensor) -> torch.Tensor:
        """Per-window 3x3 depth-wise conv of v (B', H_sp*W_sp, C) -> same shape."""
        hs, ws = self.window
        maps = rearrange(v, 'b (hs ws) c -> b c hs ws', hs=hs, ws=ws)
        return rearrange(self.get_v(maps), 'b c hs ws -> b (hs ws) c')


class LePEAttention(StripeLePE, nn.Module):
    """Softmax attention inside stripes plus LePE. q, k, v (B, R*R, C) -> (B, R*R, C)."""

    def __init__(self, dim: int, resolution: int, branch: int, split: int, num_heads: int,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.) -> None:
        super().__init__()
        self.init_stripes(dim, resolution, branch, split)
        self.dim, self.num_heads = dim, num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_drop = nn.Dropout(attn_drop)
        self.tap = AttentionTap()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (to_windows(t, self.resolution, self.window) for t in (q, k, v))
        lepe = self.lepe(v)
        q, k, vh = (split_heads(t, self.num_heads) for t in (q, k, v))
        attn = self.tap(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))   # (B', h, n, n)
        out = merge_heads(self.attn_drop(attn) @ vh) + lepe
        return from_windows(out, self.resolution, self.window)

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}, resolution={self.resolution}, window={self.window}'


class FocusedLinearStripeAttention(StripeLePE, FocusedLinearAttentionBase):
    """Focused linear attention inside each stripe window, plus dwc and LePE.
    q, k, v (B, R*R, C) -> (B, R*R, C). Each window is attended separately (see the module docstring)."""

    def __init__(self, dim: int, resolution: int, branch: int, split: int, num_heads: int,
                 focusing_factor: float = 3, kernel_size: int = 5) -> None:
        hs, ws = stripe_shape(resolution, branch, split)
        super().__init__(dim, num_heads, hs * ws, focusing_factor, kernel_size)
        self.init_stripes(dim, resolution, branch, split)
        self.dwc_last()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (to_windows(t, self.resolution, self.window) for t in (q, k, v))
        out = self.attend(q, k, v, hw=self.window) + self.lepe(v)     # attend includes the dwc branch
        return from_windows(out, self.resolution, self.window)

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, resolution={self.resolution}, window={self.window}'


# ----------------------------------------------------------------------------- blocks
class CSWinBlock(nn.Module):
    """Pre-norm block on (B, R*R, C): one or two stripe branches, proj, then MLP.
    (DROP_RATE also drops after ``proj`` here; the official block skips its proj_drop. Shipped configs use 0.)"""

    def __init__(self, dim: int, resolution: int, num_heads: int, split: int, attn_type: str,
                 last_stage: bool = False, mlp_ratio: float = 4., qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop: float = 0., attn_drop: float = 0.,
                 drop_path: float = 0., focusing_factor: float = 3, kernel_size: int = 5) -> None:
        super().__init__()
        self.resolution, self.split = resolution, split
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm1 = nn.LayerNorm(dim)
        single = last_stage or split == resolution
        branches = [-1] if single else [0, 1]
        bdim, bheads = (dim, num_heads) if single else (dim // 2, num_heads // 2)

        def make(branch: int) -> nn.Module:
            if attn_type == 'L':
                return FocusedLinearStripeAttention(bdim, resolution, branch, split, bheads, focusing_factor,
                                                    kernel_size)
            return LePEAttention(bdim, resolution, branch, split, bheads, qk_scale, attn_drop)

        self.proj = nn.Linear(dim, dim)             # before attns: the official parameter order
        self.proj_drop = nn.Dropout(drop)
        self.attns = nn.ModuleList([make(b) for b in branches])
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, L, 3, C).unbind(2)
        if len(self.attns) == 1:
            y = self.attns[0](q, k, v)
        else:
            h = C // 2
            y = torch.cat([self.attns[0](q[..., :h], k[..., :h], v[..., :h]),
                           self.attns[1](q[..., h:], k[..., h:], v[..., h:])], dim=-1)
        x = x + self.drop_path(self.proj_drop(self.proj(y)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return f'resolution={self.resolution}, split={self.split}, branches={len(self.attns)}'


class MergeBlock(nn.Module):
    """(B, R*R, C) -> (B, R/2*R/2, C_out): 3x3 stride-2 conv, LayerNorm."""

    def __init__(self, dim: int, dim_out: int, resolution: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.conv = nn.Conv2d(dim, dim_out, 3, 2, 1)
        self.norm = nn.LayerNorm(dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rearrange(x, 'b (h w) c -> b c h w', h=self.resolution)
        return self.norm(rearrange(self.conv(x), 'b c h w -> b (h w) c'))


# ----------------------------------------------------------------------------- model
def stage_splits(img_size: int, attn_type: str, la_split: Sequence[int],
                 softmax_split: Sequence[int]) -> List[int]:
    """The stripe width of each stage, checked against the stage resolution (ConfigError if it does not
    tile). 'L': MODEL.LA.CSWIN_LA_SPLIT_SIZE; 'S': the architecture's width clamped to the resolution.
    The last stage is one whole-map branch whatever the width, so its width is the resolution."""
    if img_size % (PATCH_STRIDE * 2 ** (NUM_STAGES - 1)):
        raise ConfigError(f'DATA.IMG_SIZE {img_size} must be a multiple of {PATCH_STRIDE * 2 ** (NUM_STAGES - 1)} '
                          f'for CSwin (stem stride 4, three 2x merges), e.g. 224 or 384')
    splits = []
    for i, t in enumerate(attn_type):
        res = img_size // (PATCH_STRIDE * 2 ** i)
        if i == NUM_STAGES - 1:
            splits.append(res)
            continue
        if t == 'L':
            s = la_split[i]
            if s > res or res % s:
                raise ConfigError(
                    f"MODEL.LA.CSWIN_LA_SPLIT_SIZE: stage {i + 1} width {s} does not tile its {res}x{res} map "
                    f"(DATA.IMG_SIZE {img_size}); use divisors of the stage sizes, e.g. "
                    f"'{'-'.join(str(img_size // (PATCH_STRIDE * 2 ** j)) for j in range(NUM_STAGES))}'")
        else:
            s = min(softmax_split[i], res)
            if res % s:
                raise ConfigError(f'DATA.IMG_SIZE {img_size}: stage {i + 1} map {res}x{res} is not divisible by its '
                                  f'softmax stripe width {s}; use an image size whose stage maps it divides (e.g. 224)')
        splits.append(s)
    return splits


class FLattenCSWinTransformer(nn.Module):
    """FLatten-CSwin classifier. forward: (B, 3, S, S) -> (B, num_classes).

    Args:
        la_split: linear stripe width per stage (MODEL.LA.CSWIN_LA_SPLIT_SIZE).
        softmax_split: softmax stripe width per stage (architecture constant).
        attn_type: one letter per stage, 'L' focused linear or 'S' softmax.
    """

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 64,
                 depths: Sequence[int] = (2, 4, 18, 1), num_heads: Sequence[int] = (2, 4, 8, 16),
                 la_split: Sequence[int] = (56, 28, 14, 7), softmax_split: Sequence[int] = (1, 2, 7, 7),
                 attn_type: str = 'LLSS', mlp_ratio: float = 4., qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop_rate: float = 0., attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0., use_checkpoint: bool = False, focusing_factor: float = 3,
                 kernel_size: int = 5) -> None:
        super().__init__()
        splits = stage_splits(img_size, attn_type, la_split, softmax_split)
        self.num_classes, self.img_size = num_classes, img_size
        self.use_checkpoint = use_checkpoint
        res = img_size // PATCH_STRIDE
        self.stage1_conv_embed = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim, 7, PATCH_STRIDE, 2),
            Rearrange('b c h w -> b (h w) c'),
            nn.LayerNorm(embed_dim))
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        dim = embed_dim
        for i in range(NUM_STAGES):
            if i > 0:
                self.add_module(f'merge{i}', MergeBlock(dim, dim * 2, res))
                dim, res = dim * 2, res // 2
            first = sum(depths[:i])
            self.add_module(f'stage{i + 1}', nn.ModuleList([
                CSWinBlock(dim, res, num_heads[i], splits[i], attn_type[i], last_stage=i == NUM_STAGES - 1,
                           mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                           attn_drop=attn_drop_rate, drop_path=dpr[first + j],
                           focusing_factor=focusing_factor, kernel_size=kernel_size)
                for j in range(depths[i])]))
        self.num_features = dim
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Full names of the focused-attention scales and positional encodings."""
        return {n for n, _ in self.named_parameters() if n.endswith(('.scale', '.positional_encoding'))}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {'positional_encoding', 'attns.0.scale', 'attns.1.scale'}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> pooled (B, num_features)."""
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f'input size {tuple(x.shape[-2:])} does not match the model '
                             f'({self.img_size}, {self.img_size}); set DATA.IMG_SIZE to the input size')
        x = self.stage1_conv_embed(x)
        for i in range(NUM_STAGES):
            if i > 0:
                x = getattr(self, f'merge{i}')(x)
            x = run_blocks(getattr(self, f'stage{i + 1}'), x, self.use_checkpoint)
        return self.norm(x).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


# ----------------------------------------------------------------------------- registry
# MODEL.TYPE -> (embed_dim, depths, num_heads, softmax stripe widths); official names and shapes.
ARCHS = {
    'FLatten_CSWin_64_24181_tiny_224': (64, (2, 4, 18, 1), (2, 4, 8, 16), (1, 2, 7, 7)),
    'FLatten_CSWin_64_24322_small_224': (64, (2, 4, 32, 2), (2, 4, 8, 16), (1, 2, 7, 7)),
    'FLatten_CSWin_96_36292_base_224': (96, (3, 6, 29, 2), (4, 8, 16, 32), (1, 2, 7, 7)),
    'FLatten_CSWin_96_36292_base_384': (96, (3, 6, 29, 2), (4, 8, 16, 32), (1, 2, 12, 12)),
}


@register_model(*ARCHS)
def build_flatten_cswin(config) -> FLattenCSWinTransformer:
    embed_dim, depths, num_heads, softmax_split = ARCHS[config.MODEL.TYPE]
    la = config.MODEL.LA
    return FLattenCSWinTransformer(
        img_size=config.DATA.IMG_SIZE, in_chans=config.MODEL.SWIN.IN_CHANS, num_classes=config.MODEL.NUM_CLASSES,
        embed_dim=embed_dim, depths=depths, num_heads=num_heads,
        la_split=[int(s) for s in str(la.CSWIN_LA_SPLIT_SIZE).split('-')], softmax_split=softmax_split,
        attn_type=la.ATTN_TYPE, drop_rate=config.MODEL.DROP_RATE, drop_path_rate=config.MODEL.DROP_PATH_RATE,
        use_checkpoint=config.TRAIN.USE_CHECKPOINT, focusing_factor=la.FOCUSING_FACTOR,
        kernel_size=la.KERNEL_SIZE)
