"""FLatten-DeiT-T (the paper's DeiT row, Fig. 6 table and Tables 3-4): timm's DeiT-T with focused linear
attention in every block (p = 3, DWC kernel 5), built by :func:`models.attention_convert.convert_attention`.
The softmax twin is timm's own ``deit_tiny_patch16_224``.

The official release has no DeiT code; what the paper leaves open is fixed here as the official modules do
it: the class token takes part in the attention (query, key, value) but not in the DWC grid; the positional
encoding added to K covers all 197 tokens of every block; ``scale`` per channel through softplus; the DWC is
shared across heads. Table 4's settings are the keyword arguments ``focused`` and ``dwc``.
"""

import logging
from functools import partial
from typing import Any, Dict, List

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, resample_abs_pos_embed
from timm.layers.trace_utils import _assert
from timm.models import build_model_with_cfg
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn as vit_filter_fn

from state_dicts import unwrap_state_dict

from .checkpoint_fit import check_shared_keys
from .builder import FeatureGetter, Variant, flatten_pretrained_cfg, register_family
from .config_adapter import ModelSpec, register_config_adapter, timm_spec
from .focused_attention import LA_SECTION
from .attention_convert import FocusedLinearViTAttention, convert_attention, fill_converted_state

__all__ = ['FLattenDeiT']      # + the registered names (timm's register_model adds them)

_logger = logging.getLogger(__name__)


class FLattenDeiT(VisionTransformer):
    """timm's VisionTransformer with focused linear attention in ``la_blocks`` (default: every block).

    Args (beyond VisionTransformer's): focusing_factor (p), kernel_size (DWC), dwc / focused (Table 4's
    settings: both False = vanilla linear attention), la_blocks (block indices; None = all).
    """

    output_fmt = 'NLC'      # forward_features: (B, prefix + H*W, C) tokens

    def __init__(self, *args: Any, focusing_factor: float = 3, kernel_size: int = 5, dwc: bool = True,
                 focused: bool = True, la_blocks=None, **kwargs: Any) -> None:
        if kwargs.get('pos_embed', 'learn') != 'learn':
            raise ValueError("pos_embed must be 'learn' (DeiT's learned position embedding)")
        # a wrong input size is reported by _pos_embed, with the fix (timm's patch embed names no fix)
        kwargs.setdefault('embed_layer', partial(PatchEmbed, strict_img_size=False))
        super().__init__(*args, **kwargs)
        convert_attention(self, 'focused_linear', blocks=la_blocks, focusing_factor=focusing_factor,
                          kernel_size=kernel_size, dwc=dwc, focused=focused)
        self.patch_embed._forward_pre_hooks.clear()     # the grid is set below (scriptable), not by a hook

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ViT position embedding (prefix tokens; resampled to the grid of a dynamic-size input), and the
        converted attentions told that grid (TorchScript compiles this: no hook). x (B, H, W, C) with
        ``dynamic_img_size``, else (B, H*W, C) -> (B, P + H*W, C)."""
        prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        if self.dynamic_img_size:
            B, H, W, C = x.shape
            for blk in self.blocks:
                if isinstance(blk.attn, FocusedLinearViTAttention):
                    blk.attn.dynamic_grid = (H, W)
            pos = resample_abs_pos_embed(self.pos_embed, (H, W), self.patch_embed.grid_size, num_prefix_tokens=prefix)
            x = x.reshape(B, H * W, C)
        else:
            _assert(x.shape[1] == self.patch_embed.num_patches, 'the input size is not the img_size this model '
                    'was built for: build it with img_size=<size>, or with dynamic_img_size=True to run any size')
            pos = self.pos_embed
        tokens: List[torch.Tensor] = []
        if self.cls_token is not None:
            tokens.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.reg_token is not None:
            tokens.append(self.reg_token.expand(x.shape[0], -1, -1))
        if self.no_embed_class:
            x = torch.cat(tokens + [x + pos], dim=1)
        else:
            x = torch.cat(tokens + [x], dim=1) + pos
        return self.pos_drop(x)

    @torch.jit.ignore
    def extra_no_weight_decay(self) -> set:
        """OUR optional no-decay exclusions (TRAIN.OPTIMIZER.EXTRA_NO_WEIGHT_DECAY; the official modules' rule
        decays them): the attention's ``scale`` and ``positional_encoding``."""
        return {n for n, _ in self.named_parameters() if n.endswith(('.scale', '.positional_encoding'))}


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm's ViT filter (DeiT / ViT checkpoints, pos_embed resampled), then the focused-linear parameters fitted:
    a softmax DeiT checkpoint leaves them at their initialisation (logged), another size resamples them."""
    state_dict = vit_filter_fn(unwrap_state_dict(state_dict), model)
    check_shared_keys(state_dict, model)         # a checkpoint of another model: one line, not a strict-load dump
    out, added = fill_converted_state(state_dict, model)
    if added:
        _logger.warning('%d focused-linear tensors not in the checkpoint start from their initialisation: %s',
                        len(added), ', '.join(added[:6]) + (' ...' if len(added) > 6 else ''))
    return out


# the tiny architecture the test suite builds this family at (tests/our_registry.py reads it)
TEST_TINY_KWARGS = dict(img_size=64, embed_dim=32, depth=2, num_heads=2)


@register_config_adapter('flatten_deit_t', reads=[(LA_SECTION, ('FOCUSING_FACTOR', 'KERNEL_SIZE'))])
def deit_spec(config) -> ModelSpec:
    """MODEL.TYPE flatten_deit_t: the keys of any timm model plus the focused-linear keys of MODEL.LA (the same
    keys as MODEL.ATTENTION's switch: FOCUSING_FACTOR, KERNEL_SIZE, DWC, FOCUSED, BLOCKS)."""
    spec, la = timm_spec(config), config.MODEL.LA
    for kwarg, key in (('focusing_factor', 'FOCUSING_FACTOR'), ('kernel_size', 'KERNEL_SIZE'), ('dwc', 'DWC'),
                       ('focused', 'FOCUSED'), ('la_blocks', 'BLOCKS')):
        spec.set(kwarg, list(la[key]) if key == 'BLOCKS' else la[key], f'MODEL.LA.{key}')
    return spec


def _create(name: str, pretrained: bool = False, **kwargs: Any) -> FLattenDeiT:
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(FLattenDeiT, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls=FeatureGetter), **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return dict(flatten_pretrained_cfg('patch_embed.proj', notes=(
        'no official weights: FLatten-DeiT-T is not in the official release (paper: 74.1 top-1)',)),
        pool_size=None, **kwargs)


# registered name -> VisionTransformer arguments (DeiT-T); the softmax twin is timm's own deit_tiny_patch16_224
VARIANTS = register_family(__name__, _create, _cfg, {
    'flatten_deit_t': Variant(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
                              doc='FLatten-DeiT-T: DeiT-T, focused linear attention (p = 3, DWC 5) in all 12 blocks.'),
})
