"""How the families build and register their timm models: ``build_model_with_cfg`` with the getter feature
wrapper and the official-checkpoint pickle allow-list, the FLatten ``pretrained_cfg``, the input-size rule, the
one variant-table form (:class:`Variant`, :func:`register_family`) with its one softmax-twin rule
(:class:`SoftmaxTwin`), and the official state-dict names of models whose stages live in one ModuleList
(:class:`OfficialPaths`)."""
from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import timm
import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import FeatureGetterNet

from state_dicts import OFFICIAL_CHECKPOINT_GLOBALS, unwrap_state_dict

from .checkpoint_fit import run_checkpoint_filter

_logger = logging.getLogger(__name__)


def square_size(img_size) -> int:
    """``img_size`` given as an int or an (H, W) pair (timm passes ``input_size[-2:]``) -> the int side of a
    square; ValueError for a non-square native size (other inputs run with ``dynamic_img_size=True``)."""
    if isinstance(img_size, (tuple, list)):
        if len(img_size) != 2 or img_size[0] != img_size[1]:
            raise ValueError(f'img_size={tuple(img_size)} must be one square size (e.g. 224); run other input '
                             f'sizes with dynamic_img_size=True')
        img_size = img_size[0]
    return int(img_size)


def flatten_pretrained_cfg(first_conv: str, url: str = '', **kwargs) -> dict:
    """pretrained_cfg of a FLatten variant. No download address: the official ``url`` goes to ``origin_url``
    and a downloaded file is loaded with ``pretrained_cfg_overlay=dict(file=PATH)``."""
    cfg = dict(url='', origin_url=url or 'https://github.com/LeapLabTHU/FLatten-Transformer',
               num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=.9, interpolation='bicubic',
               fixed_input_size=True, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
               first_conv=first_conv, classifier='head', paper_ids='arXiv:2308.00442',
               paper_name='FLatten Transformer: Vision Transformer using Focused Linear Attention',
               notes=('weights: the official release (origin_url); load a downloaded file with '
                      'pretrained_cfg_overlay=dict(file=PATH)',))
    cfg.update(kwargs)
    if cfg['pool_size'] is None:        # every FLatten family downsamples by 32 before its head
        cfg['pool_size'] = tuple(s // 32 for s in cfg['input_size'][-2:])
    return cfg


class FeatureGetter(FeatureGetterNet):
    """timm's getter feature wrapper (``features_only=True``) plus ``set_grad_checkpointing``, passed on to the
    wrapped model (timm's wrapper has none)."""

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` asks this first: the feature wrapper calls the model's ``forward_intermediates``,
        whose keyword options TorchScript cannot compile, so say so (and what works) instead of failing deep
        inside the compiler."""
        name = (getattr(self.model, 'pretrained_cfg', None) or {}).get('architecture') or type(self.model).__name__
        raise RuntimeError(f'torch.jit.script does not compile a features_only {name}; script the full model '
                           f'(torch.jit.script(model) works for every family), or use torch.jit.trace / '
                           f'torch.export on the features_only model')


def _names(items: List[str], limit: int = 8) -> str:
    return ', '.join(items[:limit]) + (f' (+{len(items) - limit} more)' if len(items) > limit else '')


def _reporting_filter(filter_fn: Callable, name: str, features: bool) -> Callable:
    """``filter_fn`` that also logs, on one line, what the loaded weights lose and change on the way into the
    model: tensors the filter drops, the classifier timm then drops (a feature backbone, or another class
    count), tensors resized (position tables / encodings resampled to this model's size) and model tensors the
    file does not provide (left at their initial values; a warning)."""
    def filter_and_report(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
        out = run_checkpoint_filter(filter_fn, state_dict, model,
                                    (getattr(model, 'pretrained_cfg', None) or {}).get('file') or name)
        source = unwrap_state_dict(state_dict)
        kept = {id(v) for v in out.values()}                  # a renamed tensor is the same object
        dropped = [k for k, v in source.items() if k not in out and id(v) not in kept]
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        classifier = cfg.get('classifier')
        head = []
        if classifier and (features or getattr(model, 'num_classes', None) != cfg.get('num_classes')):
            for c in (classifier,) if isinstance(classifier, str) else classifier:
                head += [k for k in (f'{c}.weight', f'{c}.bias') if k in out]
        buffers = {b.data_ptr() for b in model.buffers()}     # re-created from the model, not resized
        resized = [f'{k} {tuple(source[k].shape)}->{tuple(v.shape)}' for k, v in out.items()
                   if torch.is_tensor(v) and torch.is_tensor(source.get(k)) and v.shape != source[k].shape
                   and v.data_ptr() not in buffers]
        absent = [k for k in model.state_dict() if k not in out]
        why = 'feature backbone' if features else 'another class count'
        line = (f"{name}: weights from {cfg.get('file') or 'the pretrained source'}: "
                f"dropped {_names(dropped + [f'{k} ({why})' for k in head]) or 'nothing'}; "
                f"resized {_names(resized) or 'nothing'}")
        if absent:
            _logger.warning('%s; not in the file (left at their initial values): %s', line, _names(absent))
        else:
            _logger.info(line)
        return out
    return filter_and_report


def build_backbone(cls: type, name: str, pretrained: bool, filter_fn: Callable, num_stages: int = 4,
                   **kwargs: Any) -> nn.Module:
    """timm's ``build_model_with_cfg`` with the getter feature wrapper over ``num_stages`` stage maps (with
    ``set_grad_checkpointing``); a ``pretrained_cfg_overlay=dict(file=PATH)`` official file is read with
    weights_only and the allow-list above, and one log line says what was dropped and resized on the way."""
    if pretrained:      # a missing / non-checkpoint file is one line, not timm's bare FileNotFoundError
        from .checkpoint_fit import check_pretrained_file
        check_pretrained_file(name, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    filter_fn = _reporting_filter(filter_fn, name, bool(kwargs.get('features_only')))
    with torch.serialization.safe_globals(OFFICIAL_CHECKPOINT_GLOBALS):
        return build_model_with_cfg(cls, name, pretrained, pretrained_filter_fn=filter_fn,
                                    feature_cfg=dict(feature_cls=FeatureGetter, out_indices=tuple(range(num_stages))),
                                    **kwargs)


# ----------------------------------------------------------------------------- official state-dict names
class OfficialKeys:
    """The official per-stage state-dict names of a model whose stages live in one ``nn.ModuleList``.

    ``pairs``: (our path, official path) per renamed module or parameter, e.g. ('stages.0.blocks', 'block1').
    :meth:`attach` registers state-dict hooks so that ``state_dict()`` gives the official keys and
    ``load_state_dict`` takes them (our own paths load too), at any nesting depth (the hooks get the prefix).
    Hooks rather than a checkpoint filter: every reader of ``state_dict()`` (EMA, resume, timm's loaders,
    strict ``load_state_dict``) sees the official keys with nothing to call first.
    """

    def __init__(self, pairs: Iterable[Tuple[str, str]]) -> None:
        self.pairs = tuple(pairs)

    @staticmethod
    def _rename(key: str, pairs: Iterable[Tuple[str, str]]) -> str:
        for src, dst in pairs:
            if key == src or key.startswith(src + '.'):
                return dst + key[len(src):]
        return key

    def official(self, key: str) -> str:
        """Our parameter / module path -> the official one (unchanged where not renamed)."""
        return self._rename(key, self.pairs)

    def ours(self, key: str) -> str:
        """An official state-dict key / module path -> ours (unchanged where not renamed)."""
        return self._rename(key, ((dst, src) for src, dst in self.pairs))

    def attach(self, model: nn.Module) -> None:
        cls = type(self)            # partials: torch marks its hooks with an attribute (a bound method has none)
        model.register_state_dict_post_hook(partial(cls._save_hook, self))
        model.register_load_state_dict_pre_hook(partial(cls._load_hook, self))
        model.register_load_state_dict_post_hook(partial(cls._report_hook, self))

    @staticmethod
    def _renamed(mapping: Dict[str, Any], prefix: str, rename: Callable[[str], str]) -> List[Tuple[str, str]]:
        return [(k, prefix + rename(k[len(prefix):])) for k in list(mapping) if k.startswith(prefix)
                and prefix + rename(k[len(prefix):]) != k]

    def _save_hook(self, module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: Any) -> None:
        renamed = dict(self._renamed(state_dict, prefix, self.official))
        items = list(state_dict.items())        # renamed in place, order kept
        state_dict.clear()
        state_dict.update((renamed.get(k, k), v) for k, v in items)
        meta: Optional[Dict[str, Any]] = getattr(state_dict, '_metadata', None)
        if meta is not None:
            for k, new in self._renamed(meta, prefix, self.official):
                meta[new] = meta.pop(k)

    def _load_hook(self, module: nn.Module, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        for k, new in self._renamed(state_dict, prefix, self.ours):
            state_dict[new] = state_dict.pop(k)
        meta: Optional[Dict[str, Any]] = getattr(state_dict, '_metadata', None)
        if meta is not None:
            for k, new in self._renamed(meta, prefix, self.ours):
                meta[new] = meta[k]

    def _report_hook(self, module: nn.Module, incompatible: Any) -> None:
        """Missing keys named as the official ones (any prefix)."""
        def official(key: str) -> str:
            starts = [0] + [i + 1 for i, c in enumerate(key) if c == '.']
            for i in starts:
                new = self.official(key[i:])
                if new != key[i:]:
                    return key[:i] + new
            return key
        incompatible.missing_keys[:] = [official(k) for k in incompatible.missing_keys]


class OfficialPaths:
    """Mixin of a model whose stages live in one ModuleList: :meth:`use_official_keys` gives it the official
    state-dict names (:class:`OfficialKeys`), and ``get_submodule`` also resolves official module paths (timm
    finds the pretrained_cfg's ``first_conv``, e.g. ``patch_embed1.proj``, that way)."""

    def use_official_keys(self, pairs: Iterable[Tuple[str, str]]) -> None:
        self.official_keys = OfficialKeys(pairs)     # (no class annotation: TorchScript would try to type it)
        self.official_keys.attach(self)

    def get_submodule(self, target: str) -> nn.Module:
        return super().get_submodule(self.official_keys.ours(target))

    def official_group_matcher(self, matcher: Dict[str, Any]) -> Callable[[str], Tuple[float, ...]]:
        """timm's dict group matcher written over the official names -> the callable form timm also takes,
        over our parameter names (the layer groups stay the official ones)."""
        rules = [(re.compile(regex), ordinal, suffix or ())
                 for ordinal, spec in enumerate(matcher.values()) if spec is not None
                 for regex, suffix in (spec if isinstance(spec, (list, tuple)) else [(spec, None)])]

        def order(name: str) -> Tuple[float, ...]:
            official = self.official_keys.official(name)
            for regex, ordinal, suffix in rules:
                found = regex.match(official)
                if found:
                    return tuple(float(v) for v in (ordinal, *found.groups(), *suffix))
            return (float('inf'),)         # unmatched (head): last, as timm does
        return order


# ----------------------------------------------------------------------------- variant tables
@dataclass(frozen=True)
class Variant:
    """One registered model of a family.

    arch: keyword arguments of the model class (a caller's keywords override them); cfg: keyword arguments
    of the family's pretrained-cfg function (``url``, ``input_size``, ...); official_type: the official
    MODEL.TYPE that builds it (None: no official name); tag: the pretrained tag of its cfg ('' for none);
    doc: one line for the registered function; softmax: this variant's extra keywords for its softmax
    twin on top of the family's :class:`SoftmaxTwin` rule, or None for no twin.
    """
    arch: Dict[str, Any]
    cfg: Dict[str, Any] = field(default_factory=dict)
    official_type: Optional[str] = None
    tag: str = ''
    doc: str = ''
    softmax: Optional[Dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class SoftmaxTwin:
    """The one rule of a family's softmax baselines: ``<name>_softmax`` is ``<name>`` with ``arch`` (plus the
    variant's own ``softmax`` keywords) and the pretrained cfg of ``<name>`` without its weights (no ``url``)
    updated by ``cfg`` (the baseline's paper)."""
    arch: Dict[str, Any]
    cfg: Dict[str, Any]

    def of(self, variant: Variant) -> Variant:
        return Variant(arch={**variant.arch, **self.arch, **(variant.softmax or {})},
                       cfg={**{k: v for k, v in variant.cfg.items() if k != 'url'}, **self.cfg}, tag=variant.tag,
                       doc=f'softmax baseline of {variant.doc or "the variant"}', softmax=None)


SOFTMAX_SUFFIX = '_softmax'


def register_family(module: str, create: Callable[..., nn.Module], pretrained_cfg: Callable[..., Dict[str, Any]],
                    variants: Dict[str, Variant], softmax: Optional[SoftmaxTwin] = None) -> Dict[str, Variant]:
    """Register a family's variants, and their ``<name>_softmax`` twins by the ``softmax`` rule, with timm:
    ``module.default_cfgs`` and one entry function per name, importable as ``module.<name>``, that calls
    ``create(name, pretrained, **dict(variant.arch, **kwargs))``. Returns every variant, twins included."""
    table = dict(variants)
    if softmax is not None:
        table.update({name + SOFTMAX_SUFFIX: softmax.of(v) for name, v in variants.items() if v.softmax is not None})
    mod = sys.modules[module]
    mod.default_cfgs = generate_default_cfgs(
        {f'{name}.{v.tag}' if v.tag else name: pretrained_cfg(**v.cfg) for name, v in table.items()})
    for name, variant in table.items():
        setattr(mod, name, register_model(_entry(module, name, variant, create)))
    return table


def _entry(module: str, name: str, variant: Variant, create: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """The timm entry function of one variant (timm reads its ``__name__`` and ``__module__``)."""
    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create(name, pretrained, **dict(variant.arch, **kwargs))
    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = module
    entry.__doc__ = variant.doc or None
    return entry


def official_types(variants: Dict[str, Variant]) -> Dict[str, str]:
    """Official MODEL.TYPE -> registered name, for the variants that have one."""
    return {v.official_type: name for name, v in variants.items() if v.official_type is not None}


def softmax_twin_name(name: str, attn_type: str) -> str:
    """The registered model a config's attention asks for: ``<name>_softmax`` when every stage is softmax
    ('S') and the variant has a twin, else ``name``."""
    twin = name + SOFTMAX_SUFFIX
    return twin if set(attn_type) == {'S'} and timm.models.is_model(twin) else name
