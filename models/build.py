"""The one adapter between the experiment config and the model library.

A ``MODEL.TYPE`` is either a type a family declares here (the official names, e.g. ``flatten_swin``,
``L2ViT_Tiny``, ``dat``) or any name in timm's registry (``resnet18``, ``convnext_atto``,
``swin_tiny_patch4_window7_224``, our own ``flatten_swin_t``, ...). Either way the model is
``timm.create_model(name, **kwargs)``:

* a family declares, next to its models and once per key, the config section it reads
  (:class:`ConfigSection` of :class:`ConfigKey`: key, default, the model argument it sets, its check) and
  registers an adapter ``fn(config) -> ModelSpec`` for its official type names with
  :func:`register_config_adapter`; config.py builds its defaults from the declared sections and knows no
  family;
* any other registered timm name gets the experiment keys every timm model takes (``MODEL.NUM_CLASSES``,
  ``MODEL.DROP_RATE``, ``MODEL.DROP_PATH_RATE``, ``MODEL.IN_CHANS``, and ``DATA.IMG_SIZE`` where the model
  takes ``img_size``), and for every type ``MODEL.KWARGS`` (a mapping) is passed through as keyword arguments.

A model's ``ValueError`` is turned into a one-line :class:`ConfigError` naming the config key its keyword
argument came from (model messages name the keyword, e.g. ``"depths=(2, 2) needs one entry per stage"``).
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch.nn as nn

from errors import ConfigError

_KEEP_NOTHING = object()      # ConfigKey.keep default: every value is passed on


@dataclass(frozen=True)
class ConfigKey:
    """One key ``MODEL.<section>.<name>`` of a family's config section.

    ``default``: its value in the defaults; ``kwarg``: the model argument it sets (None: a key kept only so
    that official YAML files load); ``keep``: a value that means "the variant's own setting" (e.g. ``[]`` or
    0), not passed on; ``convert``: value -> argument; ``check``: value -> the problem (ending in the fix)
    or None, run when the config is loaded, whatever the MODEL.TYPE; ``doc``: a comment for readers."""
    name: str
    default: Any
    kwarg: Optional[str] = None
    keep: Any = _KEEP_NOTHING
    convert: Optional[Callable[[Any], Any]] = None
    check: Optional[Callable[[Any], Optional[str]]] = None
    doc: str = ''


@dataclass(frozen=True)
class ConfigSection:
    """A section ``MODEL.<name>`` of the experiment config, declared by the family that reads it.

    ``open``: its keys are the model's own keyword arguments under their own names (any key is accepted,
    e.g. the official DAT++ YAMLs); ``shared``: read by several families in their own way, so a key set for
    another MODEL.TYPE is not an error; ``resolve(config, defaults)``: an in-place reconciliation run before
    validation (e.g. the official DAT++ keys that duplicate experiment keys), given the config and the defaults."""
    name: str
    keys: Tuple[ConfigKey, ...] = ()
    open: bool = False
    shared: bool = False
    resolve: Optional[Callable[[Any, Any], None]] = None

    def key(self, name: str) -> ConfigKey:
        return next(k for k in self.keys if k.name == name)

    def full(self, name: str) -> str:
        return f'MODEL.{self.name}.{name}'


_SECTIONS: Dict[str, ConfigSection] = {}


def config_section(section: ConfigSection) -> ConfigSection:
    """Declare a config section (once; a family module calls this at import)."""
    if _SECTIONS.get(section.name, section) is not section:
        raise RuntimeError(f'config section MODEL.{section.name} declared twice')
    _SECTIONS[section.name] = section
    return section


def config_sections() -> List[ConfigSection]:
    """Every declared section, in declaration order."""
    return list(_SECTIONS.values())


@dataclass
class ModelSpec:
    """What one ``MODEL.TYPE`` builds: ``timm.create_model(name, **kwargs)``; ``keys`` maps kwarg -> config key."""
    name: str
    kwargs: Dict[str, Any] = field(default_factory=dict)
    keys: Dict[str, str] = field(default_factory=dict)

    def set(self, kwarg: str, value: Any, key: str) -> None:
        self.kwargs[kwarg], self.keys[kwarg] = value, key

    def read(self, config: Any, section: ConfigSection, names: Optional[Iterable[str]] = None) -> 'ModelSpec':
        """Add the arguments of ``section``'s keys (all, or ``names``) that set one and are not at their
        ``keep`` value; returns self."""
        node = config.MODEL[section.name]
        for k in section.keys:
            if k.kwarg is None or (names is not None and k.name not in names):
                continue
            value = node[k.name]
            if k.keep is not _KEEP_NOTHING and _same(value, k.keep):
                continue
            self.set(k.kwarg, k.convert(value) if k.convert else _plain(value), section.full(k.name))
        return self

    def checked(self, check: Callable[..., None], *kwargs: str) -> 'ModelSpec':
        """Run a family's own argument check (the function its model calls) on these arguments now, so that a
        bad value fails when the config is loaded; its ValueError becomes a ConfigError naming the key."""
        try:
            check(*(self.kwargs[k] for k in kwargs))
        except ValueError as err:
            raise _config_error(err, self) from None
        return self


@dataclass(frozen=True)
class _Adapter:
    fn: Callable[[Any], ModelSpec]
    reads: Tuple[Tuple[str, Optional[Tuple[str, ...]]], ...]     # (section, key names or None = all)


_ADAPTERS: Dict[str, _Adapter] = {}
SectionReads = Union[ConfigSection, Tuple[ConfigSection, Sequence[str]]]


def register_config_adapter(*model_types: str, reads: Sequence[SectionReads] = ()
                            ) -> Callable[[Callable[[Any], ModelSpec]], Callable[[Any], ModelSpec]]:
    """Decorator: ``adapter(config) -> ModelSpec`` serves the given ``MODEL.TYPE`` names and reads the
    declared sections (a section, or ``(section, key names)`` for part of a shared one)."""
    declared = tuple((r.name, None) if isinstance(r, ConfigSection) else (r[0].name, tuple(r[1])) for r in reads)

    def wrap(fn: Callable[[Any], ModelSpec]) -> Callable[[Any], ModelSpec]:
        for name in model_types:
            if name in _ADAPTERS:
                raise RuntimeError(f'MODEL.TYPE {name!r} registered twice')
            _ADAPTERS[name] = _Adapter(fn, declared)
        return fn
    return wrap


def common_spec(config: Any, name: str) -> ModelSpec:
    """The keys every family honours: class count, dropout, drop path, input size, gradient checkpointing."""
    spec = ModelSpec(name)
    for kwarg, key in (('num_classes', 'MODEL.NUM_CLASSES'), ('drop_rate', 'MODEL.DROP_RATE'),
                       ('drop_path_rate', 'MODEL.DROP_PATH_RATE'), ('img_size', 'DATA.IMG_SIZE'),
                       ('use_checkpoint', 'TRAIN.USE_CHECKPOINT')):
        spec.set(kwarg, _value_at(config, key), key)
    return spec


def model_types() -> list:
    """Every MODEL.TYPE a family declares (any name in ``timm.list_models()`` is a MODEL.TYPE too)."""
    return sorted(_ADAPTERS)


def _timm_names() -> List[str]:
    import timm
    return timm.list_models()


def _unknown_type(model_type: str) -> ConfigError:
    names = model_types() + _timm_names()
    close = difflib.get_close_matches(model_type, names, n=5, cutoff=0.6) or \
        difflib.get_close_matches(model_type.lower(), [n.lower() for n in names], n=5, cutoff=0.6)
    hint = f"closest registered names: {', '.join(close)}; " if close else ''
    return ConfigError(f"unknown MODEL.TYPE {model_type!r}: {hint}use a type of this codebase "
                       f"({', '.join(model_types())}) or any name in timm.list_models()")


def timm_spec(config: Any) -> ModelSpec:
    """Any registered timm model: the experiment keys every timm model takes; ``img_size`` only where the
    model takes it (see :func:`build_model`)."""
    spec = ModelSpec(config.MODEL.TYPE)
    for kwarg, key in (('num_classes', 'MODEL.NUM_CLASSES'), ('drop_rate', 'MODEL.DROP_RATE'),
                       ('drop_path_rate', 'MODEL.DROP_PATH_RATE'), ('in_chans', 'MODEL.IN_CHANS'),
                       ('img_size', 'DATA.IMG_SIZE')):
        spec.set(kwarg, _value_at(config, key), key)
    return spec


# Experiment keys passed to a stock timm model only if its constructor takes them.
OPTIONAL_TIMM_KWARGS = ('img_size', 'drop_rate', 'drop_path_rate')


def model_spec(config: Any) -> ModelSpec:
    """The (timm name, kwargs, keys) that ``config`` selects, MODEL.KWARGS included; ConfigError for an
    unknown MODEL.TYPE or a value a family's adapter rejects."""
    model_type = config.MODEL.TYPE
    adapter = _ADAPTERS.get(model_type)
    if adapter is None and model_type not in _timm_names():
        raise _unknown_type(model_type)
    spec = adapter.fn(config) if adapter is not None else timm_spec(config)
    for kwarg, value in (config.MODEL.get('KWARGS') or {}).items():
        spec.set(kwarg, _plain(value), f'MODEL.KWARGS.{kwarg}')
    return spec


def _config_error(err: Exception, spec: ModelSpec) -> ConfigError:
    """The model's error with each keyword argument it mentions replaced by its config key (one line)."""
    msg = ' '.join(str(err).split()) if str(err) else type(err).__name__
    if not spec.keys:
        return ConfigError(f'MODEL.TYPE {spec.name}: {msg}')
    names = sorted(spec.keys, key=len, reverse=True)       # one pass: a replaced key is not scanned again
    pattern = re.compile(r'(?<![\w.])(' + '|'.join(re.escape(k) for k in names) + r')(?![\w])')
    msg, hits = pattern.subn(lambda m: spec.keys[m.group(1)], msg)
    return ConfigError(msg if hits else f'MODEL.TYPE {spec.name}: {msg}')


_UNEXPECTED_KWARG = re.compile(r"unexpected keyword argument '(\w+)'")


def build_model(config: Any, **overrides: Any) -> nn.Module:
    """Build the model named by ``config.MODEL.TYPE`` (randomly initialised); ``overrides`` win."""
    import timm  # local: importing models must stay cheap for tools that only list types

    spec = model_spec(config)
    kwargs = dict(spec.kwargs, **overrides)
    optional = set(OPTIONAL_TIMM_KWARGS) if config.MODEL.TYPE not in _ADAPTERS else set()
    while True:
        try:
            return _converted(timm.create_model(spec.name, **kwargs), config)
        except ConfigError:
            raise
        except TypeError as err:        # a stock timm model that does not take an optional experiment key
            hit = _UNEXPECTED_KWARG.search(str(err))
            if hit and hit.group(1) in optional and hit.group(1) in kwargs:
                kwargs.pop(hit.group(1))
                optional.discard(hit.group(1))
                continue
            raise _config_error(err, spec) from None
        except ValueError as err:
            raise _config_error(err, spec) from None


def _converted(model: nn.Module, config: Any) -> nn.Module:
    """MODEL.ATTENTION: the model's attention converted (models/attention_convert.py); ConfigError naming the key."""
    kind = config.MODEL.get('ATTENTION', '')
    if not kind:
        return model
    from .attention_convert import convert_attention
    la = config.MODEL.LA
    try:
        return convert_attention(model, kind, blocks=list(la.BLOCKS), focusing_factor=la.FOCUSING_FACTOR,
                                 kernel_size=la.KERNEL_SIZE, dwc=la.DWC, focused=la.FOCUSED)
    except ValueError as err:
        raise ConfigError(f'MODEL.ATTENTION {kind!r}: {err}') from None


# ----------------------------------------------------------------------------- config keys
def _plain(value: Any) -> Any:
    """yacs values -> plain Python (CfgNode -> dict, lists -> tuples) for model arguments."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def _value_at(config: Any, key: str) -> Any:
    node = config
    for part in key.split('.'):
        node = node[part]
    return node


def check_section_values(config: Any) -> None:
    """Run every declared key's own check (the value's format, whatever the MODEL.TYPE): ConfigError
    naming the key."""
    for section in _SECTIONS.values():
        node = config.MODEL.get(section.name)
        if node is None:
            continue
        for k in section.keys:
            if k.check is not None and k.name in node:
                problem = k.check(node[k.name])
                if problem:
                    raise ConfigError(f'{section.full(k.name)} {problem}')


def resolve_sections(config: Any, defaults: Any) -> None:
    """Every declared section's in-place reconciliation (before validation)."""
    for section in _SECTIONS.values():
        if section.resolve is not None:
            section.resolve(config, defaults)


def _reads(model_type: str) -> Optional[set]:
    adapter = _ADAPTERS.get(model_type)
    keys = set()
    for name, names in (adapter.reads if adapter else ()):
        section = _SECTIONS[name]
        keys |= {section.full(k.name) for k in section.keys if k.kwarg and (names is None or k.name in names)}
    return keys


def check_config_keys(config: Any) -> None:
    """ConfigError naming the key when a key of a family section (MODEL.SWIN.EMBED_DIM, MODEL.PVT.DEPTHS, a
    MODEL.DAT key, ...) is set away from its default but the selected MODEL.TYPE does not read it. Keys that
    set no model argument (kept so official YAMLs load) and shared sections (MODEL.LA) are not checked."""
    used = _reads(config.MODEL.TYPE)
    adapter = _ADAPTERS.get(config.MODEL.TYPE)
    open_used = {name for name, _ in (adapter.reads if adapter else ())}
    for section in _SECTIONS.values():
        node = config.MODEL.get(section.name)
        if section.shared or node is None:
            continue
        if section.open:
            if node and section.name not in open_used:
                raise ConfigError(f'MODEL.{section.name} is set ({", ".join(sorted(node))}) but MODEL.TYPE '
                                  f'{config.MODEL.TYPE!r} does not read it; remove it or set MODEL.TYPE to a type '
                                  f'that reads MODEL.{section.name}')
            continue
        for k in section.keys:
            full = section.full(k.name)
            if k.kwarg and full not in used and not _same(node[k.name], k.default):
                raise ConfigError(f'{full} is set ({node[k.name]!r}) but MODEL.TYPE {config.MODEL.TYPE!r} does not '
                                  f'read it; remove it or set the key of this model type')


def validate_model_config(config: Any) -> None:
    """Everything the model layer checks before any work, in this order: declared key checks, an unknown
    MODEL.TYPE (with the closest names), keys set for another MODEL.TYPE, the family adapter's own checks."""
    check_section_values(config)
    if config.MODEL.get('ATTENTION', '') not in ('', 'focused_linear'):
        raise ConfigError(f"MODEL.ATTENTION must be '' (the model's own) or 'focused_linear', "
                          f"got {config.MODEL.ATTENTION!r}")
    if config.MODEL.TYPE not in _ADAPTERS and config.MODEL.TYPE not in _timm_names():
        raise _unknown_type(config.MODEL.TYPE)
    check_config_keys(config)
    model_spec(config)