"""FLatten-Swin: the Swin Transformer layout with focused linear ('L') or window softmax ('S') stages.

Registered timm models (``import models; timm.create_model(name, **kwargs)``): ``flatten_swin_t``, ``_s``,
``_b``, ``_b_384`` and the Swin softmax baselines ``flatten_swin_t_softmax``, ``_s_softmax``, ``_b_softmax``,
``_b_384_softmax`` (same layout, 'SSSS', window 7 / 12). The experiment config reaches them through the
``flatten_swin`` adapter (MODEL.SWIN.*, MODEL.LA.*).

State-dict layout matches the official ``flatten_swin`` models. Window rules (official):
  * 'L' stages use ``window_size`` (56, or 96 at 384), clamped to the stage resolution; a clamped window
    means one global window and no shift.
  * 'S' stages use window 7 (12 when window_size > 56), shifted in every other block, with a relative
    position bias and the shifted-window attention mask (-100 across region boundaries).
  * A shifted 'L' block (possible only with a window smaller than the stage) keeps the ``attn_mask``
    buffer for checkpoint compatibility; linear attention does not use it, as officially.

``dynamic_img_size=True`` (any input size, e.g. 512 x 1024 for detection): the image is padded to a
multiple of the patch, global linear blocks stay global (their positional encoding is resampled
bicubically to the token grid), windowed blocks pad the map to window multiples and shift with a mask
computed for the padded map, as the upstream Swin detection backbone does; odd maps are padded before
patch merging. The default (False) keeps the fixed-size behaviour and its clear error for another size.

Weight decay: ``no_weight_decay()`` / ``no_weight_decay_keywords()`` give the official rules
({'absolute_pos_embed'} / {'relative_position_bias_table'}); ``extra_no_weight_decay()`` lists
our optional extra exclusions (full names of the focused-attention scales and positional encodings;
used by the optimizer only with TRAIN.OPTIMIZER.EXTRA_NO_WEIGHT_DECAY).
"""

from typing import Any, Dict, Final, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, resample_abs_pos_embed, trunc_normal_
from timm.models._features import feature_take_indices

from state_dicts import unwrap_state_dict

from .config_adapter import ConfigKey, ConfigSection, ModelSpec, common_spec, config_section, register_config_adapter
from .focused_attention import LA_SECTION, FocusedLinearAttentionBase
from .checkpoint_fit import fit_state_dict
from .builder import (SoftmaxTwin, Variant, build_backbone, flatten_pretrained_cfg, register_family,
                       softmax_twin_name, square_size)
from .layers import (ClassifierMixin, PatchEmbed, TokenGroups, WindowAttention, init_weights,
                     relative_position_index, run_blocks, shifted_window_mask, tokens_to_nchw, tokens_to_nhwc,
                     window_partition, window_reverse)

Grid = Tuple[int, int]


class FocusedLinearWindowAttention(FocusedLinearAttentionBase):
    """Focused linear attention inside each window. x (B*nW, h*w, C) -> same shape; ``hw`` is the window
    shape (default the square ``window``; a global block at another input size passes the map shape)."""

    def __init__(self, dim: int, window: int, num_heads: int, qkv_bias: bool = True,
                 proj_drop: float = 0., focusing_factor: float = 3, kernel_size: int = 5) -> None:
        qkv, proj = nn.Linear(dim, dim * 3, bias=qkv_bias), nn.Linear(dim, dim)   # official draw order: before dwc
        super().__init__(dim, num_heads, window * window, focusing_factor, kernel_size)
        self.window = window
        self.qkv, self.proj = qkv, proj
        self.proj_drop = nn.Dropout(proj_drop)
        self.kv_grid: Grid = (window, window)
        self.dwc_last()

    def kv_positional_encoding(self, n: int) -> torch.Tensor:
        if self.kv_grid == (self.window, self.window):
            return self.positional_encoding
        return resample_abs_pos_embed(self.positional_encoding, list(self.kv_grid), [self.window] * 2,
                                      num_prefix_tokens=0, antialias=False)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                hw: Optional[Grid] = None) -> torch.Tensor:
        B_, N, C = x.shape
        self.kv_grid = hw if hw is not None else (self.window, self.window)
        q, k, v = self.qkv(x).reshape(B_, N, 3, C).unbind(2)
        x = self.attend(q, k, v, hw=self.kv_grid)                      # includes the dwc branch
        return self.proj_drop(self.proj(x))


class SwinBlock(nn.Module):
    """Pre-norm block on (B, H*W, C) tokens: (shifted) window attention then MLP."""

    global_linear: Final[bool]      # a TorchScript constant: the branch calling attn with ``hw`` compiles only when set

    def __init__(self, dim: int, resolution: Grid, num_heads: int, window: int, shift: int,
                 attn_type: str, mlp_ratio: float = 4., qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 focusing_factor: float = 3, kernel_size: int = 5) -> None:
        super().__init__()
        self.resolution = tuple(resolution)
        if min(resolution) <= window:           # one window covers the map: no partition, no shift
            window, shift = min(resolution), 0
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        if attn_type == 'L':
            self.attn = FocusedLinearWindowAttention(dim, window, num_heads, qkv_bias, drop,
                                                     focusing_factor, kernel_size)
        else:
            self.attn = WindowAttention(dim, window, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        # a linear block whose window is the whole (square) map stays global at any input size
        self.global_linear = attn_type == 'L' and self.resolution == (window, window)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        mask = shifted_window_mask(resolution, window, shift) if shift > 0 else None
        self.register_buffer('attn_mask', mask)

    def forward(self, x: torch.Tensor, hw: Optional[Grid] = None) -> torch.Tensor:
        H, W = self.resolution if hw is None else hw
        B, L, C = x.shape
        y = self.norm1(x).view(B, H, W, C)
        if (H, W) == self.resolution:
            y = self._windows(y, self.attn_mask)
        elif self.global_linear:
            y = self.attn(y.reshape(B, L, C), hw=(H, W)).view(B, H, W, C)
        else:                                  # another size: pad to window multiples (upstream detection)
            w = self.window
            pad_h, pad_w = (-H) % w, (-W) % w
            y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))
            mask: Optional[torch.Tensor] = None
            if self.shift:
                mask = shifted_window_mask((H + pad_h, W + pad_w), w, self.shift).to(y)
            y = self._windows(y, mask)[:, :H, :W].contiguous()
        x = x + self.drop_path(y.reshape(B, L, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _windows(self, y: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C): cyclic shift, window attention, reverse."""
        _, H, W, _ = y.shape
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = window_reverse(self.attn(window_partition(y, self.window), mask=mask), self.window, H, W)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        return y

    def token_groups(self, attn: nn.Module) -> TokenGroups:
        """Token layout (native size): cyclic shift by -shift then window partition."""
        H, W = self.resolution
        index = torch.arange(H * W).view(1, H, W, 1)
        if self.shift:
            index = torch.roll(index, shifts=(-self.shift, -self.shift), dims=(1, 2))
        positions = window_partition(index, self.window).squeeze(-1)
        return TokenGroups((H, W), positions, (self.window, self.window))

    def extra_repr(self) -> str:
        return f'resolution={self.resolution}, window={self.window}, shift={self.shift}'


class PatchMerging(nn.Module):
    """(B, H*W, C) -> (B, H/2*W/2, 2C): concatenate 2x2 neighbours, LayerNorm(4C), linear (no bias)."""

    def __init__(self, resolution: Grid, dim: int) -> None:
        super().__init__()
        self.resolution = tuple(resolution)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, hw: Optional[Grid] = None) -> torch.Tensor:
        H, W = self.resolution if hw is None else hw
        B, _, C = x.shape
        x = x.view(B, H, W, C)
        if H % 2 or W % 2:                     # only at dynamic sizes: pad odd maps (upstream detection)
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class SwinStage(nn.Module):
    """Blocks of one resolution, then optional patch merging. Keys: ``blocks.{j}``, ``downsample``."""

    def __init__(self, dim: int, resolution: Grid, depth: int, num_heads: int, window: int,
                 attn_type: str, drop_path: Sequence[float], downsample: bool, use_checkpoint: bool = False,
                 **block_kwargs) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            SwinBlock(dim, resolution, num_heads, window, 0 if i % 2 == 0 else window // 2, attn_type,
                      drop_path=drop_path[i], **block_kwargs)
            for i in range(depth)])
        self.downsample = PatchMerging(resolution, dim) if downsample else None

    def forward_blocks(self, x: torch.Tensor, hw: Optional[Grid] = None) -> torch.Tensor:
        if torch.jit.is_scripting():            # TorchScript: no activation checkpointing (run_blocks)
            for blk in self.blocks:
                x = blk(x, hw)
            return x
        if hw is None:
            return run_blocks(self.blocks, x, self.use_checkpoint)
        return run_blocks(self.blocks, x, self.use_checkpoint, hw)

    def forward(self, x: torch.Tensor, hw: Optional[Grid] = None) -> torch.Tensor:
        x = self.forward_blocks(x, hw)
        return self.downsample(x, hw) if self.downsample is not None else x


def stage_windows(window_size: int, attn_type: str) -> List[int]:
    """The (unclamped) window of each stage: window_size for 'L', 7 or 12 for 'S' (official rule)."""
    return [window_size if t == 'L' else (7 if window_size <= 56 else 12) for t in attn_type]


def check_swin_layout(img_size: int, patch_size: int, depths: Sequence[int], num_heads: Sequence[int],
                      window_size: int, attn_type: str) -> None:
    """Raise ValueError (naming the keyword argument) unless every stage's map tiles into its windows."""
    n = len(depths)
    if len(attn_type) != n or len(num_heads) != n or set(attn_type) - {'L', 'S'}:
        raise ValueError(f"attn_type={attn_type!r}, depths={tuple(depths)} and num_heads={tuple(num_heads)} must "
                         f"all have one entry per stage ('L' focused linear or 'S' softmax)")
    if img_size % patch_size:
        raise ValueError(f'img_size {img_size} is not divisible by patch_size {patch_size}')
    res = img_size // patch_size
    for i, w in enumerate(stage_windows(window_size, attn_type)):
        if i < n - 1 and res % 2:
            raise ValueError(f'img_size {img_size}: stage {i + 1} map {res}x{res} is odd and cannot be '
                             f'patch-merged; use a multiple of {patch_size * 2 ** (n - 1)}')
        w = min(w, res)
        if res % w:
            raise ValueError(f'img_size {img_size}: stage {i + 1} map {res}x{res} is not divisible by its '
                             f'window {w}; change img_size or window_size')
        res //= 2


class FLattenSwinTransformer(ClassifierMixin, nn.Module):
    """FLatten-Swin. forward: (B, 3, H, W) -> (B, num_classes); forward_features -> (B, H/32, W/32, C)."""

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4., qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 drop_rate: float = 0., attn_drop_rate: float = 0., drop_path_rate: float = 0.1, ape: bool = False,
                 patch_norm: bool = True, use_checkpoint: bool = False, focusing_factor: float = 3,
                 kernel_size: int = 5, attn_type: str = 'LLLL', global_pool: str = 'avg',
                 dynamic_img_size: bool = False) -> None:
        super().__init__()
        n = len(depths)
        img_size = square_size(img_size)
        check_swin_layout(img_size, patch_size, depths, num_heads, window_size, attn_type)
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (n - 1))
        self.dynamic_img_size = dynamic_img_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, patch_norm, dynamic_img_size)
        grid = self.patch_embed.grid_size
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
        self.feature_info = [dict(num_chs=int(embed_dim * 2 ** i), reduction=patch_size * 2 ** i,
                                  module=f'layers.{i}') for i in range(n)]
        self.apply(init_weights)

    # ------------------------------------------------------------------ timm interface
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The official rule (the official FLatten-Swin decays the focused-attention scale/encodings)."""
        return {'absolute_pos_embed'}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {'relative_position_bias_table'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^absolute_pos_embed|patch_embed',
                    blocks=r'^layers\.(\d+)' if coarse else [(r'^layers\.(\d+)\.downsample', (0,)),
                                                            (r'^layers\.(\d+)\.\w+\.(\d+)', None),
                                                            (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for layer in self.layers:
            layer.use_checkpoint = enable

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Grid]:
        x, hw = self.patch_embed.forward_grid(x)
        if self.absolute_pos_embed is not None:
            pos = self.absolute_pos_embed
            if self.patch_embed.dynamic_img_size and hw != self.patch_embed.grid_size:
                pos = resample_abs_pos_embed(pos, list(hw), list(self.patch_embed.grid_size), num_prefix_tokens=0,
                                             antialias=False)
            x = x + pos
        return self.pos_drop(x), hw

    def _stages(self, x: torch.Tensor, stop: int, take: List[int]
                ) -> Tuple[torch.Tensor, Grid, List[Tuple[int, torch.Tensor, Grid]]]:
        """Run the stages up to ``stop``: the tokens of stage ``stop`` (before a downsample), their grid, and
        (index, tokens, grid) of every stage index in ``take``, in stage order. The tokens passed on to the
        next stage are downsampled."""
        x, hw = self._embed(x)
        # a fixed-size model sees only its native maps (checked on the input): no comparison on traced shapes
        native = not self.patch_embed.dynamic_img_size or hw == self.patch_embed.grid_size
        taken: List[Tuple[int, torch.Tensor, Grid]] = []
        for i, layer in enumerate(self.layers):
            if i <= stop:                       # not a break / slice: TorchScript unrolls the ModuleList
                x = layer.forward_blocks(x, None if native else hw)
                if i in take:
                    taken.append((i, x, hw))
                if layer.downsample is not None and i < stop:
                    x = layer.downsample(x, None if native else hw)
                    hw = ((hw[0] + 1) // 2, (hw[1] + 1) // 2)
        return x, hw, taken

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normed last-stage map (B, H/32, W/32, C) (``output_fmt`` 'NHWC')."""
        x, hw, _ = self._stages(x, len(self.layers) - 1, [])
        return tokens_to_nhwc(self.norm(x), hw)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """Stage maps (B, C_i, H/(4*2^i), W/(4*2^i)) of ``indices``; ``norm`` applies the final norm to the
        last stage. Returns ``[maps]`` or ``(forward_features output, [maps])``."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt={output_fmt!r}: only 'NCHW' is supported")
        last = len(self.layers) - 1
        take, max_index = feature_take_indices(len(self.layers), indices)
        stop = max_index if (stop_early or intermediates_only) else last
        x, hw, taken = self._stages(x, stop, take)
        out = [tokens_to_nchw(self.norm(t) if norm and i == last else t, g) for i, t, g in taken]
        if intermediates_only:
            return out
        return tokens_to_nhwc(self.norm(x) if stop == last else x, hw), out

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take, max_index = feature_take_indices(len(self.layers), indices)
        if prune_norm or max_index < len(self.layers) - 1:
            self.norm = nn.Identity()
        self.layers = self.layers[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, '')
        return take


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_filter_fn(state_dict: Dict[str, Any], model: FLattenSwinTransformer) -> Dict[str, torch.Tensor]:
    """An official (or our) checkpoint -> this model's state dict: unwraps ``model`` / ``state_dict`` /
    EMA wrappings and ``module.`` prefixes, takes the re-creatable buffers (relative_position_index,
    attn_mask) from the model, resizes relative position bias tables (bicubic,
    ``timm.layers.resize_rel_pos_bias_table_simple``) and positional encodings / absolute position
    embeddings (bicubic, ``timm.layers.resample_abs_pos_embed``) to the model's windows, and refuses a
    checkpoint of another model (:func:`models.checkpoint_fit.fit_state_dict`)."""
    return fit_state_dict(unwrap_state_dict(state_dict), model)


# ----------------------------------------------------------------------------- registry
def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return flatten_pretrained_cfg('patch_embed.proj', url, **kwargs)


def _create(name: str, pretrained: bool = False, **kwargs: Any) -> FLattenSwinTransformer:
    return build_backbone(FLattenSwinTransformer, name, pretrained, checkpoint_filter_fn, **kwargs)


# variant -> architecture (the official YAMLs; MODEL.TYPE flatten_swin finds the variant by its architecture)
_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=56, attn_type='LLSS')
_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=56, attn_type='LLSS')
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=56, attn_type='LLSS')
SWIN_ARCHS = register_family(__name__, _create, _cfg, {
    'flatten_swin_t': Variant(dict(_T, drop_path_rate=0.2), dict(url='https://cloud.tsinghua.edu.cn/f/e1518e76703e4e57a7f2/?dl=1')),
    'flatten_swin_s': Variant(dict(_S, drop_path_rate=0.3), dict(url='https://cloud.tsinghua.edu.cn/f/94188e52af354bf4a88b/?dl=1')),
    'flatten_swin_b': Variant(dict(_B, drop_path_rate=0.5), dict(url='https://cloud.tsinghua.edu.cn/f/7a9e5186bad04e7fb3a9/?dl=1')),
    'flatten_swin_b_384': Variant(dict(_B, window_size=96, drop_path_rate=0.5, img_size=384),
                                  dict(url='https://cloud.tsinghua.edu.cn/f/0d0330cf2e5249f1abb6/?dl=1',
                                       input_size=(3, 384, 384), crop_pct=1.0),
                                  softmax=dict(window_size=96)),     # the 384 baseline keeps its 96 windows
}, SoftmaxTwin(dict(attn_type='SSSS', window_size=7), dict(paper_ids='arXiv:2103.14030', paper_name='Swin Transformer', notes=(
    'softmax baseline of FLatten-Swin (Swin layout); no official weights in the FLatten release',))))


# ----------------------------------------------------------------------------- experiment config
def _closest_variant(kwargs: Dict[str, Any]) -> str:
    """The registered variant whose architecture the config describes (only its pretrained_cfg matters:
    every architecture keyword is passed explicitly)."""
    def same(key: str, value: Any) -> bool:
        got = kwargs.get(key, 224)
        return tuple(got) == tuple(value) if isinstance(value, tuple) else got == value

    for name, variant in SWIN_ARCHS.items():
        arch = variant.arch
        if all(same(k, v) for k, v in dict(arch, img_size=arch.get('img_size', 224)).items()
               if k != 'drop_path_rate'):
            return name
    return softmax_twin_name('flatten_swin_t', kwargs['attn_type'])


SWIN_SECTION = config_section(ConfigSection('SWIN', (
    ConfigKey('PATCH_SIZE', 4, 'patch_size'),
    ConfigKey('IN_CHANS', 3, 'in_chans'),
    ConfigKey('EMBED_DIM', 96, 'embed_dim'),
    ConfigKey('DEPTHS', [2, 2, 6, 2], 'depths'),
    ConfigKey('NUM_HEADS', [3, 6, 12, 24], 'num_heads'),
    ConfigKey('WINDOW_SIZE', 7, 'window_size'),
    ConfigKey('MLP_RATIO', 4., 'mlp_ratio'),
    ConfigKey('QKV_BIAS', True, 'qkv_bias'),
    ConfigKey('QK_SCALE', None, 'qk_scale'),
    ConfigKey('APE', False, 'ape'),
    ConfigKey('PATCH_NORM', True, 'patch_norm'),
)))
# The official Swin config's other MODEL.SWIN keys (KA, DIM_REDUCTION, STAGES, RPB, ...) are not declared: no
# official YAML sets them, and checkpoints load without merging their pickled config.


@register_config_adapter('flatten_swin', reads=(SWIN_SECTION, (LA_SECTION, ('FOCUSING_FACTOR', 'KERNEL_SIZE',
                                                                            'ATTN_TYPE'))))
def swin_spec(config) -> ModelSpec:
    """MODEL.TYPE flatten_swin: every size from MODEL.SWIN, attention from MODEL.LA; the registered variant
    with this architecture (or flatten_swin_t with these arguments)."""
    spec = common_spec(config, '').read(config, SWIN_SECTION)
    spec.read(config, LA_SECTION, ('FOCUSING_FACTOR', 'KERNEL_SIZE', 'ATTN_TYPE'))
    spec.name = _closest_variant(spec.kwargs)
    return spec.checked(check_swin_layout, 'img_size', 'patch_size', 'depths', 'num_heads', 'window_size',
                        'attn_type')
