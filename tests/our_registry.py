"""The timm names this repository registers, read off timm's registry (as timm's own tests select theirs):
every name whose entrypoint lives in the ``models`` package, grouped by family module, and the tiny variant of
each family. Shared by ``tests/test_models_timm.py`` and ``tests/timm_suite/conftest.py``."""
import re
import sys
from typing import Dict, List, Set

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
