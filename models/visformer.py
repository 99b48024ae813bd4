"""Visformer (Chen et al., "Visformer: The Vision-friendly Transformer", ICCV 2021), v1 and the Swin-window v2.

State-dict keys, order, shapes and dtypes are those of the official models (danczs/Visformer ``models.py`` and
``swin_models.py``), so their checkpoints load with ``strict=True``:

  * every norm is a BatchNorm2d inside a wrapper module (keys ``....bn.weight``);
  * tensors stay (B, C, H, W); 1x1-conv projections (no bias) in attention and MLP; learnable position
    embeddings (1, C, H, W) per stage, first in the state_dict;
  * v1 (``visformer_tiny``/``_small``): stem, then 3 stages at strides 8/16/32 (conv blocks, then global
    softmax attention); v2 (``swin_visformer_*_v2``): stem, then 4 stages at strides 4..32, attention in
    stages 2-3 as Swin windows (relative position bias, shift every other block, a window no smaller than
    the map means one window and no shift);
  * the official ``qk_scale`` is an EXPONENT: q and k are each multiplied by head_dim ** exponent
    (default -0.25, i.e. logits / sqrt(head_dim)); the released v2 weights were trained with -0.5, which is
    the default of the v2 functions here (the official functions default to -0.25 for both).

Registered names in timm: ``official_visformer_tiny`` / ``official_visformer_small`` (timm has its own
``visformer_tiny`` / ``visformer_small`` without the ``.bn.`` wrappers; they keep their names) and
``swin_visformer_tiny_v2`` / ``swin_visformer_small_v2`` / ``swin_visformer_medium_v2``. ``MODEL.TYPE`` uses
the official names for all five; ``checkpoint_filter_fn`` also accepts timm's visformer checkpoints.
"""

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, register_notrace_function, trunc_normal_
from timm.models._manipulate import checkpoint_seq
from timm.models.visformer import SpatialMlp

from state_dicts import unwrap_state_dict

from .config_adapter import ConfigKey, ConfigSection, ModelSpec, common_spec, config_section, register_config_adapter
from .checkpoint_fit import fit_state_dict, resample_position_map
from .builder import OfficialPaths, Variant, build_backbone, official_types, register_family, square_size
from .layers import (LinearHeadMixin, StageCheckpointing, TokenGroups, WindowAttention, check_input_size,
                     init_weights, shifted_window_mask, window_partition, window_reverse)

torch.fx.wrap('check_input_size')       # a torch.fx leaf here too (see check_input_size)

_logger = logging.getLogger(__name__)

__all__ = ['Visformer', 'VisformerStage', 'VisformerBlock', 'BatchNorm', 'checkpoint_filter_fn']


class BatchNorm(nn.Module):
    """BatchNorm2d inside a wrapper (official key layout ``<name>.bn.*``). (B, C, H, W) -> same."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(dim, eps=1e-5, momentum=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


@register_notrace_function      # an fx leaf (timm's tracer and torch.fx): resampling depends on the map size
def position_table_for(pos: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The (1, C, h, w) position table ``pos`` for the map ``x`` (B, C, H, W): itself, or resampled bicubically
    to (H, W) when the map is another size (``dynamic_img_size``)."""
    H, W = x.shape[-2], x.shape[-1]
    if pos.shape[-2] == H and pos.shape[-1] == W:
        return pos
    return resample_position_map(pos, H, W)


torch.fx.wrap('position_table_for')


class PatchEmbed(nn.Module):
    """Conv (kernel = stride = patch, bias) then BatchNorm: (B, C_in, H, W) -> (B, C, H/p, W/p). With
    ``dynamic_img_size`` any map is taken, zero-padded on the bottom/right to a multiple of the patch."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int,
                 dynamic_img_size: bool = False) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.dynamic_img_size = dynamic_img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = BatchNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_img_size:          # else the model checked the image size (maps then fit exactly)
            p = self.patch_size
            x = F.pad(x, (0, (-x.shape[-1]) % p, 0, (-x.shape[-2]) % p))
        return self.norm(self.proj(x))


class VisformerBlock(nn.Module):
    """Pre-norm block on (B, C, H, W): [x + attn(norm1(x))] then x + mlp(norm2(x)).

    Without attention (``attn_disabled``) the block is norm2 + MLP only (no ``norm1``/``attn`` keys).
    Attention is softmax over windows of the map (v2: Swin windows with relative position bias and shifts;
    v1: ``window=None``, one window covering the map, no bias). q and k are each scaled by
    head_dim ** qk_scale_exponent. The MLP is 4x (or 2x with the grouped 3x3 ``spatial_conv``).

    A map other than ``resolution`` (only reached with ``dynamic_img_size``): v1 attends over the whole
    current map; v2 keeps its window, zero-pads the map on the bottom/right to window multiples and shifts
    every other block by half a window with the -100 mask of the padded map, as the official v2 detection
    backbone does (so a v2 block shifts there even where the map fitted one window at the built size).
    """

    def __init__(self, dim: int, num_heads: int, resolution: Tuple[int, int], window: Optional[int] = None,
                 shift: int = 0, mlp_ratio: float = 4., qk_scale_exponent: float = -0.25,
                 attn_disabled: bool = False, spatial_conv: bool = False, group: int = 8, drop: float = 0.,
                 attn_drop: float = 0., drop_path: float = 0., dynamic_size: bool = False) -> None:
        super().__init__()
        self.resolution = resolution
        self.dynamic_size = dynamic_size          # other map sizes possible (the model's dynamic_img_size)
        rel_pos_bias = window is not None
        shifted = bool(shift)
        if window is None or min(resolution) <= window:      # one window covers the map: no shift
            window, shift = min(resolution), 0
        self.window, self.shift = window, shift
        self.global_attn = not rel_pos_bias
        self.dynamic_shift = window // 2 if shifted else 0   # the shift at other map sizes (official detection)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        if not attn_disabled:
            if dim % num_heads:
                raise ValueError(f'num_heads={num_heads} must divide the stage width {dim}')
            if resolution[0] % window or resolution[1] % window:
                raise ValueError(f'img_size: a {resolution[0]}x{resolution[1]} attention map does not tile into '
                                 f'{window}x{window} windows (there is no padding); use another image size')
            head_dim = dim // num_heads
            self.norm1 = BatchNorm(dim)
            self.attn = WindowAttention(dim, window, num_heads, qkv_bias=False,
                                        qk_scale=head_dim ** (2 * qk_scale_exponent), attn_drop=attn_drop,
                                        proj_drop=drop, rel_pos_bias=rel_pos_bias, proj_bias=False,
                                        pointwise=True)
        else:
            self.norm1 = self.attn = None
        self.norm2 = BatchNorm(dim)
        self.mlp = SpatialMlp(dim, int(dim * mlp_ratio), drop=drop, group=group, spatial_conv=spatial_conv)
        mask = shifted_window_mask(resolution, window, shift) if (self.attn is not None and shift) else None
        self.register_buffer('attn_mask', mask)

    def _windows(self, y: torch.Tensor, shift: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, H, W, C) -> same: cyclic shift, window attention, reverse."""
        _, H, W, _ = y.shape
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        y = window_reverse(self.attn(window_partition(y, self.window), mask=mask), self.window, H, W)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        return y

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        y = x.permute(0, 2, 3, 1)                                                 # (B, H, W, C)
        if not self.dynamic_size or (H == self.resolution[0] and W == self.resolution[1]):
            y = self._windows(y, self.shift, self.attn_mask)
        elif self.global_attn:                                 # v1 at another size: the whole current map
            y = self.attn(y.reshape(B, H * W, C)).view(B, H, W, C)
        else:                                                  # v2 at another size: pad, shift every other block
            w, shift = self.window, self.dynamic_shift
            pad_h, pad_w = (-H) % w, (-W) % w
            y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))
            mask = shifted_window_mask((H + pad_h, W + pad_w), w, shift).to(y) if shift else None
            y = self._windows(y, shift, mask)[:, :H, :W]
        return y.permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.drop_path(self._attention(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def token_groups(self, attn: nn.Module) -> TokenGroups:
        """Token layout: cyclic shift by -shift, then windows (one window = the whole map for v1)."""
        H, W = self.resolution
        index = torch.arange(H * W).view(1, H, W, 1)
        if self.shift:
            index = torch.roll(index, shifts=(-self.shift, -self.shift), dims=(1, 2))
        return TokenGroups((H, W), window_partition(index, self.window).squeeze(-1), (self.window, self.window))

    def extra_repr(self) -> str:
        return f'resolution={self.resolution}, window={self.window}, shift={self.shift}'


class VisformerStage(nn.Module):
    """One stage: patch embedding, the stage's position table added (resampled with ``dynamic_size``), dropout,
    then the blocks. (B, C_in, H, W), (1, C, h, w) table -> (B, C, H/p, W/p)."""

    def __init__(self, patch_embed: PatchEmbed, blocks: Sequence[nn.Module], drop: float = 0.,
                 dynamic_size: bool = False) -> None:
        super().__init__()
        self.patch_embed = patch_embed
        self.pos_drop = nn.Dropout(drop)
        self.blocks = nn.Sequential(*blocks)
        self.dynamic_size = dynamic_size
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.dynamic_size:
            pos = position_table_for(pos, x)
        x = self.pos_drop(x + pos)
        if not torch.jit.is_scripting() and self.grad_checkpointing and x.requires_grad:
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


def _shift(window: Optional[int], index: int) -> int:
    """Shift of a v2 block: half a window when its index COUNTED OVER THE WHOLE NETWORK is odd (official rule;
    e.g. the first block of a stage is shifted when the earlier stages hold an odd number of blocks)."""
    return 0 if window is None or index % 2 == 0 else window // 2


def _flags(name: str, value: str, n: int) -> List[bool]:
    if len(value) != n or set(value) - {'0', '1'}:
        raise ValueError(f"{name}={value!r} must be {n} characters '0'/'1', one per stage")
    return [c == '1' for c in value]


class Visformer(OfficialPaths, StageCheckpointing, LinearHeadMixin, nn.Module):
    """Visformer v1 (3 stages) or v2 (4 stages). forward: (B, 3, img_size, img_size) -> (B, num_classes).

    Stage i (numbered so that the last is 3: v1 uses 1-3, v2 0-3) has width embed_dim * 2**(i - 2), a
    patch embedding (patch 4 for the first v1 stage, else 2) after the stride-2 stem, and a position
    embedding. ``window_sizes`` (v2, one per stage) switches on Swin windows; None = global attention (v1).

    ``dynamic_img_size=True``: any input size (e.g. 512 x 1024 for dense prediction). Maps are zero-padded
    to a multiple of each patch, the position embeddings are resampled bicubically to the current grid
    (``timm.layers.resample_abs_pos_embed``, as timm's ViTs do), and attention blocks follow
    :class:`VisformerBlock`'s rule for other map sizes. At ``img_size`` the output is the fixed-size one.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, in_chans: int = 3, num_classes: int = 1000, init_channels: int = 16,
                 embed_dim: int = 192, depths: Sequence[int] = (7, 4, 4), num_heads: Union[int, Sequence[int]] = 3,
                 mlp_ratio: float = 4., group: int = 8, attn_stages: str = '011', spatial_conv: str = '100',
                 window_sizes: Optional[Sequence[int]] = None, qk_scale_exponent: float = -0.25,
                 drop_rate: float = 0., attn_drop_rate: float = 0., drop_path_rate: float = 0.,
                 global_pool: str = 'avg', use_checkpoint: bool = False, dynamic_img_size: bool = False) -> None:
        super().__init__()
        n = len(depths)
        if n not in (3, 4) or any(d < 0 for d in depths):
            raise ValueError(f'depths={tuple(depths)} must give 3 (v1) or 4 (v2) non-negative block counts')
        heads = [num_heads] * n if isinstance(num_heads, int) else list(num_heads)
        if len(heads) != n:
            raise ValueError(f'num_heads={tuple(heads)} needs one entry per stage ({n} stages, from depths)')
        attn, sconv = _flags('attn_stages', attn_stages, n), _flags('spatial_conv', spatial_conv, n)
        if window_sizes is not None and len(window_sizes) != n:
            raise ValueError(f'window_sizes={tuple(window_sizes)} needs one entry per stage ({n} stages)')
        if embed_dim % 4 or embed_dim <= 0:
            raise ValueError(f'embed_dim={embed_dim} must be a positive multiple of 4')
        self.first = 4 - n
        reduction = 2 * (4 if n == 3 else 2)                  # stride after the first patch embedding
        img_size = square_size(img_size)
        if img_size % (2 * 2 ** 4) or img_size <= 0:
            raise ValueError(f'img_size={img_size} must be a positive multiple of 32')
        if any(attn[:n - 2]):
            raise ValueError(f'attn_stages={attn_stages!r}: attention before the last two stages (officially with '
                             f'head_dim_ratio < 1) is not supported; use conv blocks there')
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.img_size = img_size
        self.num_features = self.head_hidden_size = embed_dim * 2
        self.dynamic_img_size = dynamic_img_size
        widths = [embed_dim * 2 ** i // 4 for i in range(self.first, 4)]
        res = [img_size // reduction // 2 ** j for j in range(n)]

        # parameters first, as officially; the state-dict keys stay official (pos_embed{i}, patch_embed{i},
        # stage{i}.{b}) through OfficialPaths: TorchScript walks a list, not attributes named by a computed string
        self.pos_embeds = nn.ParameterList([nn.Parameter(torch.zeros(1, widths[j], res[j], res[j])) for j in range(n)])
        self.stem = nn.Sequential(nn.Conv2d(in_chans, init_channels, 7, stride=2, padding=3, bias=False),
                                  BatchNorm(init_channels), nn.ReLU(inplace=True))
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        in_chs, size = init_channels, img_size // 2
        self.stages = nn.ModuleList()
        for j in range(n):
            patch = 4 if (n == 3 and j == 0) else 2
            patch_embed = PatchEmbed(size, patch, in_chs, widths[j], dynamic_img_size)
            window = window_sizes[j] if window_sizes is not None else None
            self.stages.append(VisformerStage(patch_embed, [
                VisformerBlock(widths[j], heads[j], (res[j], res[j]), window,
                               _shift(window, sum(depths[:j]) + b), mlp_ratio, qk_scale_exponent,
                               not attn[j], sconv[j], group, drop_rate, attn_drop_rate,
                               dpr[sum(depths[:j]) + b], dynamic_size=dynamic_img_size)
                for b in range(depths[j])], drop_rate, dynamic_img_size))
            in_chs, size = widths[j], res[j]
        self.set_grad_checkpointing(use_checkpoint)
        self.norm = BatchNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=widths[j], reduction=reduction * 2 ** j, module=f'stages.{j}')
                             for j in range(n)]
        for pos in self.pos_embeds:
            trunc_normal_(pos, std=.02)
        self.apply(self._init_weights)
        self.use_official_keys(pair for j in range(n) for pair in (
            (f'pos_embeds.{j}', f'pos_embed{j + self.first}'), (f'stages.{j}.patch_embed', f'patch_embed{j + self.first}'),
            (f'stages.{j}.blocks', f'stage{j + self.first}')))


    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Official init: linear trunc-normal 0.02 (the shared ViT rule; no LayerNorm here), BN ones/zeros,
        convs kaiming-normal (fan_out, relu)."""
        init_weights(m)
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ timm interface
    __jit_unused_properties__ = ['stage_ids']      # Python only (TorchScript compiles the other properties)

    @property
    def stage_ids(self) -> List[int]:
        return list(range(self.first, self.first + len(self.feature_info)))

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Officially nothing by name (position embeddings and bias tables decay; 1-D tensors do not)."""
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^stem|^stages\.0\.patch_embed\.|^pos_embeds\.0$',
                    blocks=[(r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.blocks\.(\d+)', None),
                            (r'^stages\.(\d+)\.patch_embed\.', (0,)), (r'^pos_embeds\.(\d+)$', (0,)),
                            (r'^norm', (99999,))])

    def _check_input_size(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 3, H, W) unchanged; without ``dynamic_img_size`` a ValueError naming the image size when
        it is not the model's (checked on the image: the maps the patch embeddings see are smaller)."""
        return x if self.dynamic_img_size else check_input_size(x, (self.img_size, self.img_size))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normed map (B, 2C, H/32, W/32)."""
        x = self.stem(self._check_input_size(x))
        for stage, pos in zip(self.stages, self.pos_embeds):
            x = stage(x, pos)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, H, W) features -> logits (see ``LinearHeadMixin.nchw_head``; no dropout before the head)."""
        return self.nchw_head(x, pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """Stage outputs (B, C_i, H_i, W_i) (3 for v1, 4 for v2); ``norm`` applies the final BatchNorm to
        the last stage's map when it is selected. Returns ``[maps]`` or ``(final features, [maps])``."""
        from timm.models._features import feature_take_indices
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt={output_fmt!r} must be 'NCHW' or 'NHWC'")
        n = len(self.stages)
        take, max_index = feature_take_indices(n, indices)
        last = n - 1 if not (stop_early or intermediates_only) else max_index
        x = self.stem(self._check_input_size(x))
        maps = []
        for j, (stage, pos) in enumerate(zip(self.stages[:last + 1], self.pos_embeds)):
            x = stage(x, pos)
            if j in take:
                y = self.norm(x) if norm and j == n - 1 else x
                maps.append(y.permute(0, 2, 3, 1) if output_fmt == 'NHWC' else y)
        if intermediates_only:
            return maps
        return (self.norm(x) if last == n - 1 else x), maps

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        from timm.models._features import feature_take_indices
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.pos_embeds = nn.ParameterList(list(self.pos_embeds)[:max_index + 1])
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take


# ---------------------------------------------------------------------- checkpoints
def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """Official Visformer files ({'model': sd, 'args': Namespace, ...} or a bare sd, ``module.`` stripped) as
    they are; timm's own visformer checkpoints (BatchNorm keys without the ``.bn.`` level) are renamed. For
    another input size the position embeddings (and v2 bias tables) are resampled and the shift masks
    re-created; a checkpoint of another model is refused (:func:`models.checkpoint_fit.fit_state_dict`)."""
    targets = model.state_dict()
    unwrapped = {k.replace('.bn.', '.'): k for k in targets if '.bn.' in k}
    out, renamed = {}, 0
    for k, v in unwrap_state_dict(state_dict).items():
        if k not in targets and k in unwrapped:
            k, renamed = unwrapped[k], renamed + 1
        out[k] = v
    if renamed:
        _logger.info('Visformer checkpoint: %d BatchNorm tensors renamed from the timm layout (added .bn.)', renamed)
    return fit_state_dict(out, model)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return dict(dict(url='', num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                interpolation='bicubic', fixed_input_size=True, mean=IMAGENET_DEFAULT_MEAN,
                std=IMAGENET_DEFAULT_STD, first_conv='stem.0', classifier='head', license='apache-2.0',
                origin_url='https://github.com/danczs/Visformer', paper_ids='arXiv:2104.12533'), **kwargs)


def _create(name: str, pretrained: bool, **kwargs: Any) -> Visformer:
    return build_backbone(Visformer, name, pretrained, checkpoint_filter_fn, num_stages=len(kwargs['depths']),
                          **kwargs)


_V1 = dict(depths=(7, 4, 4), mlp_ratio=4., group=8, attn_stages='011', spatial_conv='100', qk_scale_exponent=-0.25)
_V2 = dict(mlp_ratio=4., group=8, attn_stages='0011', spatial_conv='1100', window_sizes=(56, 28, 14, 7),
           qk_scale_exponent=-0.5)
# timm name -> architecture (danczs/Visformer models.py / swin_models.py) and the official function name
# (MODEL.TYPE); no softmax twins
ARCHS = register_family(__name__, _create, _cfg, {
    'official_visformer_tiny': Variant(dict(_V1, init_channels=16, embed_dim=192, num_heads=3), official_type='visformer_tiny',
                                       tag='in1k', doc='Official ``visformer_tiny`` (v1, BatchNorm wrappers): 10.3M params, 1.3 GFLOPs.'),
    'official_visformer_small': Variant(dict(_V1, init_channels=32, embed_dim=384, num_heads=6),
                                        official_type='visformer_small', tag='in1k',
                                        doc='Official ``visformer_small`` (v1, BatchNorm wrappers): 40.2M params, 4.9 GFLOPs.'),
    'swin_visformer_tiny_v2': Variant(dict(_V2, init_channels=24, embed_dim=192, depths=(1, 4, 6, 3), num_heads=(1, 3, 6, 12)),
                                      official_type='swin_visformer_tiny_v2', tag='in1k',
                                      doc='Visformer-tiny v2 (Swin windows in stages 2-3): 9.4M params, 1.3 GFLOPs; qk exponent -0.5.'),
    'swin_visformer_small_v2': Variant(dict(_V2, init_channels=32, embed_dim=256, depths=(1, 10, 14, 3), num_heads=(2, 4, 8, 16)),
                                       official_type='swin_visformer_small_v2', tag='in1k',
                                       doc='Visformer-small v2: 23.6M params, 4.3 GFLOPs; qk exponent -0.5.'),
    'swin_visformer_medium_v2': Variant(dict(_V2, init_channels=32, embed_dim=384, depths=(1, 8, 14, 2), num_heads=(2, 4, 8, 16)),
                                        official_type='swin_visformer_medium_v2', tag='in1k',
                                        doc='Visformer-medium v2: 44.5M params, 8.5 GFLOPs; qk exponent -0.5.'),
})
TIMM_NAMES = official_types(ARCHS)          # MODEL.TYPE (official function name) -> timm name


# ---------------------------------------------------------------------- experiment config
# MODEL.VISFORMER (ours): QK_SCALE_EXPONENT is the official `qk_scale` / `--qk-scale-factor`: q and k are each
# multiplied by head_dim ** exponent, so the logits by head_dim ** (2 * exponent). None = the variant's
# default (-0.25 for v1, -0.5 for v2, the value the released v2 weights were trained with). Empty / 0 keep
# the variant's value.
VISFORMER_SECTION = config_section(ConfigSection('VISFORMER', (
    ConfigKey('QK_SCALE_EXPONENT', None, 'qk_scale_exponent', keep=None),
    ConfigKey('INIT_CHANNELS', 0, 'init_channels', keep=0, doc="stem width; 0 = the variant's"),
    ConfigKey('EMBED_DIM', 0, 'embed_dim', keep=0, doc="width C; 0 = the variant's"),
    ConfigKey('DEPTHS', [], 'depths', keep=[], doc="blocks per stage (3 for v1, 4 for v2)"),
    ConfigKey('NUM_HEADS', [], 'num_heads', keep=[]),
)))


@register_config_adapter(*TIMM_NAMES, reads=(VISFORMER_SECTION,))
def _visformer_spec(config) -> ModelSpec:
    """MODEL.TYPE (official name) -> timm name; non-empty MODEL.VISFORMER keys override the variant's values."""
    return common_spec(config, TIMM_NAMES[config.MODEL.TYPE]).read(config, VISFORMER_SECTION)
