"""Runs timm's own model tests on the models that ``import models`` registers.

``test_models.py`` here is timm's ``tests/test_models.py``, byte-identical, from
huggingface/pytorch-image-models commit ``aa4b5850c1543fa488abf260f18390eda46cf85d`` (git blob
``224a96fa2c7c52cfb0ce34e3be8f350c16f3427e``; ``test_vendored_timm_test_file_is_byte_identical`` in
``tests/test_models_timm.py`` pins it). timm's CI selects its models through that file's own
``list_models(...)`` filters (``EXCLUDE_FILTERS``, ``NON_STD_FILTERS``, ``EXCLUDE_JIT_FILTERS``,
``EXCLUDE_FX_FILTERS``, the ``FEAT_INTER_FILTERS`` module opt-in); this conftest keeps every one of those
filters and only narrows what they return to our names:

- while the vendored module is imported (collected), ``timm.list_models`` returns the names the file's
  filters select *and* whose entrypoint lives in this repository's ``models`` package. A ``module=``
  selection (the file's opt-in list of modules whose models implement ``forward_intermediates`` and the
  ``'getter'`` feature wrapper) also includes our family modules, which all implement both.
- tests of the file that are not parametrised by a model name (timm's NaFlex / Gemma4 unit tests) and the
  ones parametrised by timm's own names (``test_model_inference`` on timm's hub test models, the
  ``regnetx_002`` fx-features test) test timm itself: they are deselected.
- the normal run keeps the tiny variant of every family and its ``_softmax`` baseline
  (``tests/our_registry.py``: the names with the smallest size word), except a twin whose softmax blocks
  the hybrid tiny variant already runs (``COVERED_BY_HYBRID``). Every other registered name is marked
  ``timm_full`` and runs only when asked for: ``python -m pytest tests/timm_suite -m timm_full``.
"""
from __future__ import annotations

import os
from typing import Dict, Set, Tuple

import pytest
import timm
import timm.models._registry as timm_registry

from our_registry import module_of, names_by_module, our_names, tiny_names

VENDORED = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'test_models.py')
FULL_MARK = 'timm_full'

OURS_BY_MODULE = names_by_module()
OURS: Set[str] = set(our_names())
OUR_MODULE_NAMES = sorted({m.split('.')[-1] for m in OURS_BY_MODULE})   # timm keys modules by the last part
TINY: Set[str] = tiny_names()
# Tiny softmax twins whose attention the hybrid tiny variant already runs through every test here: the
# 'S' stages of flatten_cswin_t (LLSS) are the twin's softmax LePE stripes and its global last stage, the
# same module and branches; the twin runs with -m timm_full. (The Swin twin stays: its shifted windows and
# mask appear in no FLatten-Swin-T block; the PVT twins stay: FLatten-PVT is LLLL.)
COVERED_BY_HYBRID: Set[str] = {'flatten_cswin_t_softmax'}


# timm picks its plain ViTs for the token-layout ('non-standard') tests by name ('deit*' among
# NON_STD_FILTERS); our plain ViT, FLatten-DeiT, is selected by the same patterns
_NAME_ALIASES = {'deit*': 'flatten_deit*'}


def _aliased(patterns):
    if not patterns:
        return patterns
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    return patterns + [alias for p, alias in _NAME_ALIASES.items() if p in patterns]


def _ours_only(list_models):
    def wrapped(filter='', module='', *args, **kwargs):
        filter = _aliased(filter)
        if 'exclude_filters' in kwargs:
            kwargs['exclude_filters'] = _aliased(kwargs['exclude_filters'])
        if module:
            module = ([module] if isinstance(module, str) else list(module)) + OUR_MODULE_NAMES
        return [n for n in list_models(filter, module, *args, **kwargs) if n.split('.')[0] in OURS]
    return wrapped


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    if str(getattr(collector, 'path', '')) != VENDORED:
        return (yield)
    original = (timm.list_models, timm_registry.list_models)
    timm.list_models = timm_registry.list_models = _ours_only(original[1])
    try:
        return (yield)
    finally:
        timm.list_models, timm_registry.list_models = original


# What does not pass yet, per test: {test name: (family modules, why)}, each an expected failure, strict (a fix
# makes the test fail until its entry is removed here), never a skip. Empty: every test of the file passes for
# every family (TorchScript included since the families script; fx since their fast-path attention modules are
# timm notrace modules and shape checks fx leaves).
NOT_YET: Dict[str, Tuple[Tuple[str, ...], str]] = {}


def _kinds(arch: str) -> set:
    """The NOT_YET keys that name ``arch``: its family module."""
    return {module_of(arch).split('.')[-1]}


@pytest.hookimpl(tryfirst=True)      # before -m applies the marker added here
def pytest_collection_modifyitems(config, items):
    full_requested = FULL_MARK in (config.getoption('markexpr') or '')
    keep, drop = [], []
    for item in items:
        if str(item.path) != VENDORED:
            keep.append(item)
            continue
        params = getattr(item, 'callspec', None)
        name = params.params.get('model_name') if params is not None else None
        if not isinstance(name, str) or name.split('.')[0] not in OURS:
            drop.append(item)                     # a test of timm's own models
            continue
        arch = name.split('.')[0]
        families, why = NOT_YET.get(item.originalname, ((), ''))
        if _kinds(arch) & set(families):
            item.add_marker(pytest.mark.xfail(reason=why, strict=True))
        if arch in TINY and arch not in COVERED_BY_HYBRID:
            keep.append(item)
        else:
            item.add_marker(FULL_MARK)
            (keep if full_requested else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
