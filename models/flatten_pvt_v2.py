"""FLatten-PVTv2: PVTv2 with focused linear ('L') or softmax ('S') stages.

Registered timm models: ``flatten_pvt_v2_b0`` ... ``flatten_pvt_v2_b5``, ``flatten_pvt_v2_b2_li`` and the
PVTv2 softmax baselines ``flatten_pvt_v2_b0_softmax`` ... ``flatten_pvt_v2_b4_softmax`` (timm's own
``pvt_v2_b*`` names are left alone). The experiment config reaches them through the adapter for
MODEL.TYPE ``flatten_pvt_v2_b{0..5}`` / ``flatten_pvt_v2_b2_li``.

Differences from PVT-v1 (the attention modules and block are shared with :mod:`models.flatten_pvt`):
  * overlapping patch embeddings (7x7 stride 4, then 3x3 stride 2; padding k // 2) and no position
    embeddings;
  * a 3x3 depth-wise conv inside the MLP (``mlp.dwconv.dwconv``) between fc1 and GELU;
  * a LayerNorm ``norm{i}`` closing every stage; the head reads the token mean of the normed stage 4;
  * ``linear=True`` (PVTv2-li, our ``flatten_pvt_v2_b2_li``): keys/values from a 7x7 adaptive average
    pool + 1x1 conv + LayerNorm + GELU, a ReLU after fc1. The official FLatten code has the flag but
    registers no model with it; ours sizes ``positional_encoding`` for the 49 pooled tokens, which is what
    the official code allocates whenever it runs (sr ratios '8421' at 224).

State-dict layout matches the official ``flatten_pvt_v2_b{0..5}`` (``patch_embed{i}``, ``block{i}``, ``norm{i}``
of ``stages[i-1]``, as in :mod:`models.flatten_pvt`). Unlike the official builders, ours
honour ``num_classes`` and ``img_size``. Seeded initial weights equal the official ones: the official
code re-initialises inside every sub-module's constructor, and those points are replayed here.

Weight decay: ``no_weight_decay()`` is the official rule (names of non-existent pos_embed1-4 and
cls_token: nothing is exempt beyond 1-D parameters and biases); ``extra_no_weight_decay()`` names our
optional extra exclusions (focused-attention scales and positional encodings).
"""

import math
from functools import partial
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import to_2tuple

from .config_adapter import ModelSpec, register_config_adapter
from .focused_attention import LA_SECTION
from .builder import SoftmaxTwin, Variant, build_backbone, official_types, register_family, square_size
from .flatten_pvt import (NUM_STAGES, PVT_LA_KEYS, PVTBlock, PyramidClassifier, PyramidStage, check_pvt_layout,
                          check_stage_lists, checkpoint_filter_fn, init_weights, pvt_cfg, pyramid_section,
                          pyramid_spec, stage_sr_ratios, tokens_to_nchw)
from .layers import check_input_size

Grid = Tuple[int, int]
torch.fx.wrap('check_input_size')       # a torch.fx leaf here too (see check_input_size)


class DWConv(nn.Module):
    """3x3 depth-wise conv on tokens of an (H, W) map: (B, H*W, C) -> same shape."""

    def __init__(self, dim: int, resolution: Grid) -> None:
        super().__init__()
        self.resolution = tuple(resolution)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, hw: Optional[Grid] = None) -> torch.Tensor:
        return self.dwconv(tokens_to_nchw(x, hw if hw is not None else self.resolution)).flatten(2).transpose(1, 2)


class DepthwiseConvMlp(nn.Module):
    """PVTv2 MLP: fc1 -> (ReLU if linear) -> depth-wise conv -> GELU -> dropout -> fc2 -> dropout. Not timm's
    ``MlpWithDepthwiseConv`` (same keys): ours takes the token grid at run time (any input size)."""

    takes_grid = True

    def __init__(self, dim: int, hidden: int, resolution: Grid, drop: float = 0.,
                 linear: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden, resolution)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)
        self.relu = nn.ReLU() if linear else nn.Identity()

    def forward(self, x: torch.Tensor, hw: Optional[Grid] = None) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.relu(self.fc1(x)), hw)))
        return self.drop(self.fc2(x))


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlap (padding k // 2) + LayerNorm: (B, C_in, H, W) -> (B, H/s * W/s, C)."""

    def __init__(self, img_size: int, patch_size: int, stride: int, in_chans: int, embed_dim: int,
                 dynamic_img_size: bool = False) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.dynamic_img_size = dynamic_img_size
        self.grid = (self.img_size[0] // stride, self.img_size[1] // stride)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)
        self.apply(init_pvt_v2)                  # as the official constructor does (draw order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_grid(x)[0]

    def forward_grid(self, x: torch.Tensor) -> Tuple[torch.Tensor, Grid]:
        if not self.dynamic_img_size:
            x = check_input_size(x, self.img_size)
        x = self.proj(x)
        hw = (x.shape[-2], x.shape[-1])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


def init_pvt_v2(m: nn.Module) -> None:
    """The official PVTv2 init (one function for every module kind, applied depth-first): truncated-normal
    linear weights, unit LayerNorms, conv weights normal with std sqrt(2 / fan_out) (fan_out per group);
    zero biases."""
    init_weights(m)                              # linear and LayerNorm: the shared ViT init
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class FLattenPVTv2(PyramidClassifier):
    """FLatten-PVTv2. forward: (B, 3, H, W) -> (B, num_classes); forward_features -> normed (B, H/32, W/32, C4)."""

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 embed_dims: Sequence[int] = (64, 128, 320, 512), num_heads: Sequence[int] = (1, 2, 5, 8),
                 mlp_ratios: Sequence[float] = (8, 8, 4, 4), depths: Sequence[int] = (3, 4, 6, 3),
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop_rate: float = 0.,
                 attn_drop_rate: float = 0., drop_path_rate: float = 0., attn_type: str = 'LLLL',
                 la_sr_ratios: str = '1111', linear: bool = False, focusing_factor: float = 3,
                 kernel_size: int = 5, use_checkpoint: bool = False, global_pool: str = 'avg',
                 dynamic_img_size: bool = False) -> None:
        super().__init__()
        img_size, la_sr_ratios = square_size(img_size), str(la_sr_ratios)
        check_stage_lists(embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=mlp_ratios, depths=depths)
        check_pvt_layout(img_size, attn_type, la_sr_ratios, linear)
        self.num_classes, self.use_checkpoint, self.global_pool = num_classes, use_checkpoint, global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.dynamic_img_size = dynamic_img_size
        self.resolutions = [(img_size // 2 ** (i + 2),) * 2 for i in range(NUM_STAGES)]
        srs = stage_sr_ratios(attn_type, la_sr_ratios)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        stages = []
        for i in range(NUM_STAGES):
            dim, res = embed_dims[i], self.resolutions[i]
            embed = (OverlapPatchEmbed(img_size, 7, 4, in_chans, dim, dynamic_img_size) if i == 0 else
                     OverlapPatchEmbed(self.resolutions[i - 1][0], 3, 2, embed_dims[i - 1], dim, dynamic_img_size))
            mlp = partial(DepthwiseConvMlp, resolution=res, drop=drop_rate, linear=linear)
            blocks = nn.ModuleList([
                PVTBlock(dim, res, num_heads[i], attn_type[i], srs[i], mlp, mlp_ratios[i], qkv_bias, qk_scale,
                         drop_rate, attn_drop_rate, dpr[sum(depths[:i]) + j], linear, focusing_factor,
                         kernel_size, nested_init=init_pvt_v2)
                for j in range(depths[i])])
            stages.append(PyramidStage(dim, embed, blocks, res, dynamic_img_size, norm=nn.LayerNorm(dim, eps=1e-6)))
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f'stages.{i}')
                             for i in range(NUM_STAGES)]
        self.apply(init_pvt_v2)
        self._official_keys()

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The official rule (names that do not exist in PVTv2: nothing extra is exempt)."""
        return {'pos_embed1', 'pos_embed2', 'pos_embed3', 'pos_embed4', 'cls_token'}


# ----------------------------------------------------------------------------- registry
def _create(name: str, pretrained: bool = False, **kwargs: Any) -> FLattenPVTv2:
    return build_backbone(FLattenPVTv2, name, pretrained, checkpoint_filter_fn, **kwargs)


_WIDE = (64, 128, 320, 512)
# MODEL.TYPE = the registered name; attention 'LLLL' (the class default); b5 and b2_li have no softmax twin
PVT_V2_VARIANTS = register_family(__name__, _create, pvt_cfg, {
    'flatten_pvt_v2_b0': Variant(dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
                                 dict(url='https://cloud.tsinghua.edu.cn/f/5d1f01532b104da28e7b/?dl=1'), 'flatten_pvt_v2_b0'),
    'flatten_pvt_v2_b1': Variant(dict(embed_dims=_WIDE, depths=(2, 2, 2, 2)), official_type='flatten_pvt_v2_b1'),
    'flatten_pvt_v2_b2': Variant(dict(embed_dims=_WIDE, depths=(3, 4, 6, 3)), official_type='flatten_pvt_v2_b2'),
    'flatten_pvt_v2_b2_li': Variant(dict(embed_dims=_WIDE, depths=(3, 4, 6, 3), linear=True),
                                    official_type='flatten_pvt_v2_b2_li', softmax=None),
    'flatten_pvt_v2_b3': Variant(dict(embed_dims=_WIDE, depths=(3, 4, 18, 3)), official_type='flatten_pvt_v2_b3'),
    'flatten_pvt_v2_b4': Variant(dict(embed_dims=_WIDE, depths=(3, 8, 27, 3)), official_type='flatten_pvt_v2_b4'),
    'flatten_pvt_v2_b5': Variant(dict(embed_dims=_WIDE, depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4)),
                                 official_type='flatten_pvt_v2_b5', softmax=None),
}, SoftmaxTwin(dict(attn_type='SSSS'), dict(paper_ids='arXiv:2106.13797', paper_name='PVT v2: Improved Baselines with '
               'Pyramid Vision Transformer', notes=('softmax baseline of FLatten-PVTv2 (PVTv2 layout); no official '
                                                    'weights in the FLatten release',))))


# ----------------------------------------------------------------------------- experiment config
PVT_V2_SECTION = pyramid_section('PVT_V2')


@register_config_adapter(*official_types(PVT_V2_VARIANTS), reads=(PVT_V2_SECTION, (LA_SECTION, PVT_LA_KEYS)))
def pvt_v2_spec(config) -> ModelSpec:
    """MODEL.TYPE flatten_pvt_v2_b{0..5} / flatten_pvt_v2_b2_li."""
    arch = PVT_V2_VARIANTS[official_types(PVT_V2_VARIANTS)[config.MODEL.TYPE]].arch
    return pyramid_spec(config, config.MODEL.TYPE, arch, PVT_V2_SECTION, linear=bool(arch.get('linear', False)))
