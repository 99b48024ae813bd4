"""Small pieces shared by the families: weight init, the (checkpointed) block loop, patch embedding, and the
one window attention (partition/reverse, relative position bias index, shifted-window mask) that every
family with windows (Swin, DAT++ 'L'/'S', L2ViT, Visformer v2) uses."""

import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from timm.layers import PatchEmbed as TimmPatchEmbed
from timm.layers import trunc_normal_

from .focused_attention import ATTN_LINEAR, ATTN_SOFTMAX, AttentionTap, AttentionTap3  # noqa: F401


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


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, use_checkpoint: bool, *args) -> torch.Tensor:
    """Apply blocks in order (``blk(x, *args)``), with activation checkpointing when asked and gradients
    are on."""
    for blk in blocks:
        if use_checkpoint and x.requires_grad:
            x = cp.checkpoint(blk, x, *args, use_reentrant=False)
        else:
            x = blk(x, *args)
    return x


@dataclass(frozen=True)
class TokenGroups:
    """How a block hands its (H, W) token grid to one attention module (the token-layout protocol that
    ``visualize`` reads through ``block.token_groups(attn_module)``).

    grid: the block's (H, W) token grid; positions: (groups, N) long, flat grid index (row * W + col) of
    every query token of every group of ONE image, in the order the attention sees them; window: the
    (h, w) shape of one group, the image a depth-wise conv in the attention runs on; keys_reduced: keys
    are a spatially reduced copy of the tokens (no per-key position); prefix: tokens with no grid position
    (class, distillation, register tokens) that come first in every group, before the positioned ones."""
    grid: Tuple[int, int]
    positions: torch.Tensor
    window: Tuple[int, int]
    keys_reduced: bool = False
    prefix: int = 0

    def locate(self, row: int, col: int) -> Tuple[int, int]:
        """(group, token) of grid cell (row, col)."""
        hit = (self.positions == row * self.grid[1] + col).nonzero()
        return int(hit[0, 0]), int(hit[0, 1])


def whole_grid(hw: Tuple[int, int], keys_reduced: bool = False, prefix: int = 0) -> TokenGroups:
    """Every token of the (H, W) map in one row-major group, after ``prefix`` unpositioned tokens."""
    return TokenGroups(tuple(hw), torch.arange(hw[0] * hw[1]).unsqueeze(0), tuple(hw), keys_reduced, prefix)


def tokens_to_nchw(x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) row-major tokens -> (B, C, H, W)."""
    B, _, C = x.shape
    return x.transpose(1, 2).reshape(B, C, hw[0], hw[1])


def tokens_to_nhwc(x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) row-major tokens -> (B, H, W, C) (a view)."""
    return x.reshape(x.shape[0], hw[0], hw[1], x.shape[-1])


_EXTRA_NO_DECAY = re.compile(r'(^|\.)(scale|positional_encoding|pos_embed\d*)$')


# The global poolings every family's head implements (timm's names): 'avg', 'max', 'avgmax' (the mean of
# both) over all positions, or '' (no pooling: the linear head is applied at every position).
GLOBAL_POOLS = ('avg', 'max', 'avgmax', '')


def check_global_pool(global_pool: Any, model: str = 'this model') -> str:
    """``global_pool`` when the heads implement it, else a ValueError naming it and the supported values."""
    if not isinstance(global_pool, str) or global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool={global_pool!r} is not supported by {model}; use 'avg', 'max', 'avgmax' "
                         f"or '' (no pooling: the head is applied at every position)")
    return global_pool


def pool_features(x: torch.Tensor, global_pool: str, fmt: str) -> torch.Tensor:
    """Global pooling of features laid out as ``fmt``: 'NLC' (B, N, C), 'NHWC' (B, H, W, C) or 'NCHW'
    (B, C, H, W) -> (B, C); ``global_pool`` '' returns ``x`` unchanged."""
    if global_pool == '':
        return x
    dims = [2, 3] if fmt == 'NCHW' else ([1, 2] if fmt == 'NHWC' else [1])
    if global_pool == 'max':
        return x.amax(dim=dims)
    if global_pool == 'avgmax':
        return 0.5 * (x.mean(dim=dims) + x.amax(dim=dims))
    return x.mean(dim=dims)


class LinearHeadMixin:
    """timm's classifier accessors for every family: a linear head (named ``head_name``) on ``num_features``
    pooled channels. ``global_pool`` is checked whenever it is set (construction, ``reset_classifier``, or
    assignment): one of :data:`GLOBAL_POOLS`, pooled by :func:`pool_features`."""

    head_name = 'head'
    num_classes: int
    num_features: int

    @property
    def global_pool(self) -> str:
        return self._global_pool

    @global_pool.setter
    @torch.jit.unused           # set in Python only; scripted code reads it
    def global_pool(self, value: str) -> None:
        self._global_pool = check_global_pool(value, type(self).__name__)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return getattr(self, self.head_name)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            self.global_pool = global_pool
        self.num_classes = num_classes
        setattr(self, self.head_name, nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity())

    def nchw_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """forward_head of a family whose features are (B, C, H, W): pooled -> (B, num_classes) logits (pooled
        (B, C) with ``pre_logits``); unpooled (``global_pool=''``) the head acts as a 1x1 conv:
        (B, num_classes, H, W)."""
        x = pool_features(x, self.global_pool, 'NCHW')
        if pre_logits:
            return x
        return self.head_logits(x) if self.global_pool else self.head_logits(x.movedim(1, -1)).movedim(-1, 1)

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The linear head on (..., C) features. Named, not looked up by ``head_name`` (TorchScript finds modules
        by literal names only): a family whose head has another name overrides this."""
        return self.head(x)


class StageCheckpointing:
    """``set_grad_checkpointing`` of a model whose ``stages`` each keep their own ``grad_checkpointing`` flag
    (DAT++, L2ViT, Visformer)."""

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable


class ClassifierMixin(LinearHeadMixin):
    """The timm head contract shared by the FLatten families: ``forward_features`` gives the last-stage map
    (B, H, W, C) (``output_fmt`` 'NHWC', as timm's Swin), the head pools it (``global_pool``; '' keeps the
    positions: (B, H, W, num_classes) logits) and applies ``head``."""

    output_fmt: str = 'NHWC'

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, H, W, C) map -> (B, num_classes) logits, or pooled (B, C) with ``pre_logits``."""
        x = pool_features(x, self.global_pool, 'NHWC')
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def extra_no_weight_decay(self) -> set:
        """Full names of OUR optional no-decay exclusions (not the official recipe, which decays them): the
        focused-attention ``scale`` and ``positional_encoding`` and numbered position embeddings."""
        return {n for n, _ in self.named_parameters() if _EXTRA_NO_DECAY.search(n)}


class PatchEmbed(TimmPatchEmbed):
    """timm's non-overlapping patch projection (keys ``proj`` / ``norm``): (B, C_in, H, W) -> (B, H/p * W/p, C),
    optional LayerNorm. Ours adds ``forward_grid`` (the families need the token grid) and reports an input of
    the wrong size as a ValueError naming the fix instead of timm's assertion."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, norm: bool,
                 dynamic_img_size: bool = False) -> None:
        super().__init__(img_size, patch_size, in_chans, embed_dim, norm_layer=nn.LayerNorm if norm else None,
                         strict_img_size=not dynamic_img_size, dynamic_img_pad=dynamic_img_size)
        self.dynamic_img_size = dynamic_img_size

    def forward_grid(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """(B, C_in, H, W) -> ((B, H/p * W/p, C), (H/p, W/p)). With ``dynamic_img_size`` any size is taken
        (the image is zero-padded on the bottom/right to a multiple of the patch); otherwise it must be
        ``img_size``."""
        if not self.dynamic_img_size:
            x = check_input_size(x, self.img_size)
        hw = (x.shape[-2], x.shape[-1])
        return self.forward(x), self.dynamic_feat_size(hw)     # timm's forward (TorchScript has no super())


def check_input_size(x: torch.Tensor, img_size: Tuple[int, int]) -> torch.Tensor:
    """``x`` (B, C, H, W) unchanged; a ValueError when (H, W) is not a fixed-size model's ``img_size``. A
    torch.fx leaf (``torch.fx.wrap`` here and in each module that calls it): a traced model keeps the check
    and runs it on the real input."""
    if x.shape[-2] != img_size[0] or x.shape[-1] != img_size[1]:
        raise ValueError(f'input size ({x.shape[-2]}, {x.shape[-1]}) does not match the model '
                         f'({img_size[0]}, {img_size[1]}); set DATA.IMG_SIZE to the input size '
                         f'(or build with dynamic_img_size=True)')
    return x


torch.fx.wrap('check_input_size')


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/w * W/w, w*w, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, C)


def window_reverse(windows: torch.Tensor, window: int, H: int, W: int) -> torch.Tensor:
    """(B * H/w * W/w, w*w, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window, W // window, window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def relative_position_index(window: int) -> torch.Tensor:
    """(w*w, w*w) int64 index into a ((2w-1)^2, heads) bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing='ij')).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(resolution: Tuple[int, int], window: int, shift: int) -> torch.Tensor:
    """(nW, w*w, w*w) additive mask: 0 within a region of the rolled map, -100 across regions. The rolled map
    has 3 bands per axis (the last ``window`` rows split at ``shift`` from the end); region = 3 * row band +
    column band."""
    H, W = resolution
    rows = (torch.arange(H) >= H - window).long() + (torch.arange(H) >= H - shift).long()     # band 0, 1, 2
    cols = (torch.arange(W) >= W - window).long() + (torch.arange(W) >= W - shift).long()
    regions = (rows.view(H, 1) * 3 + cols.view(1, W)).float().view(1, H, W, 1)
    ids = window_partition(regions, window).squeeze(-1)                      # (nW, w*w)
    diff = ids.unsqueeze(1) - ids.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution applied to channels-last tokens: (..., C_in) -> (..., C_out). The weight keeps the
    Conv2d shape (C_out, C_in, 1, 1) of checkpoints whose projections are 1x1 convs (Visformer)."""

    def __init__(self, in_chans: int, out_chans: int, bias: bool = True) -> None:
        super().__init__(in_chans, out_chans, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.flatten(1), self.bias)


class WindowAttention(nn.Module):
    """Window softmax attention, by default with a relative position bias. x (B*nW, w*w, C) -> same shape.

    Uses ``F.scaled_dot_product_attention`` unless a hook is registered on ``tap`` (then the explicit
    probabilities are computed and passed through the tap, for ``visualize``).

    Options for the families that share it: ``rel_pos_bias=False`` (no table, no index: L2ViT's local
    windows, Visformer-v1's global attention, where ``window`` only names the token grid), ``proj_bias``,
    and ``pointwise=True`` (qkv/proj weights stored as 1x1 conv kernels, as Visformer's)."""

    attn_kind = ATTN_SOFTMAX

    def __init__(self, dim: int, window: int, num_heads: int, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0., proj_drop: float = 0.,
                 rel_pos_bias: bool = True, proj_bias: bool = True, pointwise: bool = False) -> None:
        super().__init__()
        self.dim, self.window, self.num_heads = dim, window, num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        if rel_pos_bias:
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
            self.register_buffer('relative_position_index', relative_position_index(window))
        else:
            self.relative_position_bias_table = None
        linear = PointwiseConv if pointwise else nn.Linear
        self.qkv = linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.tap = AttentionTap()
        if rel_pos_bias:   # drawn after the projections: the official (Swin) order of random draws
            trunc_normal_(self.relative_position_bias_table, std=.02)

    def attn_bias(self, mask: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
        """The additive logits bias: relative position bias (1, h, N, N) plus ``mask`` (nW, N, N) repeated
        over the ``batch`` windows -> (batch, h, N, N); None when there is neither."""
        bias: Optional[torch.Tensor] = None
        if self.relative_position_bias_table is not None:
            N = self.relative_position_index.shape[0]
            bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
            bias = bias.view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            m = mask.unsqueeze(1) if bias is None else bias + mask.unsqueeze(1)
            bias = m.repeat(batch // nW, 1, 1, 1)
        return bias

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.attend_windows(x, mask)

    def attend_windows(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`forward`, callable by subclasses that change its signature (TorchScript has no ``super()``)."""
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if not self.tap.hooked():     # nothing reads the probabilities: fused attention
            bias = self.attn_bias(mask, B_)
            if bias is not None:
                bias = bias.to(q.dtype)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale,
                                               dropout_p=self.attn_drop.p if self.training else 0.)
            return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, C)))
        attn = (q * self.scale) @ k.transpose(-2, -1)                         # (B_, h, N, N)
        if self.relative_position_bias_table is not None:
            bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
            attn = attn + bias.view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = (attn.view(B_ // nW, nW, self.num_heads, N, N) + mask[None, :, None]).view(B_, -1, N, N)
        attn = self.tap(attn.softmax(dim=-1))
        x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f'dim={self.dim}, window={self.window}, num_heads={self.num_heads}'
