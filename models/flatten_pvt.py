"""FLatten-PVT: the Pyramid Vision Transformer (v1) with focused linear ('L') or softmax ('S') stages.

Registered timm models: ``flatten_pvt_t``, ``_s``, ``_m``, ``_b`` (b = the official ``flatten_pvt_large``)
and the PVT softmax baselines ``flatten_pvt_t_softmax`` ... ``flatten_pvt_b_softmax``. The experiment
config reaches them through the adapter for MODEL.TYPE ``flatten_pvt_{tiny,small,medium,large}``.

Both attention kinds take keys and values from a spatially reduced copy of the tokens:
  * 'L' stages reduce by ``int(la_sr_ratios[i])`` (the official configs use '1111': none),
    'S' stages by the PVT ratios (8, 4, 2, 1);
  * a reduction is a strided conv (kernel = stride = sr) then LayerNorm, keys ``attn.sr`` / ``attn.norm``;
  * a linear block with fewer key tokens than query tokens stretches V back to the query length with
    :func:`interpolate_tokens` before its depth-wise conv (``dwc``), as the official code does.

State-dict layout matches the official ``flatten_pvt_{tiny,small,medium,large}`` (the modules live in
``stages[i-1]``; state dicts use the official names, :class:`models.builder.OfficialPaths`): ``patch_embed{i}``,
``pos_embed{i}``, ``block{i}.{j}``, the official final ``norm``, which the official forward never applies (the
head reads the token mean of stage 4 directly): kept as buffers (:class:`InertNorm`) so official
checkpoints load strictly while every parameter gets a gradient; and ``head``. Unlike the official
builders, ours honour ``num_classes`` and ``img_size`` (the position embeddings are sized for the image).

``dynamic_img_size=True``: position embeddings and focused-attention positional encodings are resampled
bicubically to the current token grids.

Weight decay: ``no_weight_decay()`` is the official rule ({'cls_token'}: the official PVT decays
pos_embed1-4 and the focused-attention scale / positional encodings); ``extra_no_weight_decay()`` names
our optional extra exclusions.

The attention modules, the block and the layout checks here are shared with :mod:`models.flatten_pvt_v2`.
"""

from functools import partial
from typing import Any, Callable, Dict, Final, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from timm.layers import DropPath, Mlp, resample_abs_pos_embed, trunc_normal_
from timm.models._features import feature_take_indices

from state_dicts import unwrap_state_dict

from .config_adapter import ConfigKey, ConfigSection, ModelSpec, common_spec, config_section, register_config_adapter
from .focused_attention import ATTN_SOFTMAX, LA_SECTION, AttentionTap, FocusedLinearAttentionBase, interpolate_tokens
from .checkpoint_fit import fit_state_dict
from .builder import (OfficialPaths, SoftmaxTwin, Variant, build_backbone, flatten_pretrained_cfg,
                       official_types, register_family, softmax_twin_name, square_size)
from .layers import (ClassifierMixin, PatchEmbed, TokenGroups, init_weights, tokens_to_nchw,
                     tokens_to_nhwc, whole_grid)

SOFTMAX_SR_RATIOS = (8, 4, 2, 1)   # PVT's reductions, used by every softmax stage
LINEAR_POOL = 7                    # PVTv2 'linear' mode pools keys/values to 7 x 7
NUM_STAGES = 4
STRIDE = 32                        # total downsampling: the image must be a multiple of it
Grid = Tuple[int, int]


def reduction_modules(dim: int, sr_ratio: int, linear: bool) -> Dict[str, nn.Module]:
    """The modules of a spatial reduction, in the official creation order: ``linear`` (PVTv2-li):
    adaptive 7x7 pool, 1x1 conv, LayerNorm, GELU; else for sr > 1 a strided conv and LayerNorm."""
    if linear:
        return dict(pool=nn.AdaptiveAvgPool2d(LINEAR_POOL), sr=nn.Conv2d(dim, dim, kernel_size=1),
                    norm=nn.LayerNorm(dim), act=nn.GELU())
    if sr_ratio > 1:
        return dict(sr=nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio), norm=nn.LayerNorm(dim))
    return {}


class SpatialReduction:
    """Mixin for PVT attention: keys and values come from a reduced copy of the tokens (see
    :func:`reduction_modules`)."""

    # TorchScript constants: only the branches for the modules this instance has are compiled
    linear: Final[bool]
    reduces: Final[bool]          # linear or sr_ratio > 1
    linear_pool: Final[int] = LINEAR_POOL
    sr_ratio: int
    resolution: Grid

    def _set_reduction(self, sr_ratio: int, linear: bool, modules: Dict[str, nn.Module]) -> None:
        self.sr_ratio, self.linear, self.reduces = sr_ratio, linear, linear or sr_ratio > 1
        for name, module in modules.items():
            setattr(self, name, module)

    def reduce(self, x: torch.Tensor, hw: Grid) -> torch.Tensor:
        """(B, H*W, C) tokens -> (B, n, C) tokens that keys and values are projected from."""
        if not self.reduces:
            return x
        B, _, C = x.shape
        maps = x.transpose(1, 2).reshape(B, C, hw[0], hw[1])
        if self.linear:
            maps = self.pool(maps)
        y = self.norm(self.sr(maps).flatten(2).transpose(1, 2))
        if self.linear:
            y = self.act(y)
        return y

    def kv_hw(self, hw: Grid) -> Grid:
        """The (h, w) grid of the reduced keys for an (H, W) map."""
        if self.linear:
            return self.linear_pool, self.linear_pool
        return hw[0] // self.sr_ratio, hw[1] // self.sr_ratio


def num_kv_tokens(hw: Grid, sr_ratio: int, linear: bool) -> int:
    """Key/value count after :class:`SpatialReduction` of an (H, W) map."""
    return LINEAR_POOL ** 2 if linear else (hw[0] // sr_ratio) * (hw[1] // sr_ratio)


class SRAttention(SpatialReduction, nn.Module):
    """Softmax attention over spatially reduced keys/values. x (B, H*W, C) -> same shape. Fused
    ``scaled_dot_product_attention`` unless a hook is registered on ``tap``."""

    attn_kind = ATTN_SOFTMAX

    def __init__(self, dim: int, resolution: Grid, num_heads: int, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0., proj_drop: float = 0.,
                 sr_ratio: int = 1, linear: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.dim, self.num_heads, self.resolution = dim, num_heads, tuple(resolution)
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._set_reduction(sr_ratio, linear, reduction_modules(dim, sr_ratio, linear))
        self.tap = AttentionTap()

    def forward(self, x: torch.Tensor, hw: Optional[Grid] = None) -> torch.Tensor:
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).transpose(1, 2)                         # (B, h, N, d)
        kv = self.kv(self.reduce(x, hw if hw is not None else self.resolution))
        k, v = kv.reshape(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
        if not self.tap.hooked():
            x = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, scale=self.scale, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = self.tap(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))  # (B, h, N, n)
            x = self.attn_drop(attn) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, linear={self.linear}'


class FocusedLinearSRAttention(SpatialReduction, FocusedLinearAttentionBase):
    """Focused linear attention over spatially reduced keys/values. x (B, H*W, C) -> same shape.

    The dwc branch needs V at full resolution: reduced values are stretched back with
    :func:`interpolate_tokens` (1-D over the flattened tokens, as officially).
    """

    def __init__(self, dim: int, resolution: Grid, num_heads: int, qkv_bias: bool = True,
                 proj_drop: float = 0., sr_ratio: int = 1, linear: bool = False, focusing_factor: float = 3,
                 kernel_size: int = 5) -> None:
        # official order of creation (and of random draws): q, kv, proj, reduction, then dwc
        q, kv = nn.Linear(dim, dim, bias=qkv_bias), nn.Linear(dim, dim * 2, bias=qkv_bias)
        proj = nn.Linear(dim, dim)
        reduction = reduction_modules(dim, sr_ratio, linear)
        super().__init__(dim, num_heads, num_kv_tokens(resolution, sr_ratio, linear), focusing_factor,
                         kernel_size)
        self.resolution = tuple(resolution)
        self.q, self.kv, self.proj = q, kv, proj
        self.proj_drop = nn.Dropout(proj_drop)
        self._set_reduction(sr_ratio, linear, reduction)
        self.kv_grid: Grid = self.kv_hw(self.resolution)
        self.dwc_last()

    def kv_positional_encoding(self, n: int) -> torch.Tensor:
        native = self.kv_hw(self.resolution)
        if self.kv_grid == native:
            return self.positional_encoding
        return resample_abs_pos_embed(self.positional_encoding, list(self.kv_grid), list(native),
                                      num_prefix_tokens=0, antialias=False)

    def forward(self, x: torch.Tensor, hw: Optional[Grid] = None) -> torch.Tensor:
        B, N, C = x.shape
        hw = hw if hw is not None else self.resolution
        self.kv_grid = self.kv_hw(hw)
        k, v = self.kv(self.reduce(x, hw)).reshape(B, -1, 2, C).unbind(2)   # (B, n, C) each
        if self.kv_grid == hw:          # keys not reduced (static for a fixed size): attend includes the dwc branch
            out = self.attend(self.q(x), k, v, hw=hw)
        else:
            out = self.attend(self.q(x), k, v) + self.rank_restoration(interpolate_tokens(v, self.num_heads, N), hw)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, sr_ratio={self.sr_ratio}, linear={self.linear}'


class PVTBlock(nn.Module):
    """Pre-norm block on (B, H*W, C) tokens of an (H, W) map: attention then MLP.

    ``mlp`` builds the MLP from (dim, hidden); PVT-v1 uses timm's Mlp, PVTv2 its conv MLP (which takes the
    grid: ``takes_grid = True``). ``nested_init`` (PVTv2): the init the official PVTv2 applies inside every
    sub-module's constructor, replayed at the same points so that seeded weights match the official ones.
    """

    mlp_takes_grid: Final[bool]     # a TorchScript constant: only the matching mlp call is compiled

    def __init__(self, dim: int, resolution: Grid, num_heads: int, attn_type: str, sr_ratio: int,
                 mlp: Callable[[int, int], nn.Module], mlp_ratio: float = 4., qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop: float = 0., attn_drop: float = 0.,
                 drop_path: float = 0., linear: bool = False, focusing_factor: float = 3,
                 kernel_size: int = 5, nested_init: Optional[Callable[[nn.Module], None]] = None) -> None:
        super().__init__()
        self.resolution = tuple(resolution)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if attn_type == 'L':
            self.attn = FocusedLinearSRAttention(dim, resolution, num_heads, qkv_bias, drop, sr_ratio, linear,
                                                 focusing_factor, kernel_size)
        elif attn_type == 'S':
            self.attn = SRAttention(dim, resolution, num_heads, qkv_bias, qk_scale, attn_drop, drop, sr_ratio,
                                    linear)
        else:
            raise ValueError(f"attn_type must be 'L' or 'S', got {attn_type!r}")
        if nested_init is not None:
            self.attn.apply(nested_init)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = mlp(dim, int(dim * mlp_ratio))
        self.mlp_takes_grid = bool(getattr(self.mlp, 'takes_grid', False))
        if nested_init is not None:
            self.mlp.apply(nested_init)
            self.apply(nested_init)

    def forward(self, x: torch.Tensor, hw: Optional[Grid] = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        y = self.norm2(x)
        y = self.mlp(y, hw) if self.mlp_takes_grid else self.mlp(y)
        return x + self.drop_path(y)

    def token_groups(self, attn: nn.Module) -> TokenGroups:
        """Whole map in one group (native size); keys are reduced unless sr == 1 and not pooled."""
        reduced = bool(getattr(attn, 'linear', False) or getattr(attn, 'sr_ratio', 1) > 1)
        return whole_grid(self.resolution, keys_reduced=reduced)


def stage_sr_ratios(attn_type: str, la_sr_ratios: str) -> List[int]:
    """Per-stage reduction: PVT's (8, 4, 2, 1) for 'S' stages, the digit of la_sr_ratios for 'L'."""
    return [SOFTMAX_SR_RATIOS[i] if t == 'S' else int(la_sr_ratios[i]) for i, t in enumerate(attn_type)]


def check_pvt_layout(img_size: int, attn_type: str, la_sr_ratios: str, linear: bool = False) -> None:
    """Raise ValueError (naming the keyword) unless the image tiles every stage and every reduced map."""
    if len(attn_type) != NUM_STAGES or set(attn_type) - {'L', 'S'}:
        raise ValueError(f"attn_type must be {NUM_STAGES} letters from 'L'/'S' for PVT, got {attn_type!r}")
    if len(la_sr_ratios) != NUM_STAGES or not la_sr_ratios.isdigit() or '0' in la_sr_ratios:
        raise ValueError(f"la_sr_ratios must be {NUM_STAGES} non-zero digits, got {la_sr_ratios!r}")
    if img_size % STRIDE:
        raise ValueError(f'img_size {img_size} is not divisible by {STRIDE} (the PVT downsampling); '
                         f'use e.g. {max(STRIDE, img_size // STRIDE * STRIDE)}')
    if linear:
        return
    for i, sr in enumerate(stage_sr_ratios(attn_type, la_sr_ratios)):
        res = img_size // 2 ** (i + 2)
        if res % sr:
            raise ValueError(f"img_size {img_size}: stage {i + 1} map {res}x{res} is not divisible by its "
                             f"sr ratio {sr}; change img_size or la_sr_ratios")


def check_stage_lists(**lists: Sequence) -> None:
    """ValueError unless every per-stage list has NUM_STAGES entries."""
    for name, value in lists.items():
        if len(value) != NUM_STAGES:
            raise ValueError(f'{name}={tuple(value)} needs one entry per stage ({NUM_STAGES})')


class PyramidStage(nn.Module):
    """One pyramid stage: patch embedding of the previous map (or the image), the PVT position embedding and
    its dropout (PVT-v1), the blocks, the stage norm (PVTv2). (B, C_in, H, W) -> tokens (B, h*w, C), (h, w)."""

    dynamic: Final[bool]

    def __init__(self, dim: int, patch_embed: nn.Module, blocks: nn.ModuleList, resolution: Grid, dynamic: bool,
                 pos_embed: bool = False, drop: float = 0., norm: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.resolution, self.dynamic = tuple(resolution), dynamic
        if pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, resolution[0] * resolution[1], dim))
        else:
            self.register_parameter('pos_embed', None)
        self.patch_embed = patch_embed
        self.pos_drop = nn.Dropout(drop) if pos_embed else nn.Identity()
        self.blocks = blocks
        self.norm = norm if norm is not None else nn.Identity()

    def forward(self, x: torch.Tensor, use_checkpoint: bool = False) -> Tuple[torch.Tensor, Grid]:
        x, hw = self.patch_embed.forward_grid(x)
        # the blocks get no grid at the stage's native map (a fixed-size model sees only those, checked on the
        # input: no comparison on traced shapes)
        grid: Optional[Grid] = None if not self.dynamic or hw == self.resolution else hw
        if self.pos_embed is not None:
            pos = self.pos_embed
            if grid is not None:
                pos = resample_abs_pos_embed(pos, list(grid), list(self.resolution), num_prefix_tokens=0,
                                             antialias=False)
            x = self.pos_drop(x + pos)
        for blk in self.blocks:
            if not torch.jit.is_scripting() and use_checkpoint and x.requires_grad:
                x = checkpoint(blk, x, grid, use_reentrant=False)
            else:
                x = blk(x, grid)
        return self.norm(x), hw


class PyramidClassifier(OfficialPaths, ClassifierMixin, nn.Module):
    """What the PVT and PVTv2 models share: the stages in ``self.stages`` (:class:`PyramidStage`) walked by one
    loop, the official per-stage state-dict names (``patch_embed{i}``, ``pos_embed{i}``, ``block{i}``,
    ``norm{i}``; :class:`OfficialPaths`), pruning and the timm interface."""

    num_stages: int = NUM_STAGES
    use_checkpoint: bool
    dynamic_img_size: bool
    resolutions: List[Grid]

    def _official_keys(self) -> None:
        """Name our stage paths as the official per-stage keys in state dicts (see :class:`OfficialPaths`)."""
        self.use_official_keys((f'stages.{i}.{ours}', f'{official}{i + 1}') for i in range(NUM_STAGES)
                               for ours, official in (('patch_embed', 'patch_embed'), ('pos_embed', 'pos_embed'),
                                                      ('blocks', 'block'), ('norm', 'norm')))

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.use_checkpoint = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], Tuple[float, ...]]:
        return self.official_group_matcher(dict(
            stem=r'^patch_embed1|^pos_embed1',
            blocks=[(r'^(?:patch_embed|pos_embed|norm)(\d+)', (0,)), (r'^block(\d+)\.(\d+)', None)]
            if not coarse else r'^(?:patch_embed|pos_embed|block|norm)(\d+)'))

    def _forward_stages(self, x: torch.Tensor, take: List[int], stop: int
                        ) -> Tuple[torch.Tensor, Grid, List[torch.Tensor]]:
        """The stage loop (eager, fx and TorchScript): image (B, 3, H, W) -> tokens of stage ``stop`` (0-based),
        their grid, and the (B, C_i, H_i, W_i) maps of the stages in ``take``."""
        hw: Grid = (x.shape[-2], x.shape[-1])
        maps: List[torch.Tensor] = []
        for i, stage in enumerate(self.stages):
            if i <= stop:
                x, hw = stage(x if i == 0 else tokens_to_nchw(x, hw), self.use_checkpoint)
                if i in take:
                    maps.append(tokens_to_nchw(x, hw))
        return x, hw, maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> last-stage map (B, H/32, W/32, C) (``output_fmt`` 'NHWC')."""
        x, hw, _ = self._forward_stages(x, [], len(self.stages) - 1)
        return tokens_to_nhwc(x, hw)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """Stage maps (B, C_i, H/2^(i+2), W/2^(i+2)) of ``indices``. Returns ``[maps]`` or
        ``(forward_features output, [maps])``. ``norm`` changes nothing: PVTv2 maps are normed by their
        stage norms, and the official PVT-v1 never applies its final ``norm``."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt={output_fmt!r}: only 'NCHW' is supported")
        last = self.num_stages - 1
        take, max_index = feature_take_indices(self.num_stages, indices)
        stop = max_index if (stop_early or intermediates_only) else last
        x, hw, out = self._forward_stages(x, list(take), stop)
        if intermediates_only:
            return out
        return tokens_to_nhwc(x, hw), out

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take, max_index = feature_take_indices(self.num_stages, indices)
        self.stages = self.stages[:max_index + 1]
        self.num_stages = max_index + 1
        if prune_head:
            self.reset_classifier(0, '')
        return take


class InertNorm(nn.Module):
    """The official PVT-v1's final LayerNorm, which its forward never applies: ``weight`` / ``bias`` are
    buffers, not parameters, so official checkpoints (which carry ``norm.*``) load strictly and every
    parameter of the model gets a gradient (no DDP ``find_unused_parameters``). Not callable; ``eps`` records
    the official LayerNorm's."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer('weight', torch.ones(dim))
        self.register_buffer('bias', torch.zeros(dim))


class FLattenPVT(PyramidClassifier):
    """FLatten-PVT. forward: (B, 3, H, W) -> (B, num_classes); forward_features -> (B, H/32, W/32, C4).

    Stage i (1-based) sees an (img / 2^(i+1))^2 map; its blocks' attention kind is ``attn_type[i-1]``.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dims: Sequence[int] = (64, 128, 320, 512), num_heads: Sequence[int] = (1, 2, 5, 8),
                 mlp_ratios: Sequence[float] = (8, 8, 4, 4), depths: Sequence[int] = (2, 2, 2, 2),
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop_rate: float = 0.,
                 attn_drop_rate: float = 0., drop_path_rate: float = 0., attn_type: str = 'LLLL',
                 la_sr_ratios: str = '1111', focusing_factor: float = 3, kernel_size: int = 5,
                 use_checkpoint: bool = False, global_pool: str = 'avg', dynamic_img_size: bool = False) -> None:
        super().__init__()
        img_size, la_sr_ratios = square_size(img_size), str(la_sr_ratios)
        check_stage_lists(embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=mlp_ratios, depths=depths)
        check_pvt_layout(img_size, attn_type, la_sr_ratios)
        self.num_classes, self.use_checkpoint, self.global_pool = num_classes, use_checkpoint, global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.dynamic_img_size = dynamic_img_size
        self.resolutions = [(img_size // 2 ** (i + 2),) * 2 for i in range(NUM_STAGES)]
        srs = stage_sr_ratios(attn_type, la_sr_ratios)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        stages = []
        for i in range(NUM_STAGES):
            dim, res = embed_dims[i], self.resolutions[i]
            embed = (PatchEmbed(img_size, patch_size, in_chans, dim, True, dynamic_img_size) if i == 0 else
                     PatchEmbed(self.resolutions[i - 1][0], 2, embed_dims[i - 1], dim, True, dynamic_img_size))
            mlp = partial(_timm_mlp, drop=drop_rate)
            blocks = nn.ModuleList([
                PVTBlock(dim, res, num_heads[i], attn_type[i], srs[i], mlp, mlp_ratios[i], qkv_bias, qk_scale,
                         drop_rate, attn_drop_rate, dpr[sum(depths[:i]) + j], focusing_factor=focusing_factor,
                         kernel_size=kernel_size)
                for j in range(depths[i])])
            stages.append(PyramidStage(dim, embed, blocks, res, dynamic_img_size, pos_embed=True, drop=drop_rate))
        self.stages = nn.ModuleList(stages)
        self.norm = InertNorm(embed_dims[-1], eps=1e-6)      # official checkpoints carry it; never applied
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=embed_dims[i], reduction=patch_size * 2 ** i, module=f'stages.{i}')
                             for i in range(NUM_STAGES)]
        for stage in self.stages:
            trunc_normal_(stage.pos_embed, std=.02)
        self.apply(init_weights)
        self._official_keys()

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The official rule: the official FLatten-PVT decays pos_embed1-4 (see extra_no_weight_decay)."""
        return {'cls_token'}


def _timm_mlp(dim: int, hidden: int, drop: float = 0.) -> nn.Module:
    return Mlp(dim, hidden, drop=drop)


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """An official (or our) PVT / PVTv2 checkpoint -> this model's state dict: unwraps the official
    wrappings (``model`` / ``state_dict`` / EMA, ``module.``), resizes ``pos_embed{i}`` and the
    focused-attention ``positional_encoding`` grids to the model's (bicubic, square grids), and refuses a
    checkpoint of another model (:func:`models.checkpoint_fit.fit_state_dict`)."""
    return fit_state_dict(unwrap_state_dict(state_dict), model)


# ----------------------------------------------------------------------------- registry
def pvt_cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return flatten_pretrained_cfg('patch_embed1.proj', url, **kwargs)


def _create(name: str, pretrained: bool = False, **kwargs: Any) -> FLattenPVT:
    return build_backbone(FLattenPVT, name, pretrained, checkpoint_filter_fn, **kwargs)


# attention 'LLLL' (the class default); every other architecture keyword is the PVT default
PVT_VARIANTS = register_family(__name__, _create, pvt_cfg, {
    'flatten_pvt_t': Variant(dict(depths=(2, 2, 2, 2)), dict(url='https://cloud.tsinghua.edu.cn/f/3ab1d773f19d45648690/?dl=1'),
                             'flatten_pvt_tiny'),
    'flatten_pvt_s': Variant(dict(depths=(3, 4, 6, 3)), official_type='flatten_pvt_small'),
    'flatten_pvt_m': Variant(dict(depths=(3, 4, 18, 3)), official_type='flatten_pvt_medium'),
    'flatten_pvt_b': Variant(dict(depths=(3, 8, 27, 3)), official_type='flatten_pvt_large'),
}, SoftmaxTwin(dict(attn_type='SSSS'), dict(paper_ids='arXiv:2102.12122', paper_name='Pyramid Vision Transformer', notes=(
    'softmax baseline of FLatten-PVT (PVT layout); no official weights in the FLatten release',))))


# ----------------------------------------------------------------------------- experiment config
def pyramid_section(name: str) -> ConfigSection:
    """MODEL.<name> of PVT / PVTv2 (ours): sizes of a scaled model; empty keeps the variant's."""
    return config_section(ConfigSection(name, (
        ConfigKey('IN_CHANS', 3, 'in_chans'),
        *(ConfigKey(key, [], kwarg, keep=[]) for key, kwarg in (
            ('EMBED_DIMS', 'embed_dims'), ('NUM_HEADS', 'num_heads'), ('MLP_RATIOS', 'mlp_ratios'),
            ('DEPTHS', 'depths'))),
    )))


PVT_LA_KEYS = ('ATTN_TYPE', 'PVT_LA_SR_RATIOS', 'FOCUSING_FACTOR', 'KERNEL_SIZE')


def pyramid_spec(config, name: str, arch: Dict[str, Any], section: ConfigSection, linear: bool = False) -> ModelSpec:
    """Common part of the PVT / PVTv2 adapters: the variant's architecture, overridden by the non-empty
    size keys of ``section`` (e.g. MODEL.PVT.DEPTHS) and the attention keys of MODEL.LA; the softmax
    baseline's registered name when every stage is 'S'."""
    spec = common_spec(config, name)
    spec.kwargs.update(arch)
    spec.read(config, section).read(config, LA_SECTION, PVT_LA_KEYS)
    spec.name = softmax_twin_name(name, spec.kwargs['attn_type'])
    return spec.checked(lambda *a: check_pvt_layout(*a, linear=linear), 'img_size', 'attn_type', 'la_sr_ratios')


PVT_SECTION = pyramid_section('PVT')


@register_config_adapter(*official_types(PVT_VARIANTS), reads=(PVT_SECTION, (LA_SECTION, PVT_LA_KEYS)))
def pvt_spec(config) -> ModelSpec:
    """MODEL.TYPE flatten_pvt_{tiny,small,medium,large}."""
    name = official_types(PVT_VARIANTS)[config.MODEL.TYPE]
    return pyramid_spec(config, name, PVT_VARIANTS[name].arch, PVT_SECTION)
