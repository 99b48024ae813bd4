"""FLatten-CSwin: the CSWin Transformer layout with focused linear ('L') or LePE softmax ('S') stages.

Registered timm models: ``flatten_cswin_t``, ``_s``, ``_b``, ``_b_384`` and the CSWin softmax baselines
``flatten_cswin_t_softmax`` ... ``flatten_cswin_b_384_softmax``; the experiment config reaches them through
the adapter for the official MODEL.TYPE names (``FLatten_CSWin_64_24181_tiny_224`` ...).

Weight decay: ``no_weight_decay()`` is the official rule ({'pos_embed', 'cls_token'}: names CSwin does not
have, so the focused-attention scales and positional encodings are decayed); ``extra_no_weight_decay()``
names our optional extra exclusions. Softmax branches use ``F.scaled_dot_product_attention`` unless a
hook is registered on their ``tap``.

``dynamic_img_size=True``: whole-map branches attend over the current map (linear positional encodings
resampled bicubically to it); stripe branches zero-pad the map to a multiple of the stripe width
(padded tokens take part as keys, as in the upstream CSWin segmentation backbone) and crop.

State-dict layout matches the official ``FLatten_CSWin_*`` models: ``stage1_conv_embed.{0,2}``,
``stage{i}.{j}.{qkv,norm1,proj,attns.{k},mlp,norm2}``, ``merge{i}.{conv,norm}``, ``norm``, ``head`` (the modules
live in ``stages[i-1].blocks`` / ``stages[i].merge``; state dicts and ``get_submodule`` use the official names,
:class:`models.builder.OfficialPaths`).

Token layout of one block (resolution R x R, C channels):
  * a branch attends inside rectangular windows ("stripes") of H_sp x W_sp tokens and adds a locally
    enhanced positional encoding (LePE): a 3x3 depth-wise conv ``get_v`` on V, run per window (zero
    padded at window borders);
  * with stripe width s < R there are two branches of C/2 channels and heads/2 each: branch 0 takes
    channels [:C/2] in vertical stripes (H_sp = R, W_sp = s), branch 1 channels [C/2:] in horizontal
    stripes (H_sp = s, W_sp = R); with s == R, and always in the last stage, one branch covers the whole
    map with all channels and heads (key ``attns.0``).

Stripe widths (official rules):
  * 'L' stages use ``la_split`` (MODEL.LA.CSWIN_LA_SPLIT_SIZE; one width per stage; the last stage ignores it). The
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

from typing import Any, Callable, Dict, Final, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from einops.layers.torch import Rearrange
from timm.layers import DropPath, Mlp, register_notrace_module, resample_abs_pos_embed, trunc_normal_
from timm.models._features import feature_take_indices

from state_dicts import unwrap_state_dict

from .config_adapter import ConfigKey, ConfigSection, ModelSpec, common_spec, config_section, register_config_adapter
from .focused_attention import ATTN_SOFTMAX, LA_SECTION, AttentionTap, FocusedLinearAttentionBase, merge_heads, split_heads
from .checkpoint_fit import fit_state_dict
from .builder import (OfficialPaths, SoftmaxTwin, Variant, build_backbone, flatten_pretrained_cfg, official_types,
                       register_family, softmax_twin_name, square_size)
from .layers import (ClassifierMixin, TokenGroups, check_input_size, init_weights, tokens_to_nchw,
                     tokens_to_nhwc)

torch.fx.wrap('check_input_size')       # a torch.fx leaf here too (see check_input_size)
PATCH_STRIDE = 4          # the 7x7 stride-4 convolutional stem
NUM_STAGES = 4
Grid = Tuple[int, int]


# ----------------------------------------------------------------------------- stripes
def stripe_shape(resolution: int, branch: int, split: int) -> Grid:
    """(H_sp, W_sp) of a branch: -1 whole map, 0 vertical stripes of width split, 1 horizontal ones."""
    if branch == -1:
        return resolution, resolution
    return (resolution, split) if branch == 0 else (split, resolution)


def runtime_window(hw: Grid, branch: int, split: int) -> Grid:
    """The window of a branch on an (H, W) map (any size): whole map, or full-height / full-width stripes."""
    if branch == -1:
        return hw[0], hw[1]
    return (hw[0], split) if branch == 0 else (split, hw[1])


def to_windows(x: torch.Tensor, hw: Grid, window: Grid) -> torch.Tensor:
    """(B, H*W, C) row-major tokens -> (B * nW, H_sp * W_sp, C), windows row-major within each image
    (the map is zero-padded on the bottom/right to window multiples, only at dynamic sizes)."""
    H, W = hw
    hs, ws = window
    ph, pw = (-H) % hs, (-W) % ws
    if ph > 0 or pw > 0:
        x = F.pad(x.reshape(x.shape[0], H, W, -1), (0, 0, 0, pw, 0, ph)).flatten(1, 2)
        H, W = H + ph, W + pw
    # reshape / permute written out (as einops' rearrange would run them): torch.fx traces these, not einops
    x = x.reshape(-1, H // hs, hs, W // ws, ws, x.shape[-1]).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, hs * ws, x.shape[-1])


def from_windows(x: torch.Tensor, hw: Grid, window: Grid) -> torch.Tensor:
    """Inverse of :func:`to_windows`: (B * nW, H_sp * W_sp, C) -> (B, H*W, C) (padding cropped)."""
    H, W = hw
    hs, ws = window
    Hp, Wp = H + (-H) % hs, W + (-W) % ws
    x = x.reshape(-1, Hp // hs, Wp // ws, hs, ws, x.shape[-1]).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(-1, Hp, Wp, x.shape[-1])
    return x[:, :H, :W].flatten(1, 2)


class StripeLePE:
    """Mixin for both branch kinds: the stripe geometry (``resolution``, ``branch``, ``split``, ``window``)
    and the LePE conv ``get_v``. (No class annotations: TorchScript takes attribute types from the first
    annotated class of the MRO only, which would hide FocusedLinearAttentionBase's ``focusing_factor: float``.)"""

    def init_stripes(self, resolution: int, branch: int, split: int, get_v: nn.Conv2d) -> None:
        self.resolution, self.branch, self.split = resolution, branch, split
        self.window = stripe_shape(resolution, branch, split)
        self.get_v = get_v

    def geometry(self, hw: Optional[Grid]) -> Tuple[Grid, Grid]:
        """(map grid, window) for this forward: the native ones, or those of an (H, W) map."""
        if hw is None or (hw[0] == self.resolution and hw[1] == self.resolution):
            return (self.resolution, self.resolution), self.window
        return (hw[0], hw[1]), runtime_window(hw, self.branch, self.split)

    def lepe(self, v: torch.Tensor, window: Optional[Grid] = None) -> torch.Tensor:
        """Per-window 3x3 depth-wise conv of v (B', H_sp*W_sp, C) -> same shape."""
        hs, ws = self.window if window is None else window
        maps = v.reshape(-1, hs, ws, v.shape[-1]).permute(0, 3, 1, 2)
        return self.get_v(maps).permute(0, 2, 3, 1).reshape(maps.shape[0], hs * ws, -1)

    def token_groups(self) -> TokenGroups:
        """Where each (window, token) of one image sits on the native R x R grid."""
        R = self.resolution
        index = torch.arange(R * R).view(1, R * R, 1)
        positions = to_windows(index, (R, R), self.window).squeeze(-1)
        return TokenGroups((R, R), positions, self.window)


def _get_v(dim: int) -> nn.Conv2d:
    return nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)


@register_notrace_module   # one fx node, as its focused-linear sibling: per-stripe reshapes add ~150 nodes a block
class LePEAttention(StripeLePE, nn.Module):
    """Softmax attention inside stripes plus LePE. q, k, v (B, H*W, C) -> (B, H*W, C)."""

    attn_kind = ATTN_SOFTMAX

    def __init__(self, dim: int, resolution: int, branch: int, split: int, num_heads: int,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.) -> None:
        super().__init__()
        self.init_stripes(resolution, branch, split, _get_v(dim))
        self.dim, self.num_heads = dim, num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_drop = nn.Dropout(attn_drop)
        self.tap = AttentionTap()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw: Optional[Grid] = None) -> torch.Tensor:
        grid, window = self.geometry(hw)
        q, k, v = to_windows(q, grid, window), to_windows(k, grid, window), to_windows(v, grid, window)
        lepe = self.lepe(v, window)
        q, k, vh = split_heads(q, self.num_heads), split_heads(k, self.num_heads), split_heads(v, self.num_heads)
        if not self.tap.hooked():
            out = F.scaled_dot_product_attention(q, k, vh, scale=self.scale,
                                                 dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = self.tap(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))   # (B', h, n, n)
            out = self.attn_drop(attn) @ vh
        return from_windows(merge_heads(out) + lepe, grid, window)

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}, resolution={self.resolution}, window={self.window}'


class FocusedLinearStripeAttention(StripeLePE, FocusedLinearAttentionBase):
    """Focused linear attention inside each stripe window, plus dwc and LePE.
    q, k, v (B, H*W, C) -> (B, H*W, C). Each window is attended separately (see the module docstring)."""

    def __init__(self, dim: int, resolution: int, branch: int, split: int, num_heads: int,
                 focusing_factor: float = 3, kernel_size: int = 5) -> None:
        get_v = _get_v(dim)                          # official draw order: get_v before dwc
        hs, ws = stripe_shape(resolution, branch, split)
        super().__init__(dim, num_heads, hs * ws, focusing_factor, kernel_size)
        self.init_stripes(resolution, branch, split, get_v)
        self.kv_grid: Grid = self.window
        self.dwc_last()

    def kv_positional_encoding(self, n: int) -> torch.Tensor:
        if self.kv_grid == self.window:
            return self.positional_encoding
        return resample_abs_pos_embed(self.positional_encoding, [self.kv_grid[0], self.kv_grid[1]],
                                      [self.window[0], self.window[1]],
                                      num_prefix_tokens=0, antialias=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw: Optional[Grid] = None) -> torch.Tensor:
        grid, window = self.geometry(hw)
        self.kv_grid = window
        q, k, v = to_windows(q, grid, window), to_windows(k, grid, window), to_windows(v, grid, window)
        out = self.attend(q, k, v, hw=window) + self.lepe(v, window)          # attend includes the dwc branch
        return from_windows(out, grid, window)

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, resolution={self.resolution}, window={self.window}'


# ----------------------------------------------------------------------------- blocks
class CSWinBlock(nn.Module):
    """Pre-norm block on (B, H*W, C): one or two stripe branches, proj, then MLP.
    (drop also drops after ``proj`` here; the official block skips its proj_drop. Shipped configs use 0.)"""

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

    def forward(self, x: torch.Tensor, hw: Optional[Grid] = None) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, L, 3, C).unbind(2)
        # a loop over the branches (each on its share of the channels; one branch: all of them, a full view):
        # TorchScript compiles both arms of an if, so no attns[1] written out for one-branch blocks
        h = C // len(self.attns)
        ys: List[torch.Tensor] = []
        for i, attn in enumerate(self.attns):
            ys.append(attn(q[..., i * h:(i + 1) * h], k[..., i * h:(i + 1) * h], v[..., i * h:(i + 1) * h], hw))
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
        x = x + self.drop_path(self.proj_drop(self.proj(y)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def token_groups(self, attn: nn.Module) -> TokenGroups:
        """The stripe layout of branch ``attn`` (native size)."""
        return attn.token_groups()

    def extra_repr(self) -> str:
        return f'resolution={self.resolution}, split={self.split}, branches={len(self.attns)}'


class MergeBlock(nn.Module):
    """(B, H*W, C) -> (B, H/2*W/2, C_out): 3x3 stride-2 conv, LayerNorm."""

    def __init__(self, dim: int, dim_out: int, resolution: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.conv = nn.Conv2d(dim, dim_out, 3, 2, 1)
        self.norm = nn.LayerNorm(dim_out)

    def forward(self, x: torch.Tensor, hw: Optional[Grid] = None) -> torch.Tensor:
        return self.forward_grid(x, hw)[0]

    def forward_grid(self, x: torch.Tensor, hw: Optional[Grid] = None) -> Tuple[torch.Tensor, Grid]:
        x = self.conv(tokens_to_nchw(x, (self.resolution, self.resolution) if hw is None else hw))
        return self.norm(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])), (x.shape[-2], x.shape[-1])


class CSWinStage(nn.Module):
    """One CSwin stage: the merge from the previous stage (none in stage 1), then the blocks.
    (B, H*W, C) tokens and their grid -> (B, h*w, C_out) tokens, (h, w)."""

    dynamic: Final[bool]

    def __init__(self, merge: Optional[MergeBlock], blocks: nn.ModuleList, resolution: int, dynamic: bool) -> None:
        super().__init__()
        self.merge = merge
        self.blocks = blocks
        self.resolution: Grid = (resolution, resolution)
        self.dynamic = dynamic

    def forward(self, x: torch.Tensor, hw: Grid, use_checkpoint: bool = False) -> Tuple[torch.Tensor, Grid]:
        if self.merge is not None:
            x, hw = self.merge.forward_grid(x, hw)
        # the blocks get no grid at the stage's native map (a fixed-size model sees only those, checked on the
        # input: no comparison on traced shapes)
        grid: Optional[Grid] = None if not self.dynamic or hw == self.resolution else hw
        for blk in self.blocks:
            if not torch.jit.is_scripting() and use_checkpoint and x.requires_grad:
                x = checkpoint(blk, x, grid, use_reentrant=False)
            else:
                x = blk(x, grid)
        return x, hw


# ----------------------------------------------------------------------------- model
def stage_splits(img_size: int, attn_type: str, la_split: Sequence[int],
                 softmax_split: Sequence[int]) -> List[int]:
    """The stripe width of each stage, checked against the stage resolution (ValueError if it does not
    tile). 'L': la_split; 'S': the architecture's width clamped to the resolution. The last stage is one
    whole-map branch whatever the width, so its width is the resolution."""
    if len(attn_type) != NUM_STAGES or set(attn_type) - {'L', 'S'}:
        raise ValueError(f"attn_type must be {NUM_STAGES} letters from 'L'/'S' for CSwin, got {attn_type!r}")
    if len(la_split) != NUM_STAGES:
        raise ValueError(f'la_split={tuple(la_split)} needs one width per stage ({NUM_STAGES})')
    if img_size % (PATCH_STRIDE * 2 ** (NUM_STAGES - 1)):
        raise ValueError(f'img_size {img_size} must be a multiple of {PATCH_STRIDE * 2 ** (NUM_STAGES - 1)} '
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
                raise ValueError(
                    f"la_split: stage {i + 1} width {s} does not tile its {res}x{res} map "
                    f"(img_size {img_size}); use divisors of the stage sizes, e.g. "
                    f"'{'-'.join(str(img_size // (PATCH_STRIDE * 2 ** j)) for j in range(NUM_STAGES))}'")
        else:
            s = min(softmax_split[i], res)
            if res % s:
                raise ValueError(f'img_size {img_size}: stage {i + 1} map {res}x{res} is not divisible by its '
                                 f'softmax stripe width {s}; use an image size whose stage maps it divides (e.g. 224)')
        splits.append(s)
    return splits


class FLattenCSWinTransformer(OfficialPaths, ClassifierMixin, nn.Module):
    """FLatten-CSwin. forward: (B, 3, S, S) -> (B, num_classes); forward_features -> normed (B, S/32, S/32, C).

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
                 kernel_size: int = 5, global_pool: str = 'avg', dynamic_img_size: bool = False) -> None:
        super().__init__()
        img_size = square_size(img_size)
        if isinstance(la_split, str):
            la_split = [int(s) for s in la_split.split('-')]
        for name, value in (('depths', depths), ('num_heads', num_heads), ('softmax_split', softmax_split)):
            if len(value) != NUM_STAGES:
                raise ValueError(f'{name}={tuple(value)} needs one entry per stage ({NUM_STAGES})')
        splits = stage_splits(img_size, attn_type, la_split, softmax_split)
        self.num_classes, self.img_size, self.global_pool = num_classes, img_size, global_pool
        self.use_checkpoint, self.dynamic_img_size = use_checkpoint, dynamic_img_size
        self.num_stages = NUM_STAGES
        res = img_size // PATCH_STRIDE
        self.stage1_conv_embed = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim, 7, PATCH_STRIDE, 2),
            Rearrange('b c h w -> b (h w) c'),
            nn.LayerNorm(embed_dim))
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        dim = embed_dim
        self.feature_info = []
        stages = []
        for i in range(NUM_STAGES):
            merge = None
            if i > 0:
                merge = MergeBlock(dim, dim * 2, res)
                dim, res = dim * 2, res // 2
            first = sum(depths[:i])
            stages.append(CSWinStage(merge, nn.ModuleList([
                CSWinBlock(dim, res, num_heads[i], splits[i], attn_type[i], last_stage=i == NUM_STAGES - 1,
                           mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                           attn_drop=attn_drop_rate, drop_path=dpr[first + j],
                           focusing_factor=focusing_factor, kernel_size=kernel_size)
                for j in range(depths[i])]), res, dynamic_img_size))
            self.feature_info.append(dict(num_chs=dim, reduction=PATCH_STRIDE * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.ModuleList(stages)
        self.num_features = self.head_hidden_size = dim
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=.02)      # the official extra draw before the model init
        self.apply(init_weights)
        self.use_official_keys([(f'stages.{i}.merge', f'merge{i}') for i in range(1, NUM_STAGES)] +
                               [(f'stages.{i}.blocks', f'stage{i + 1}') for i in range(NUM_STAGES)])

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The official rule (names CSwin does not have: the scales / positional encodings are decayed)."""
        return {'pos_embed', 'cls_token'}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.use_checkpoint = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], Tuple[float, ...]]:
        return self.official_group_matcher(dict(
            stem=r'^stage1_conv_embed',
            blocks=r'^(?:stage|merge)(\d+)' if coarse else [(r'^merge(\d+)', (0,)), (r'^stage(\d+)\.(\d+)', None),
                                                           (r'^norm', (99999,))]))

    def _stem(self, x: torch.Tensor) -> Tuple[torch.Tensor, Grid]:
        """(B, 3, S, S) -> stage-1 tokens (B, S/4 * S/4, C) and their grid."""
        if not self.dynamic_img_size:
            x = check_input_size(x, (self.img_size, self.img_size))
        x = self.stage1_conv_embed[0](x)
        hw = (x.shape[-2], x.shape[-1])
        return self.stage1_conv_embed[2](x.flatten(2).transpose(1, 2)), hw

    def _forward_stages(self, x: torch.Tensor, take: List[int], stop: int, norm_at: int = -1
                        ) -> Tuple[torch.Tensor, Grid, List[torch.Tensor]]:
        """The stage loop (eager, fx and TorchScript): image -> tokens of stage ``stop`` (0-based), their grid,
        and the (B, C_i, H_i, W_i) maps of the stages in ``take`` (stage ``norm_at``'s through the final norm)."""
        x, hw = self._stem(x)
        maps: List[torch.Tensor] = []
        for i, stage in enumerate(self.stages):
            if i <= stop:
                x, hw = stage(x, hw, self.use_checkpoint)
                if i in take:
                    maps.append(tokens_to_nchw(self.norm(x) if i == norm_at else x, hw))
        return x, hw, maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> normed last-stage map (B, S/32, S/32, C) (``output_fmt`` 'NHWC')."""
        x, hw, _ = self._forward_stages(x, [], len(self.stages) - 1)
        return tokens_to_nhwc(self.norm(x), hw)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """Stage maps (B, C_i, H/(4*2^i), W/(4*2^i)) of ``indices``; ``norm`` applies the final norm to the
        last stage. Returns ``[maps]`` or ``(forward_features output, [maps])``."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt={output_fmt!r}: only 'NCHW' is supported")
        last = self.num_stages - 1
        take, max_index = feature_take_indices(self.num_stages, indices)
        stop = max_index if (stop_early or intermediates_only) else last
        x, hw, out = self._forward_stages(x, list(take), stop, NUM_STAGES - 1 if norm else -1)
        if intermediates_only:
            return out
        return tokens_to_nhwc(self.norm(x) if stop == last else x, hw), out

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take, max_index = feature_take_indices(self.num_stages, indices)
        self.stages = self.stages[:max_index + 1]
        self.num_stages = max_index + 1
        if prune_norm or max_index < NUM_STAGES - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_filter_fn(state_dict: Dict[str, Any], model: FLattenCSWinTransformer) -> Dict[str, torch.Tensor]:
    """An official (or our) checkpoint -> this model's state dict: unwraps the official wrappings
    (``model`` / ``state_dict`` / EMA, ``module.``) and resizes the focused-attention positional
    encodings (bicubic, ``timm.layers.resample_abs_pos_embed``) to the model's stripe windows (the old
    window is taken to have the new one's aspect: a whole-map branch stays square), and refuses a checkpoint
    of another model (:func:`models.checkpoint_fit.fit_state_dict`)."""
    modules = dict(model.named_modules())
    return fit_state_dict(unwrap_state_dict(state_dict), model, grid_of=lambda k: getattr(
        modules.get(model.official_keys.ours(k.rsplit('.', 1)[0])), 'window', None))


# ----------------------------------------------------------------------------- registry
def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return flatten_pretrained_cfg('stage1_conv_embed.0', url, **kwargs)


def _create(name: str, pretrained: bool = False, **kwargs: Any) -> FLattenCSWinTransformer:
    return build_backbone(FLattenCSWinTransformer, name, pretrained, checkpoint_filter_fn, **kwargs)


_HIRES = dict(input_size=(3, 384, 384), crop_pct=1.0)
# official MODEL.TYPE names and shapes; attention 'LLSS' (the class default)
CSWIN_VARIANTS = register_family(__name__, _create, _cfg, {
    'flatten_cswin_t': Variant(dict(embed_dim=64, depths=(2, 4, 18, 1), num_heads=(2, 4, 8, 16), softmax_split=(1, 2, 7, 7)),
                               dict(url='https://cloud.tsinghua.edu.cn/f/48ba765ba8b0451d9d5a/?dl=1'),
                               'FLatten_CSWin_64_24181_tiny_224'),
    'flatten_cswin_s': Variant(dict(embed_dim=64, depths=(2, 4, 32, 2), num_heads=(2, 4, 8, 16), softmax_split=(1, 2, 7, 7)),
                               official_type='FLatten_CSWin_64_24322_small_224'),
    'flatten_cswin_b': Variant(dict(embed_dim=96, depths=(3, 6, 29, 2), num_heads=(4, 8, 16, 32), softmax_split=(1, 2, 7, 7)),
                               official_type='FLatten_CSWin_96_36292_base_224'),
    'flatten_cswin_b_384': Variant(dict(embed_dim=96, depths=(3, 6, 29, 2), num_heads=(4, 8, 16, 32),
                                        softmax_split=(1, 2, 12, 12), img_size=384, la_split=(96, 48, 24, 12)),
                                   _HIRES, 'FLatten_CSWin_96_36292_base_384'),
}, SoftmaxTwin(dict(attn_type='SSSS'), dict(paper_ids='arXiv:2107.00652', paper_name='CSWin Transformer', notes=(
    'softmax baseline of FLatten-CSwin (CSWin layout, LePE stripes); no official weights in the FLatten release',))))


# ----------------------------------------------------------------------------- experiment config
CSWIN_SECTION = config_section(ConfigSection('CSWIN', (      # (ours) sizes of a scaled model
    ConfigKey('IN_CHANS', 3, 'in_chans'),
    ConfigKey('EMBED_DIM', 0, 'embed_dim', keep=0, doc="0 = the variant's"),
    ConfigKey('DEPTHS', [], 'depths', keep=[]),
    ConfigKey('NUM_HEADS', [], 'num_heads', keep=[]),
    ConfigKey('SPLIT_SIZE', [], 'softmax_split', keep=[], doc='softmax stripe widths per stage'),
    ConfigKey('MLP_RATIO', 0., 'mlp_ratio', keep=0., doc="0 = the variant's (4)"),
)))
CSWIN_LA_KEYS = ('CSWIN_LA_SPLIT_SIZE', 'ATTN_TYPE', 'FOCUSING_FACTOR', 'KERNEL_SIZE')


@register_config_adapter(*official_types(CSWIN_VARIANTS), reads=(CSWIN_SECTION, (LA_SECTION, CSWIN_LA_KEYS)))
def cswin_spec(config) -> ModelSpec:
    """MODEL.TYPE FLatten_CSWin_*: the official architecture, overridden by non-empty MODEL.CSWIN size keys;
    attention from MODEL.LA."""
    name = official_types(CSWIN_VARIANTS)[config.MODEL.TYPE]
    spec = common_spec(config, softmax_twin_name(name, config.MODEL.LA.ATTN_TYPE))
    spec.kwargs.update(CSWIN_VARIANTS[name].arch)
    spec.set('img_size', config.DATA.IMG_SIZE, 'DATA.IMG_SIZE')
    spec.read(config, CSWIN_SECTION).read(config, LA_SECTION, CSWIN_LA_KEYS)
    return spec.checked(stage_splits, 'img_size', 'attn_type', 'la_split', 'softmax_split')
