"""Focused linear attention in any timm ViT: ``convert_attention(model, 'focused_linear', ...)``.

Covered: models whose blocks hold timm's ViT attention (``timm.layers.Attention``, the ``Attention`` of
``timm.models.vision_transformer``) in ``model.blocks[i].attn``, with a ``patch_embed`` that has a
``grid_size`` and a ``num_prefix_tokens`` count: ViT, DeiT (distilled too), DeiT-III, ViTs with register
tokens, FLatten-DeiT-T. Anything else stops with one line naming the model and the attention class it has.

The converted attention keeps the block's ``qkv`` and ``proj`` (and its q/k norms and output norm, when the
ViT has them) under their names, so a softmax checkpoint of the same model loads; it adds the official
FocusedLinearAttention parameters, under the official names and shapes:

* ``scale`` (1, 1, C): softplus(scale) divides q and k before the focusing function;
* ``positional_encoding`` (1, N, C): learned, added to k, over ALL N tokens (prefix tokens included);
* ``dwc``: depth-wise Conv2d over head_dim channels (kernel ``kernel_size``), one kernel shared by all heads,
  on V of the patch tokens laid out as their (H, W) grid, added to the output of those tokens.

Prefix tokens (class, distillation, register tokens) attend and are attended like patch tokens (they are
queries, keys and values of the one linear attention); they have no place in the DWC grid, so their output
gets no DWC term. With no prefix token the block computes what the official module of
``models/flatten_pvt.py`` computes with sr_ratio 1 (q = the first third of ``qkv``, kv = the rest).

Table 4 of the paper as options: ``focused=False, dwc=False`` (vanilla linear attention: phi = ReLU + 1e-6,
no power, no learned scale), ``focused=True, dwc=False`` (+ focused function), defaults (+ DWC).
The maths is :class:`~models.focused_attention.FocusedLinearAttentionBase`'s (float16 / bfloat16 safe: the
kernel and product run in float32).
"""

import logging
import math
from typing import Any, Dict, Final, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, resample_abs_pos_embed

from .checkpoint_fit import resample_position_table
from .focused_attention import FocusedLinearAttentionBase

_logger = logging.getLogger(__name__)

KINDS = ('focused_linear',)
Grid = Tuple[int, int]
# raw scale whose softplus is 1: the vanilla setting's fixed (not learned) scale
_UNIT_SCALE = math.log(math.e - 1.0)


class FocusedLinearViTAttention(FocusedLinearAttentionBase):
    """timm's ViT attention computed as focused linear attention. x (B, P + H*W, C) -> same shape, P prefix
    tokens first (timm's layout). Built from the :class:`timm.layers.Attention` it replaces (its modules are
    reused, not copied)."""

    num_prefix_tokens: Final[int]
    use_dwc: Final[bool]
    qk_norm: Final[bool]
    focused: Final[bool]

    def __init__(self, attn: Attention, grid: Grid, num_prefix_tokens: int, focusing_factor: float = 3,
                 kernel_size: int = 5, dwc: bool = True, focused: bool = True) -> None:
        if getattr(attn, 'gate', None) is not None:
            raise ValueError('gated timm attention is not covered by focused linear attention')
        grid = (int(grid[0]), int(grid[1]))
        super().__init__(attn.attn_dim, attn.num_heads, num_prefix_tokens + grid[0] * grid[1],
                         float(focusing_factor) if focused else 1.0, kernel_size)
        self.grid: Grid = grid
        self.dynamic_grid: Grid = grid          # eager dynamic_img_size: the current grid (set per forward)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.use_dwc, self.focused = bool(dwc), bool(focused)
        self.qk_norm = not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity))
        if not focused:     # phi = relu + eps: power 1 and softplus(scale) = 1, not learned
            del self.scale
            self.register_buffer('scale', torch.full((1, 1, attn.attn_dim), _UNIT_SCALE), persistent=False)
        if not dwc:
            self.dwc = nn.Identity()    # never called (use_dwc is a constant); keeps the module scriptable
        self.qkv, self.q_norm, self.k_norm = attn.qkv, attn.q_norm, attn.k_norm
        self.norm, self.proj, self.proj_drop = attn.norm, attn.proj, attn.proj_drop
        self.dwc_last()

    def token_grid(self, n: int) -> Grid:
        """The (H, W) layout of n patch tokens: the native grid, the grid of the current input
        (``dynamic_img_size``), else the native aspect ratio (a square for square models)."""
        H, W = self.grid
        if H * W == n:
            return self.grid
        h, w = self.dynamic_grid
        if h * w == n:
            return self.dynamic_grid
        h = int(round(math.sqrt(n * H / W)))
        w = n // max(h, 1)
        if h * w != n:
            raise ValueError(f'{n} patch tokens do not form a grid of the aspect {H}x{W}: run other aspect '
                             f'ratios with dynamic_img_size=True')
        return (h, w)

    def kv_positional_encoding(self, n: int) -> torch.Tensor:
        """The (1, n, C) encoding: the learned one, resampled (bicubic, prefix rows kept) at another grid."""
        if n == self.positional_encoding.shape[1]:
            return self.positional_encoding
        return resample_abs_pos_embed(self.positional_encoding, list(self.token_grid(n - self.num_prefix_tokens)),
                                      list(self.grid), num_prefix_tokens=self.num_prefix_tokens, antialias=False)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError('focused linear attention takes no attention mask (attn_mask / is_causal); '
                             'run the model without one')
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, C).unbind(2)                   # (B, N, C) views
        if self.qk_norm:
            h = self.num_heads
            q = self.q_norm(q.reshape(B, N, h, C // h)).reshape(B, N, C)
            k = self.k_norm(k.reshape(B, N, h, C // h)).reshape(B, N, C)
        P = self.num_prefix_tokens
        if not self.use_dwc:
            out = self.attend(q, k, v)
        elif P == 0:
            out = self.attend(q, k, v, hw=self.token_grid(N))
        else:       # the DWC runs on the patch tokens' grid only; prefix tokens get no DWC term
            conv = self.rank_restoration(v[:, P:], self.token_grid(N - P))
            out = self.attend(q, k, v) + F.pad(conv, (0, 0, P, 0))
        return self.proj_drop(self.proj(self.norm(out)))

    def extra_repr(self) -> str:
        kernel = self.dwc.kernel_size[0] if isinstance(self.dwc, nn.Conv2d) else 0
        return (f'dim={self.dim}, num_heads={self.num_heads}, focusing_factor={self.focusing_factor}, '
                f'focused={self.focused}, grid={self.grid}, prefix_tokens={self.num_prefix_tokens}, '
                f'dwc_kernel={kernel or None}')


class _GridRecorder:
    """Forward pre-hook of ``patch_embed`` (models built with ``dynamic_img_size``): tells the converted
    attentions the patch grid of the current input. A bound method of this object is the hook, so a deep copy
    of the model (EMA) gets a recorder of its own attentions."""

    def __init__(self, attns: List[FocusedLinearViTAttention]) -> None:
        self.attns = attns

    def hook(self, patch_embed: nn.Module, args: Tuple[Any, ...]) -> None:
        grid = tuple(int(s) for s in patch_embed.dynamic_feat_size(args[0].shape[-2:]))
        for attn in self.attns:
            attn.dynamic_grid = grid


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture') or type(model).__name__


def convert_attention(model: nn.Module, kind: str = 'focused_linear', blocks: Optional[Sequence[int]] = None,
                      focusing_factor: float = 3, kernel_size: int = 5, dwc: bool = True,
                      focused: bool = True) -> nn.Module:
    """Replace, in place, the attention of ``model.blocks[i]`` (``blocks``: indices, default all) by
    :class:`FocusedLinearViTAttention` and return the model. ``focused=False`` / ``dwc=False`` give the
    ablation settings of the paper's Table 4. ValueError (one line, naming the model) for a model or a setting
    the switch does not cover."""
    name = _model_name(model)
    if kind not in KINDS:
        raise ValueError(f"attention kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    if kernel_size <= 0 or kernel_size % 2 == 0:
        raise ValueError(f'kernel_size must be a positive odd number, got {kernel_size}')
    grid = getattr(getattr(model, 'patch_embed', None), 'grid_size', None)
    layers = getattr(model, 'blocks', None)
    if grid is None or layers is None or not hasattr(model, 'num_prefix_tokens'):
        raise ValueError(f"{name} ({type(model).__name__}) is not a timm ViT-style model (blocks[i].attn, "
                         f"patch_embed.grid_size, num_prefix_tokens): convert_attention('{kind}') covers timm's "
                         f"ViT, DeiT, DeiT-III and register-token ViTs")
    count = len(layers)
    chosen = list(range(count)) if blocks is None or len(blocks) == 0 else [int(b) for b in blocks]
    bad = [b for b in chosen if not -count <= b < count]
    if bad:
        raise ValueError(f'blocks {bad} out of range for {name} with {count} blocks; give indices 0..{count - 1}')
    converted = []
    for i in sorted({b % count for b in chosen}):
        attn = getattr(layers[i], 'attn', None)
        if type(attn) is not Attention:
            what = type(attn).__name__ if attn is not None else 'no attn'
            raise ValueError(f"{name} block {i} has {what}, not timm's ViT Attention: convert_attention('{kind}') "
                             f"covers timm's ViT, DeiT, DeiT-III and register-token ViTs")
        if attn.attn_dim % attn.num_heads or getattr(attn, 'gate', None) is not None:
            raise ValueError(f'{name} block {i}: gated or non-standard-width attention is not covered')
        new = FocusedLinearViTAttention(attn, grid, model.num_prefix_tokens, focusing_factor, kernel_size,
                                        dwc, focused)
        layers[i].attn = new.to(device=attn.qkv.weight.device, dtype=attn.qkv.weight.dtype)
        converted.append(layers[i].attn)
    if getattr(model, 'dynamic_img_size', False):
        model.patch_embed.register_forward_pre_hook(_GridRecorder(converted).hook)
    _logger.debug('%s: %d blocks use focused linear attention', name, len(converted))
    return model


def converted_modules(model: nn.Module) -> Dict[str, FocusedLinearViTAttention]:
    """Qualified name -> converted attention, for every converted block of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FocusedLinearViTAttention)}


def fill_converted_state(state_dict: Dict[str, Any], model: nn.Module) -> Tuple[Dict[str, Any], List[str]]:
    """A checkpoint's state_dict fitted to a converted model: the focused-linear parameters it lacks (a softmax
    checkpoint) are taken from the model (their initial values) and named in the returned list; positional
    encodings of another grid (fine-tuning at another size) are resampled, prefix rows kept."""
    added: List[str] = []
    out = dict(state_dict)
    for prefix, attn in converted_modules(model).items():
        for key, value in attn.state_dict(prefix=f'{prefix}.').items():
            have = out.get(key)
            if have is None:
                out[key] = value
                added.append(key)
            elif key.endswith('positional_encoding') and have.shape != value.shape:
                fitted = resample_position_table(have, value.shape, attn.grid, attn.num_prefix_tokens)
                out[key] = have if fitted is None else fitted       # else the strict load names it
    return out, added
