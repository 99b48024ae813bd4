"""The timm names this repository registers, read off timm's registry (as timm's own tests select theirs):
every name whose entrypoint lives in the ``models`` package, grouped by family module, the tiny variant of
each family, and the keyword arguments that shrink a variant for a fast CPU test. Every test that loops over
"every family" takes its names from here, so a new family is covered without a line in any test table.

Shrinking: a family module may declare ``TEST_TINY_KWARGS`` (a dict, or a function of the registered name
returning one); else ``SHRINK`` below holds it; a family with neither is built at its own size (as timm's own
tests do): slower, still covered."""
import re
import sys
from typing import Any, Callable, Dict, List, Set, Union

import timm

import models  # noqa: F401  (registers the families)

# the smallest size word of the families' names: flatten_swin_t, flatten_pvt_v2_b0, dat_tiny, L2ViT_Tiny,
# official_visformer_tiny, swin_visformer_tiny_v2 (and the `_softmax` baselines of the FLatten ones)
_TINY_WORD = re.compile(r'(^|_)(t|tiny|b0)(_|$)', re.IGNORECASE)


def names_by_module() -> Dict[str, List[str]]:
    """Entrypoint module (``models.flatten_swin`` ...) -> our registered names, in registration order."""
    registered = set(timm.list_models())
    out: Dict[str, List[str]] = {}
    for name in sorted(registered):
        mod = timm.models.model_entrypoint(name).__module__
        if mod.split('.')[0] == 'models':
            out.setdefault(mod, [])
    for mod, names in out.items():
        names.extend(n for n in sys.modules[mod].__all__
                     if n in registered and timm.models.model_entrypoint(n).__module__ == mod)
    return out


def our_names() -> List[str]:
    return sorted(n for names in names_by_module().values() for n in names)


def tiny_names() -> Set[str]:
    """The tiny variant of every family (the names with the smallest size word); a family module without
    such a name contributes the first name it registers."""
    tiny: Set[str] = set()
    for names in names_by_module().values():
        tiny.update([n for n in names if _TINY_WORD.search(n)] or names[:1])
    return tiny


def module_of(name: str) -> str:
    return timm.models.model_entrypoint(name).__module__


def family_reps() -> List[str]:
    """One name per family (its tiny variant, not the ``_softmax`` baseline of a FLatten family); a family
    module with several architectures (Visformer v1 / v2) gives one per architecture."""
    return sorted(n for n in tiny_names() if not n.endswith('_softmax'))


_REDUCTIONS: Dict[str, List[int]] = {}


def feature_reductions(name: str) -> List[int]:
    """The strides of ``name``'s feature maps (timm's ``feature_info``, read off its tiny model once)."""
    if name not in _REDUCTIONS:
        model = timm.create_model(name, **tiny_kwargs(name))
        _REDUCTIONS[name] = [int(i['reduction']) for i in model.feature_info]
    return _REDUCTIONS[name]


def pyramid_reps() -> List[str]:
    """``family_reps`` whose feature maps form a pyramid (several strides: what dense prediction and the
    hierarchical-backbone checks take); a plain ViT family (one stride) is covered by the generic checks only."""
    return [n for n in family_reps() if len(set(feature_reductions(n))) > 1]


# ----------------------------------------------------------------------------- tiny sizes
_PYRAMID = dict(img_size=64, embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1))


def _swin(name: str) -> Dict[str, Any]:
    return dict(img_size=96 if '_384' in name else 112,      # the 'S' windows 12 / 7 tile the stage maps
                patch_size=2, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))


def _visformer(name: str) -> Dict[str, Any]:
    if name.startswith('official_'):                         # v1: three stages
        return dict(img_size=64, init_channels=8, embed_dim=32, depths=(1, 1, 1), num_heads=2)
    return dict(img_size=64, init_channels=8, embed_dim=32, depths=(1, 1, 3, 2), num_heads=(1, 1, 2, 4),
                window_sizes=(16, 8, 2, 2))


Shrink = Union[Dict[str, Any], Callable[[str], Dict[str, Any]]]
# family module -> the tiny architecture of its variants (widths 8-128, 1-3 blocks a stage, 64-112 px), for
# the families that do not declare TEST_TINY_KWARGS themselves
SHRINK: Dict[str, Shrink] = {
    'models.flatten_swin': _swin,
    'models.flatten_pvt': _PYRAMID,
    'models.flatten_pvt_v2': _PYRAMID,
    'models.flatten_cswin': dict(img_size=96, embed_dim=8, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 4),
                                 la_split=(24, 12, 6, 3)),
    'models.dat': dict(img_size=64, patch_size=4, expansion=2, dim_stem=16, dims=(16, 32, 64, 128),
                       depths=(2, 2, 2, 2), heads=(1, 2, 2, 4), groups=(1, 1, 2, 2),
                       stage_spec=(('N', 'D'), ('L', 'S'), ('N', 'D'), ('D', 'D')), window_sizes=(7, 4, 7, 7),
                       use_pes=(True,) * 4, strides=(8, 4, 2, 1), offset_range_factor=(-1,) * 4,
                       use_dwc_mlps=(True,) * 4, use_lpus=(True,) * 4, use_conv_patches=True,
                       nat_ksizes=(5, 7, 3, 3)),
    'models.l2vit': dict(img_size=64, depths=(1, 1, 1, 1), dims=(16, 32, 32, 64), num_heads=(2, 2, 4, 4)),
    'models.visformer': _visformer,
}


def tiny_kwargs(name: str) -> Dict[str, Any]:
    """Keyword arguments for ``timm.create_model(name, **kwargs)`` that make a tiny CPU model of ``name``'s
    architecture (its family's ``TEST_TINY_KWARGS``, else ``SHRINK``, else {}: its own size)."""
    module = module_of(name)
    shrink = getattr(sys.modules[module], 'TEST_TINY_KWARGS', None) or SHRINK.get(module, {})
    return dict(shrink(name) if callable(shrink) else shrink)


def tiny_input_size(name: str) -> int:
    """The side of the square input the tiny model of ``name`` is built for."""
    return int(tiny_kwargs(name).get('img_size') or timm.models.get_pretrained_cfg(name).input_size[-1])
