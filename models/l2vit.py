"""L2ViT (Zheng et al., "The Linear Attention Resurrection in Vision Transformer"): a four-stage hierarchy whose
stages alternate local window softmax attention (LWA blocks, even indices) and enhanced linear global
attention (LGA blocks, odd indices).

State-dict keys, order, shapes and dtypes are those of the official ``L2ViT_*`` models
(ChuanyangZheng/L2ViT), so their checkpoints load with ``strict=True``. Behaviour kept from the official code:

  * enhanced linear attention: ReLU kernel, per-query denominator ``q . sum_n k_n`` clamped from below at
    100, the ``k^T v`` product scaled by a learnable per-head ``temperature`` (initialised to
    head_dim^-0.5); the LCM (depth-wise 7x7 conv, GELU, BatchNorm, depth-wise 7x7 conv) on the LGA path;
  * LWA windows are never shifted and carry no relative position bias; maps are zero-padded
    right/bottom to a multiple of the window without a mask (padded tokens take part in the softmax);
  * a CPE (x + depth-wise 3x3 conv) before attention (and, in LWA blocks, before the MLP);
  * there is no layer scale: the official ``layer_scale_init_value`` argument is ignored there, and
    absent here;
  * the model is size-agnostic (no absolute position embedding).

Registered in timm under the official function names (``L2ViT_Tiny``, ``L2ViT_Small``, ``L2ViT_Base``,
``L2ViT_Base_384``; timm has none of them), which are also the ``MODEL.TYPE`` values.
"""

import logging
from typing import Any, Dict, Final, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_

from state_dicts import unwrap_state_dict

from .config_adapter import ConfigKey, ConfigSection, ModelSpec, common_spec, config_section, register_config_adapter
from .focused_attention import ATTN_LINEAR, AttentionTap3
from .checkpoint_fit import fit_state_dict
from .builder import Variant, build_backbone, official_types, register_family
from .layers import (LinearHeadMixin, StageCheckpointing, TokenGroups, WindowAttention, pool_features, tokens_to_nchw,
                     whole_grid, window_partition, window_reverse)

_logger = logging.getLogger(__name__)

Size = Tuple[int, int]

__all__ = ['L2ViT', 'LinearAttention', 'LCM', 'LWABlock', 'LGABlock', 'checkpoint_filter_fn']


def _map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


class CPE(nn.Module):
    """Conditional position encoding: x + depth-wise 3x3 conv(x) on the token map. (B, N, C) -> same."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        return x + _map_to_tokens(self.proj(tokens_to_nchw(x, size)))


class ConvStem(nn.Module):
    """Two stride-2 3x3 convs with BatchNorm: (B, C_in, H, W) -> (B, C, H/4, W/4). Keys ``proj.{0,1,3,4}``."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1), nn.BatchNorm2d(dim // 2), nn.ReLU(),
            nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad a (B, C, H, W) map right/bottom to multiples of ``multiple``."""
    pad_h, pad_w = (-x.shape[-2]) % multiple, (-x.shape[-1]) % multiple
    return F.pad(x, (0, pad_w, 0, pad_h))       # unconditional (0 = a copy): no branch on traced shapes


class StemEmbed(nn.Module):
    """Stage-0 embedding: conv stem, then LayerNorm on the tokens. (B, 3, H, W) -> ((B, N, C), (H/4, W/4)).
    ``size`` is not read (the map size comes from the image): it gives every downsample layer the signature
    of :class:`MergeEmbed`, so that one loop calls them all (TorchScript)."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = ConvStem(in_chans, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, size: Size) -> Tuple[torch.Tensor, Size]:
        x = self.proj(_pad_to_multiple(x, 4))
        size = (x.shape[2], x.shape[3])
        return self.norm(_map_to_tokens(x)), size


class MergeEmbed(nn.Module):
    """Stage-1..3 downsampling: LayerNorm on the incoming tokens (input width), then a 2x2 stride-2 conv.
    ((B, N, C_in), (H, W)) -> ((B, N/4, C_out), (H/2, W/2)); odd maps are zero-padded right/bottom."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, 2, stride=2)
        self.norm = nn.LayerNorm(in_dim)

    def forward(self, x: torch.Tensor, size: Size) -> Tuple[torch.Tensor, Size]:
        x = self.proj(_pad_to_multiple(tokens_to_nchw(self.norm(x), size), 2))
        return _map_to_tokens(x), (x.shape[2], x.shape[3])


class LinearAttention(nn.Module):
    """Enhanced linear attention over all tokens, per head: with q = relu(q), k = relu(k),
    out_i = q_i (temperature * sum_n k_n^T v_n) / max(q_i . sum_n k_n, 100). (B, N, C) -> (B, N, C).

    The tap sees (relu(q), relu(k), v), each (B, N, C) (the ``ATTN_LINEAR`` protocol). The matrix that
    ``visualize`` derives from them, q_i . k_j / sum_j q_i . k_j, has the rows of this attention up to a
    per-row factor (the per-head temperature, and the clamp where q_i . sum k < 100)."""

    attn_kind = ATTN_LINEAR
    clamp_min: Final[float] = 100.0         # Final: a constant that TorchScript can read

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_drop: float = 0.) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'num_heads={num_heads} must divide the stage width {dim}')
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), head_dim ** -0.5))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.tap = AttentionTap3()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, C).unbind(2)
        q, k, v = self.tap(F.relu(q), F.relu(k), v)
        h = self.num_heads
        q = q.reshape(B, N, h, C // h).transpose(1, 2)                               # (B, h, N, d)
        k = k.reshape(B, N, h, C // h).transpose(1, 2)
        v = v.reshape(B, N, h, C // h).transpose(1, 2)
        denom = (q @ k.sum(dim=-2).unsqueeze(-1)).clamp(min=self.clamp_min)        # (B, h, N, 1)
        kv = (k.transpose(-2, -1) @ v) * self.temperature                         # (B, h, d, d)
        x = ((q @ kv) / denom).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class LCM(nn.Module):
    """Local concentration module: depth-wise 7x7 conv -> GELU -> BatchNorm -> depth-wise 7x7 conv on the
    token map. (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        return _map_to_tokens(self.conv2(self.bn(self.act(self.conv1(tokens_to_nchw(x, size))))))


class LWABlock(nn.Module):
    """Local window attention block on (B, H*W, C) tokens: s = cpe0(x); x = s + attn(norm1(s)) in
    non-overlapping windows (map zero-padded to a window multiple, no mask, no shift); x = cpe1(x);
    x = x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, mlp_ratio: float = 4.,
                 qkv_bias: bool = True, drop: float = 0., drop_path: float = 0.,
                 resolution: Optional[Size] = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'num_heads={num_heads} must divide the stage width {dim}')
        self.window_size = window_size
        self.resolution = resolution
        self.cpe = nn.ModuleList([CPE(dim), CPE(dim)])
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias=qkv_bias, proj_drop=drop,
                                    rel_pos_bias=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        H, W = size
        B, N, C = x.shape
        w = self.window_size
        shortcut = self.cpe[0](x, size)
        y = self.norm1(shortcut).view(B, H, W, C)
        pad_h, pad_w = (-H) % w, (-W) % w
        y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))      # unconditional, as the crop: no branch on traced shapes
        Hp, Wp = H + pad_h, W + pad_w
        y = window_reverse(self.attn(window_partition(y, w)), w, Hp, Wp)
        y = y[:, :H, :W, :]
        x = shortcut + self.drop_path(y.reshape(B, N, C))
        x = self.cpe[1](x, size)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def token_groups(self, attn: nn.Module) -> TokenGroups:
        """Token layout at the native resolution (from ``img_size``): unshifted windows."""
        H, W = _native(self.resolution)
        w = self.window_size
        if H % w or W % w:
            raise ValueError(f'img_size: the {H}x{W} map is zero-padded to whole {w}x{w} windows; the padded '
                             f'tokens have no image position (visualise at a size whose maps are multiples of {w})')
        positions = window_partition(torch.arange(H * W).view(1, H, W, 1), w).squeeze(-1)
        return TokenGroups((H, W), positions, (w, w))


class LGABlock(nn.Module):
    """Linear global attention block on (B, H*W, C) tokens: x = cpe0(x); x = x + attn(norm1(x));
    x = x + lcm(norm3(x)); x = x + mlp(norm2(x)). (Key order: norm2/mlp before norm3/local_mp, as officially.)"""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = True,
                 drop: float = 0., drop_path: float = 0., resolution: Optional[Size] = None) -> None:
        super().__init__()
        self.resolution = resolution
        self.cpe = nn.ModuleList([CPE(dim)])
        self.norm1 = nn.LayerNorm(dim)
        self.attn = LinearAttention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.norm3 = nn.LayerNorm(dim)
        self.local_mp = LCM(dim)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        x = self.cpe[0](x, size)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.local_mp(self.norm3(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def token_groups(self, attn: nn.Module) -> TokenGroups:
        """Global attention over the whole map at the native resolution (from ``img_size``)."""
        return whole_grid(_native(self.resolution))


def _native(resolution: Optional[Size]) -> Size:
    if resolution is None:
        raise ValueError('img_size: build the model with img_size to describe its token layout')
    return resolution


class L2ViTStage(nn.Sequential):
    """The blocks of one stage (keys ``{j}.*``), LWA at even and LGA at odd indices; forward(x, size).
    ``resolution`` is the native map size (only used to describe the token layout)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 qkv_bias: bool, drop: float, drop_path: Sequence[float], resolution: Optional[Size] = None) -> None:
        super().__init__(*[
            LWABlock(dim, num_heads, window_size, mlp_ratio, qkv_bias, drop, drop_path[j], resolution)
            if j % 2 == 0 else LGABlock(dim, num_heads, mlp_ratio, qkv_bias, drop, drop_path[j], resolution)
            for j in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:  # type: ignore[override]
        if torch.jit.is_scripting():        # no checkpointing there (TorchScript cannot compile it)
            for blk in self:
                x = blk(x, size)
            return x
        for blk in self:
            if self.grad_checkpointing and x.requires_grad:
                x = cp.checkpoint(blk, x, size, use_reentrant=False)
            else:
                x = blk(x, size)
        return x


def _stage_resolutions(img_size: Union[int, Sequence[int]], n: int) -> List[Size]:
    """Native map size of each stage: ceil(img / 4) after the (padded) stem, then ceil-halving."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
    h, w = -(-h // 4), -(-w // 4)
    out = []
    for _ in range(n):
        out.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    return out


def _check_stage_list(name: str, value: Sequence[Any], n: int) -> None:
    if len(value) != n:
        raise ValueError(f'{name}={tuple(value)} needs one entry per stage ({n} stages, from depths)')


class L2ViT(StageCheckpointing, LinearHeadMixin, nn.Module):
    """L2ViT classifier. forward: (B, 3, H, W) -> (B, num_classes); any H, W (odd maps are padded).

    Args:
        depths, dims, num_heads: per stage (4 stages).
        window_size: LWA window (7; 12 for the 384 model).
        mlp_ratio: MLP hidden width / width.
        drop_rate: dropout on MLP/projection outputs and before the head (0 officially: absent there).
        drop_path_rate: stochastic depth, linear from 0 over all blocks.
        head_init_scale: multiplies the initial head weight and bias.
        img_size: the native input size; it only fixes the token layout reported to ``visualize`` (the
            model runs at any size).
        use_checkpoint: activation checkpointing of every block (``set_grad_checkpointing``).
        dynamic_img_size: accepted for timm's one-call dense-prediction API and changes nothing: the model is
            size-agnostic (no position embedding; windows and odd maps are padded, linear attention is global).
    """

    output_fmt: str = 'NHWC'        # what forward_features returns (timm reads it)

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, depths: Sequence[int] = (2, 2, 6, 2),
                 dims: Sequence[int] = (96, 192, 384, 768), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4., qkv_bias: bool = True, drop_rate: float = 0.,
                 drop_path_rate: float = 0., head_init_scale: float = 1., global_pool: str = 'avg',
                 img_size: Optional[Union[int, Tuple[int, int]]] = None, use_checkpoint: bool = False,
                 dynamic_img_size: bool = False) -> None:
        super().__init__()
        n = len(depths)
        if n < 1 or any(d < 0 for d in depths):
            raise ValueError(f'depths={tuple(depths)} must be non-negative block counts, one per stage')
        _check_stage_list('dims', dims, n)
        _check_stage_list('num_heads', num_heads, n)
        for d, h in zip(dims, num_heads):
            if h <= 0 or d % h:
                raise ValueError(f'num_heads={tuple(num_heads)} must divide dims={tuple(dims)} stage by stage')
        if dims[0] % 2:
            raise ValueError(f'dims={tuple(dims)}: the stem needs an even first width')
        if window_size < 1:
            raise ValueError(f'window_size={window_size} must be positive')
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False
        self.dynamic_img_size = dynamic_img_size     # size-agnostic either way
        self.downsample_layers = nn.ModuleList(
            [StemEmbed(in_chans, dims[0])] + [MergeEmbed(dims[i - 1], dims[i]) for i in range(1, n)])
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        res = _stage_resolutions(img_size if img_size is not None else 224, n)
        self.stages = nn.ModuleList([
            L2ViTStage(dims[i], depths[i], num_heads[i], window_size, mlp_ratio, qkv_bias, drop_rate,
                       dpr[sum(depths[:i]):sum(depths[:i + 1])], res[i])
            for i in range(n)])
        self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'stages.{i}') for i in range(n)]
        self.norm = nn.LayerNorm(dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        if isinstance(self.head, nn.Linear):
            self.head.weight.data.mul_(head_init_scale)
            self.head.bias.data.mul_(head_init_scale)
        self.set_grad_checkpointing(use_checkpoint)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Official init: truncated normal (std 0.02) for every conv and linear weight, zero biases."""
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ timm interface
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Officially only 1-D tensors and biases are exempt (the optimizer's rule); nothing by name."""
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^downsample_layers\.0\.',
                    blocks=r'^(?:downsample_layers|stages)\.(\d+)' if coarse else [
                        (r'^downsample_layers\.(\d+)', (0,)), (r'^stages\.(\d+)\.(\d+)', None),
                        (r'^norm', (99999,))])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normed tokens as a map (B, H/32, W/32, C) (channels last)."""
        size: Size = (x.shape[2], x.shape[3])
        for down, stage in zip(self.downsample_layers, self.stages):  # TorchScript: no ModuleList[i] by variable
            x, size = down(x, size)
            x = stage(x, size)
        return self.norm(x).reshape(x.shape[0], size[0], size[1], -1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, H, W, C) -> logits (or the pooled (B, C) features with ``pre_logits``)."""
        x = self.head_drop(pool_features(x, self.global_pool, 'NHWC'))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """Stage outputs as (B, C_i, H_i, W_i) maps (``norm`` applies the final LayerNorm to the last stage's
        map when it is selected). Returns ``[maps]`` or ``(final features, [maps])``."""
        from timm.models._features import feature_take_indices
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt={output_fmt!r} must be 'NCHW' or 'NHWC'")
        n = len(self.stages)
        take, max_index = feature_take_indices(n, indices)
        last = n - 1 if not (stop_early or intermediates_only) else max_index
        size: Size = (x.shape[2], x.shape[3])
        maps = []
        for i, (down, stage) in enumerate(zip(self.downsample_layers[:last + 1], self.stages[:last + 1])):
            x, size = down(x, size)
            x = stage(x, size)
            if i in take:
                y = self.norm(x) if norm and i == n - 1 else x
                y = y.reshape(x.shape[0], size[0], size[1], -1)
                maps.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else y)
        if intermediates_only:
            return maps
        if last == n - 1:
            x = self.norm(x).reshape(x.shape[0], size[0], size[1], -1)
        return x, maps

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        from timm.models._features import feature_take_indices
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.downsample_layers = self.downsample_layers[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take


# ---------------------------------------------------------------------- checkpoints
def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module, use_ema: bool = False) -> Dict[str, Any]:
    """Official L2ViT checkpoints as they are: a bare state_dict or the training file
    ({'model', 'model_ema'?, 'optimizer', 'args', ...}); ``module.`` prefixes are stripped. With ``use_ema``
    the ``model_ema`` entry is used when present; which entry was used is logged. A checkpoint of another
    model is refused (:func:`models.checkpoint_fit.fit_state_dict`)."""
    entry = next((k for k in (('model_ema', 'model', 'state_dict') if use_ema else ('model', 'state_dict'))
                  if isinstance(state_dict.get(k), dict)), None)
    if entry is not None:
        _logger.info('L2ViT checkpoint: using its %r weights%s', entry,
                     ' (no model_ema entry)' if use_ema and entry != 'model_ema' else '')
        state_dict = {entry: state_dict[entry]}
    return fit_state_dict(unwrap_state_dict(state_dict), model)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return dict(dict(url='', num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv='downsample_layers.0.proj.proj.0', classifier='head', license='mit',
                origin_url='https://github.com/ChuanyangZheng/L2ViT'), **kwargs)


def _create(name: str, pretrained: bool, **kwargs: Any) -> L2ViT:
    return build_backbone(L2ViT, name, pretrained, checkpoint_filter_fn, **kwargs)


# Official variants (ChuanyangZheng/L2ViT classification/models/l2vit.py): MODEL.TYPE = timm name = the official
# function name (timm has no model of these names); no softmax twins
ARCHS = register_family(__name__, _create, _cfg, {
    'L2ViT_Tiny': Variant(dict(depths=(2, 2, 6, 2), dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24)),
                          official_type='L2ViT_Tiny', tag='in1k',
                          doc='L2ViT-T (official ``L2ViT_Tiny``): 28.6M params, 4.7 GFLOPs at 224.'),
    'L2ViT_Small': Variant(dict(depths=(2, 2, 18, 2), dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24)),
                           official_type='L2ViT_Small', tag='in1k',
                           doc='L2ViT-S (official ``L2ViT_Small``): 50.2M params, 9.0 GFLOPs at 224.'),
    'L2ViT_Base': Variant(dict(depths=(2, 2, 18, 2), dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32)),
                          official_type='L2ViT_Base', tag='in1k',
                          doc='L2ViT-B (official ``L2ViT_Base``): 88.6M params, 15.9 GFLOPs at 224.'),
    'L2ViT_Base_384': Variant(dict(depths=(2, 2, 18, 2), dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32),
                                   window_size=12),
                              dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
                              official_type='L2ViT_Base_384', tag='in22k_ft_in1k',
                              doc='L2ViT-B at 384 with window 12 (official ``L2ViT_Base_384``): same weights as L2ViT-B.'),
})
OFFICIAL_NAMES = tuple(official_types(ARCHS))


# ---------------------------------------------------------------------- experiment config
# MODEL.L2VIT (ours): empty lists and 0 keep the variant's official values; set them only for scaled-down
# models (e.g. the digits demo).
L2VIT_SECTION = config_section(ConfigSection('L2VIT', (
    ConfigKey('DEPTHS', [], 'depths', keep=[]),
    ConfigKey('DIMS', [], 'dims', keep=[]),
    ConfigKey('NUM_HEADS', [], 'num_heads', keep=[]),
    ConfigKey('WINDOW_SIZE', 0, 'window_size', keep=0, doc="local-window size; 0 = the variant's (7, or 12 at 384)"),
    ConfigKey('HEAD_INIT_SCALE', 1.0, 'head_init_scale', keep=1.0),
)))


@register_config_adapter(*OFFICIAL_NAMES, reads=(L2VIT_SECTION,))
def _l2vit_spec(config) -> ModelSpec:
    """MODEL.TYPE L2ViT_* -> the timm model of the same name; non-empty MODEL.L2VIT keys override the variant's architecture."""
    return common_spec(config, config.MODEL.TYPE).read(config, L2VIT_SECTION)
