"""DAT++ (Vision Transformer with Deformable Attention, CVPR 2022 / its 2023 extension) in plain PyTorch.

State dicts have the keys, order, shapes and dtypes of the official LeapLabTHU/DAT models built from the
same YAML, so the released checkpoints load with ``strict=True``. The model runs on CPU and CUDA without
natten (neighbourhood attention: :mod:`models.neighborhood_attention`).

Layout (NCHW everywhere): conv stem ``patch_proj`` -> 4 ``stages`` with ``down_projs`` between them ->
``cls_norm`` -> global average pool -> ``cls_head``. A stage block is::

    x = x + lpu(x)                                 # 3x3 depth-wise conv ("local perception unit")
    x = x + drop_path(attn(layer_norm_2d(x)))      # 'N' neighbourhood, 'D' deformable, 'L'/'S' window
    x = x + drop_path(mlp(layer_norm_2d+1(x)))     # 1x1 conv, + 3x3 depth-wise conv residual, GELU, 1x1 conv

Differences from the official code, all deliberate:
  * ``forward`` returns the logits (the official returns ``(logits, None, None)``).
  * 'L'/'S' blocks use the shared :class:`models.layers.WindowAttention`; its projections are named
    ``qkv``/``proj`` where the official ones are ``proj_qkv``/``proj_out`` (:func:`checkpoint_filter_fn`
    renames them). No released model has 'L'/'S' blocks.
  * The unreleased letters 'P', 'Q', 'E', 'X' and the ``dwc_pes`` / ``fixed_pes`` / ``log_cpb`` options are
    not implemented (a ValueError says so).
  * The official fine-tuning intent (``DAT.load_pretrained``) comes from the shared checkpoint fitting:
    bicubic resize of ``rpe_table`` / window bias tables (:mod:`models.checkpoint_fit`), and the 22k -> 1k
    head row selection of ``--pretrained`` with an index file (:mod:`resume`).

Official quirks kept because the released weights depend on them: the deformable reference grid sits half a
cell off (its last row/column starts outside [-1, 1] and is pulled back by the clamp); ``rpe_table`` is sized
from ``img_size`` (the *table* resolution: dat_base_384 keeps 224 tables and runs on 384 inputs); the same
DropPath serves both residuals of a block; the effective init is PyTorch's default (the official
``reset_parameters`` never matches a module).
"""

import inspect
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models._features import feature_take_indices

from errors import ConfigError
from state_dicts import unwrap_state_dict

from .config_adapter import ConfigSection, ModelSpec, _plain, config_section, register_config_adapter
from .checkpoint_fit import fit_state_dict
from .builder import Variant, build_backbone, register_family
from .dat_attention import DatWindowAttention, DeformableAttention, LayerNormProxy, NeighborhoodAttention
from .layers import LinearHeadMixin, StageCheckpointing

__all__ = ['DAT', 'DatStage', 'checkpoint_filter_fn', 'LETTERS']

LETTERS = ('N', 'D', 'L', 'S')      # block letters implemented (of the official N, D, L, S, P, Q, E, X)


class ResidualDepthwiseConvMlp(nn.Module):
    """(B, C, H, W) -> same: ``linear1`` 1x1 conv to C*expansion, x + dwc(x) (3x3 depth-wise), GELU,
    ``linear2`` 1x1 conv back. Keys ``linear1.0``, ``linear2.0``, ``dwc`` (registered last, officially)."""

    def __init__(self, dim: int, expansion: int, drop: float = 0.) -> None:
        super().__init__()
        hidden = dim * expansion
        self.linear1 = nn.Sequential(nn.Conv2d(dim, hidden, 1))
        self.drop1 = nn.Dropout(drop)
        self.act = nn.GELU()
        self.linear2 = nn.Sequential(nn.Conv2d(hidden, dim, 1))
        self.drop2 = nn.Dropout(drop)
        self.dwc = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.linear1(x))
        x = self.act(x + self.dwc(x))
        return self.drop2(self.linear2(x))


class TokenMlp(nn.Module):
    """The plain MLP of ``use_dwc_mlps=False`` on an NCHW map; keys ``chunk.linear1`` / ``chunk.linear2``."""

    def __init__(self, dim: int, expansion: int, drop: float = 0.) -> None:
        super().__init__()
        self.chunk = nn.Sequential()
        self.chunk.add_module('linear1', nn.Linear(dim, dim * expansion))
        self.chunk.add_module('act', nn.GELU())
        self.chunk.add_module('drop1', nn.Dropout(drop))
        self.chunk.add_module('linear2', nn.Linear(dim * expansion, dim))
        self.chunk.add_module('drop2', nn.Dropout(drop))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.chunk(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LayerScale(nn.Module):
    """Per-channel scale of an NCHW map (``layer_scale_values`` > 0); key ``weight``."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(-1, 1, 1)


# ----------------------------------------------------------------------------- stage and model
class DatStage(nn.Module):
    """One resolution: ``depth`` blocks of (LPU, attention, MLP). Keys in official order: ``proj`` (only if
    the input width differs), ``layer_norms.{0..2d-1}``, ``mlps``, ``attns``, ``layer_scales``,
    ``local_perception_units``."""

    def __init__(self, fmap_size: Tuple[int, int], dim_in: int, dim: int, depth: int, spec: Sequence[str],
                 heads: int, groups: int, window_size: int, nat_ksize: int, stride: int, ksize: int,
                 offset_range_factor: float, use_pe: bool, no_off: bool, use_dwc_mlp: bool, use_lpu: bool,
                 expansion: int, layer_scale_value: float, drop: float, attn_drop: float,
                 drop_path: Sequence[float]) -> None:
        super().__init__()
        self.depth = depth
        self.spec = tuple(spec)
        self.use_lpu = use_lpu
        self.grad_checkpointing = False
        self.proj = nn.Conv2d(dim_in, dim, 1) if dim_in != dim else nn.Identity()
        self.layer_norms = nn.ModuleList([LayerNormProxy(dim) for _ in range(2 * depth)])
        mlp = ResidualDepthwiseConvMlp if use_dwc_mlp else TokenMlp
        self.mlps = nn.ModuleList([mlp(dim, expansion, drop) for _ in range(depth)])
        self.attns = nn.ModuleList()
        for letter in self.spec:
            if letter == 'N':
                self.attns.append(NeighborhoodAttention(dim, nat_ksize, heads, attn_drop, drop))
            elif letter == 'D':
                self.attns.append(DeformableAttention(dim, heads, groups, fmap_size, stride, ksize,
                                                      offset_range_factor, use_pe, no_off, attn_drop, drop))
            elif letter in ('L', 'S'):
                shift = math.ceil(window_size / 2) if letter == 'S' else 0
                self.attns.append(DatWindowAttention(dim, heads, window_size, shift, fmap_size, attn_drop, drop))
            else:
                raise ValueError(f"stage_spec letter {letter!r} is not supported; use {', '.join(LETTERS)} "
                                 f"(the unreleased P, Q, E, X blocks are not implemented)")
        self.drop_path = nn.ModuleList([DropPath(p) if p > 0. else nn.Identity() for p in drop_path])
        self.layer_scales = nn.ModuleList([LayerScale(dim, layer_scale_value) if layer_scale_value > 0
                                           else nn.Identity() for _ in range(2 * depth)])
        self.local_perception_units = nn.ModuleList([
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if use_lpu else nn.Identity() for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dim_in, H, W) -> (B, dim, H, W): ``proj``, then the blocks (each its own gradient checkpoint)."""
        x = self.proj(x)
        for d in range(self.depth):
            if not torch.jit.is_scripting() and self.grad_checkpointing and x.requires_grad:
                x = cp.checkpoint(self.block, x, d, use_reentrant=False)
            else:
                x = self.block(x, d)
        return x

    # TorchScript calls a ModuleList entry only by a literal index or by iterating the list: the per-block lists
    # and the per-residual ones (two entries a block) are walked to reach entry ``d``, the same code everywhere.
    # No regrouping into block modules (with key-mapping hooks): the module names (stages.S.attns.B) are the
    # official ones that visualize shows and writes into its file names.
    def block(self, x: torch.Tensor, d: int) -> torch.Tensor:
        """Block ``d``: LPU, attention and MLP residuals (one DropPath module serves both, officially)."""
        for j, (lpu, attn, mlp, drop_path) in enumerate(zip(self.local_perception_units, self.attns, self.mlps,
                                                              self.drop_path)):
            if j == d:
                if self.use_lpu:
                    x = x + lpu(x)
                x = x + drop_path(self._layer_scale(attn(self._layer_norm(x, 2 * d)), 2 * d))
                x = x + drop_path(self._layer_scale(mlp(self._layer_norm(x, 2 * d + 1)), 2 * d + 1))
        return x

    def _layer_norm(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """``layer_norms[i](x)``."""
        for j, norm in enumerate(self.layer_norms):
            if j == i:
                return norm(x)
        return x

    def _layer_scale(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """``layer_scales[i](x)``."""
        for j, scale in enumerate(self.layer_scales):
            if j == i:
                return scale(x)
        return x


def _per_stage(name: str, value: Any, n: int = 4) -> list:
    """A per-stage list from a scalar or an n-entry sequence (ValueError naming the argument otherwise)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f'{name}={list(value)} must have one entry per stage ({n})')
        return list(value)
    return [value] * n


class DAT(StageCheckpointing, LinearHeadMixin, nn.Module):
    """DAT++ classifier. forward: (B, 3, H, W) -> (B, num_classes).

    Arguments are the official ``MODEL.DAT`` keys (per-stage lists of 4). ``img_size`` is the resolution
    the deformable position-bias tables (and 'S' masks) are built for; inputs of other sizes are accepted
    (dat_base_384 runs 224-built tables on 384 images, as officially). Unused official keys (sr_ratios,
    heads_q, ns_per_pts, ksize_qnas, nqs, qna_activation, lower_lr_kvs) are accepted and ignored.

    ``dynamic_img_size`` is accepted for timm's one-call dense-prediction API and changes nothing: the model is
    size-agnostic already ('N' and 'D' blocks, the letters of the released models, run at any map size; the
    bias tables are sampled, the stride-2 convolutions round up). Only the unreleased 'L' / 'S' window letters
    need maps that tile into windows ('S': the ``img_size`` map), and say so."""

    head_name = 'cls_head'          # the official name of the classifier

    def __init__(self, img_size: int = 224, patch_size: int = 4, num_classes: int = 1000, expansion: int = 4,
                 dim_stem: int = 96, dims: Sequence[int] = (96, 192, 384, 768), depths: Sequence[int] = (2, 2, 6, 2),
                 heads: Sequence[int] = (3, 6, 12, 24), window_sizes: Sequence[int] = (7, 7, 7, 7),
                 drop_rate: float = 0., attn_drop_rate: float = 0., drop_path_rate: float = 0.,
                 strides: Sequence[int] = (-1, -1, -1, -1), offset_range_factor: Sequence[float] = (1, 2, 3, 4),
                 stage_spec: Sequence[Sequence[str]] = (('L', 'D'), ('L', 'D'), ('L', 'D') * 3, ('L', 'D')),
                 groups: Sequence[int] = (-1, -1, 3, 6), use_pes: Sequence[bool] = (False,) * 4,
                 dwc_pes: Sequence[bool] = (False,) * 4, fixed_pes: Sequence[bool] = (False,) * 4,
                 no_offs: Sequence[bool] = (False,) * 4, use_dwc_mlps: Sequence[bool] = (False,) * 4,
                 use_conv_patches: bool = False, ksizes: Sequence[int] = (9, 7, 5, 3),
                 nat_ksizes: Sequence[int] = (3, 3, 3, 3), layer_scale_values: Sequence[float] = (-1,) * 4,
                 use_lpus: Sequence[bool] = (False,) * 4, log_cpb: Sequence[bool] = (False,) * 4,
                 in_chans: int = 3, global_pool: str = 'avg', use_checkpoint: bool = False,
                 dynamic_img_size: bool = False, **kwargs: Any) -> None:
        super().__init__()
        unused = set(kwargs) - {'sr_ratios', 'heads_q', 'ns_per_pts', 'ksize_qnas', 'nqs', 'qna_activation',
                                'lower_lr_kvs'}
        if unused:
            raise ValueError(f"unknown DAT argument(s) {', '.join(sorted(unused))}")
        depths = _per_stage('depths', depths)
        dims = _per_stage('dims', dims)
        if any(d < 1 for d in depths):
            raise ValueError(f'depths={depths} must be positive')
        stage_spec = [list(s) for s in _per_stage('stage_spec', stage_spec)]
        for i, (spec, depth) in enumerate(zip(stage_spec, depths)):
            if len(spec) != depth:
                raise ValueError(f'stage_spec[{i}]={spec} must have depths[{i}]={depth} letters')
        for name, flags in (('dwc_pes', dwc_pes), ('fixed_pes', fixed_pes), ('log_cpb', log_cpb)):
            if any(_per_stage(name, flags)):
                raise ValueError(f'{name}={list(flags)}: this option of the official code is not implemented')
        if any(dims[i] != 2 * dims[i - 1] for i in range(1, 4)):
            raise ValueError(f'dims={list(dims)} must double from stage to stage (the official stage input '
                             f'width is 2 * dims[i-1])')
        if patch_size % 2 and use_conv_patches:
            raise ValueError(f'patch_size={patch_size} must be even with use_conv_patches (two stride-p/2 convs)')
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = dims[-1]
        self.drop_rate = drop_rate
        self.img_size = img_size
        self.dynamic_img_size = dynamic_img_size     # size-agnostic either way (see the class docstring)
        self.grad_checkpointing = False
        if use_conv_patches:
            self.patch_proj = nn.Sequential(
                nn.Conv2d(in_chans, dim_stem // 2, 3, patch_size // 2, 1), LayerNormProxy(dim_stem // 2), nn.GELU(),
                nn.Conv2d(dim_stem // 2, dim_stem, 3, patch_size // 2, 1), LayerNormProxy(dim_stem))
        else:
            self.patch_proj = nn.Sequential(nn.Conv2d(in_chans, dim_stem, patch_size, patch_size),
                                            LayerNormProxy(dim_stem))
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        size = img_size // patch_size
        per = {name: _per_stage(name, value) for name, value in dict(
            heads=heads, window_sizes=window_sizes, groups=groups, use_pes=use_pes, no_offs=no_offs,
            strides=strides, offset_range_factor=offset_range_factor, use_dwc_mlps=use_dwc_mlps, ksizes=ksizes,
            nat_ksizes=nat_ksizes, layer_scale_values=layer_scale_values, use_lpus=use_lpus).items()}
        self.stages = nn.ModuleList()
        self.feature_info = []
        for i in range(4):
            dim_in = dim_stem if i == 0 else dims[i - 1] * 2      # the official input-width rule
            self.stages.append(DatStage(
                (size, size), dim_in, dims[i], depths[i], stage_spec[i], per['heads'][i], per['groups'][i],
                per['window_sizes'][i], per['nat_ksizes'][i], per['strides'][i], per['ksizes'][i],
                per['offset_range_factor'][i], per['use_pes'][i], per['no_offs'][i], per['use_dwc_mlps'][i],
                per['use_lpus'][i], expansion, per['layer_scale_values'][i], drop_rate, attn_drop_rate,
                dpr[sum(depths[:i]):sum(depths[:i + 1])]))
            self.feature_info.append(dict(num_chs=dims[i], reduction=patch_size * 2 ** i, module=f'stages.{i}'))
            size //= 2
        conv_down = (3, 2, 1) if use_conv_patches else (2, 2, 0)
        self.down_projs = nn.ModuleList([
            nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], *conv_down, bias=False), LayerNormProxy(dims[i + 1]))
            for i in range(3)])
        self.cls_norm = LayerNormProxy(dims[-1])
        self.cls_head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        if use_checkpoint:
            self.set_grad_checkpointing(True)

    # ------------------------------------------------------------------ timm interface
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'absolute_pos_embed'}          # the official list (a name DAT does not have)

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {'relative_position_bias_table', 'rpe_table'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^patch_proj',
                    blocks=r'^stages\.(\d+)' if coarse else [
                        (r'^stages\.(\d+)\.(?:layer_norms|mlps|attns|layer_scales|local_perception_units)\.(\d+)',
                         None),
                        (r'^stages\.(\d+)\.proj', (0,)),
                        (r'^down_projs\.(\d+)', (99999,)),
                        (r'^cls_norm', (99999,))])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, dims[-1], H/32, W/32), after ``cls_norm``."""
        x = self.patch_proj(x)
        for stage, down_proj in zip(self.stages, self.down_projs):     # zip: TorchScript indexes no ModuleList
            x = down_proj(stage(x))                                     # by a variable
        return self.cls_norm(self.stages[-1](x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, H, W) features -> logits (see ``LinearHeadMixin.nchw_head``; no dropout before the head)."""
        return self.nchw_head(x, pre_logits)     # no dropout before the head (officially none)

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls_head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (before each down-projection) as NCHW maps; ``norm`` applies ``cls_norm`` to the last."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt={output_fmt!r}: only 'NCHW' is supported")
        take, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self.patch_proj(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                intermediates.append(self.cls_norm(x) if norm and i == 3 else x)
            if i < len(stages) - 1:
                x = self.down_projs[i](x)
        if intermediates_only:
            return intermediates
        return (self.cls_norm(x) if len(stages) == 4 else x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.down_projs = self.down_projs[:max_index]
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_norm or max_index < 3:
            self.cls_norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take


# ----------------------------------------------------------------------------- checkpoints
_OFFICIAL_WINDOW_NAMES = (('.proj_qkv.', '.qkv.'), ('.proj_out.', '.proj.'))


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: DAT) -> Dict[str, torch.Tensor]:
    """An official DAT++ checkpoint (any official wrapping, ``module.`` prefixes: :func:`state_dicts.unwrap_state_dict`)
    adapted to ``model``: the 'L'/'S' projections ``proj_qkv``/``proj_out`` renamed ``qkv``/``proj``, then the shared
    fitting (:func:`models.checkpoint_fit.fit_state_dict`): ``rpe_table`` and window bias tables of another size
    resized bicubically (the official fine-tuning intent), re-created buffers, a checkpoint of another model
    refused. A head of another class count passes unchanged: timm's pretrained loading drops it, ``--pretrained``
    keeps the fresh head or maps 21841 -> 1000 classes with its index file (:mod:`resume`)."""
    target = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    for key, value in unwrap_state_dict(state_dict).items():
        for old, new in _OFFICIAL_WINDOW_NAMES:
            if '.attns.' in key and old in key and key.replace(old, new) in target:
                key = key.replace(old, new)
        out[key] = value
    return fit_state_dict(out, model)


# ----------------------------------------------------------------------------- registered variants
def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return dict(dict(url='', num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                     interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                     first_conv='patch_proj.0', classifier='cls_head', fixed_input_size=False,
                     min_input_size=(3, 64, 64), license='apache-2.0', paper_ids='arXiv:2309.01430',
                     origin_url='https://github.com/LeapLabTHU/DAT'), **kwargs)


def _create(name: str, pretrained: bool = False, **kwargs: Any) -> DAT:
    return build_backbone(DAT, name, pretrained, checkpoint_filter_fn, **kwargs)


_COMMON = dict(img_size=224, patch_size=4, expansion=4, depths=(2, 4, 18, 2),
               stage_spec=(('N', 'D'), ('N', 'D') * 2, ('N', 'D') * 9, ('D', 'D')), window_sizes=(7,) * 4,
               use_pes=(True,) * 4, dwc_pes=(False,) * 4, strides=(8, 4, 2, 1), offset_range_factor=(-1,) * 4,
               no_offs=(False,) * 4, fixed_pes=(False,) * 4, use_dwc_mlps=(True,) * 4, use_lpus=(True,) * 4,
               use_conv_patches=True, ksizes=(9, 7, 5, 3), nat_ksizes=(7,) * 4, drop_rate=0.,
               attn_drop_rate=0.)
_BASE = dict(_COMMON, dim_stem=128, dims=(128, 256, 512, 1024), heads=(4, 8, 16, 32), groups=(2, 4, 8, 16))
# MODEL.TYPE 'dat' for all: the adapter finds the variant by its architecture (released_name); no softmax twins
DAT_VARIANTS = register_family(__name__, _create, _cfg, {
    'dat_tiny': Variant(dict(_COMMON, dim_stem=64, dims=(64, 128, 256, 512), heads=(2, 4, 8, 16), groups=(1, 2, 4, 8),
                             drop_path_rate=0.2), tag='in1k', doc='DAT++-T (83.9% ImageNet-1k top-1 at 224).'),
    'dat_small': Variant(dict(_COMMON, dim_stem=96, dims=(96, 192, 384, 768), heads=(3, 6, 12, 24), groups=(1, 2, 3, 6),
                              drop_path_rate=0.4), tag='in1k', doc='DAT++-S (84.6%).'),
    'dat_base': Variant(dict(_BASE, drop_path_rate=0.7), tag='in1k', doc='DAT++-B (84.9%).'),
    'dat_base_384': Variant(dict(_BASE, drop_path_rate=0.6), dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
                            tag='in1k', doc='DAT++-B fine-tuned at 384 (85.9%); tables built for 224, run on 384 inputs.'),
})


# ----------------------------------------------------------------------------- config adapter
_ARCH_KEYS = ('patch_size', 'expansion', 'dim_stem', 'dims', 'depths', 'heads', 'window_sizes', 'strides',
              'offset_range_factor', 'stage_spec', 'groups', 'use_pes', 'dwc_pes', 'fixed_pes', 'no_offs',
              'use_dwc_mlps', 'use_conv_patches', 'ksizes', 'nat_ksizes', 'use_lpus')


def released_name(kwargs: Dict[str, Any], input_size: int) -> Optional[str]:
    """The registered variant with this architecture (dat_base_384 for the base layout at 384 inputs)."""
    for name in ('dat_tiny', 'dat_small', 'dat_base'):
        ref = DAT_VARIANTS[name].arch
        if all(_plain(kwargs.get(k, ref[k])) == _plain(ref[k]) for k in _ARCH_KEYS):
            return 'dat_base_384' if name == 'dat_base' and input_size == 384 else name
    return None


_SHARED_EXPERIMENT_KEYS = (('NUM_CLASSES', 'num_classes'), ('DROP_RATE', 'drop_rate'),
                           ('DROP_PATH_RATE', 'drop_path_rate'))


def resolve_dat_keys(config: Any, defaults: Any) -> None:
    """Make the official DAT++ YAML files usable unchanged (in place, before validation): for MODEL.TYPE
    ``dat``, MODEL.DAT.num_classes / drop_rate / drop_path_rate (the keys the official builder reads) win:
    MODEL.NUM_CLASSES / DROP_RATE / DROP_PATH_RATE is set from them when at its default, and a different
    explicit value is a ConfigError naming both keys."""
    if config.MODEL.TYPE != 'dat':
        return
    for upper, lower in _SHARED_EXPERIMENT_KEYS:
        if lower not in config.MODEL.DAT:
            continue
        default, ours, theirs = defaults.MODEL[upper], config.MODEL[upper], config.MODEL.DAT[lower]
        if not isinstance(theirs, (int, float)) or isinstance(theirs, bool):
            raise ConfigError(f"MODEL.DAT.{lower} must be a number, got {theirs!r}")
        if ours == default:
            config.MODEL[upper] = type(default)(theirs)
        elif ours != theirs:
            raise ConfigError(f"MODEL.{upper} {ours!r} contradicts MODEL.DAT.{lower} {theirs!r}; for DAT++ set "
                              f"MODEL.DAT.{lower} (it wins; MODEL.{upper} may only repeat it or stay at its "
                              f"default {default!r})")


# MODEL.DAT: the official section, lower-case keys exactly as in the official YAML files (img_size, dims,
# depths, stage_spec, ...), passed to the model as keyword arguments. MODEL.DAT.img_size is the resolution
# the position-bias tables are built for (as officially; dat_base_384 keeps 224 tables on 384 inputs);
# DATA.IMG_SIZE is the input size.
DAT_SECTION = config_section(ConfigSection('DAT', open=True, resolve=resolve_dat_keys))


@register_config_adapter('dat', reads=(DAT_SECTION,))
def dat_spec(config: Any) -> ModelSpec:
    """MODEL.TYPE 'dat': every key of MODEL.DAT (official names) becomes a DAT argument. MODEL.NUM_CLASSES,
    MODEL.DROP_RATE and MODEL.DROP_PATH_RATE are used (``resolve_dat_keys`` has already reconciled them
    with the DAT section); TRAIN.USE_CHECKPOINT turns on gradient checkpointing. Keys the section omits take the DAT
    class defaults (as the official ``DAT(**config.MODEL.DAT)``), except ``img_size``: DATA.IMG_SIZE."""
    section = config.MODEL.DAT
    kwargs: Dict[str, Any] = {}
    keys: Dict[str, str] = {}
    for key, value in section.items():      # unknown keys reach DAT, whose ValueError names them
        kwargs[key] = _plain(value)
        keys[key] = f'MODEL.DAT.{key}'
    for upper, lower in _SHARED_EXPERIMENT_KEYS:
        kwargs[lower], keys[lower] = config.MODEL[upper], f'MODEL.{upper}'
    kwargs['use_checkpoint'], keys['use_checkpoint'] = config.TRAIN.USE_CHECKPOINT, 'TRAIN.USE_CHECKPOINT'
    if 'img_size' not in kwargs:
        kwargs['img_size'], keys['img_size'] = config.DATA.IMG_SIZE, 'DATA.IMG_SIZE'
    defaults = {k: p.default for k, p in inspect.signature(DAT.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    for key in DAT_VARIANTS['dat_tiny'].arch:      # a key the section omits gets DAT's default, as officially,
        kwargs.setdefault(key, defaults[key])   # not the registered variant's value
    return ModelSpec(released_name(kwargs, config.DATA.IMG_SIZE) or 'dat_tiny', kwargs, keys)
