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
    """What one ``MODEL.TYPE`` builds: ``timm.create_model(name, **kwargs)``; ``keys`` maps kwarg -> config key;
    ``model_type``: the MODEL.TYPE that selected it (for messages; ``name`` when empty)."""
    name: str
    kwargs: Dict[str, Any] = field(default_factory=dict)
    keys: Dict[str, str] = field(default_factory=dict)
    model_type: str = ''

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
    spec.model_type = model_type
    for kwarg, value in (config.MODEL.get('KWARGS') or {}).items():
        value, key = _plain(value), f'MODEL.KWARGS.{kwarg}'
        if kwarg in spec.kwargs and not _same(spec.kwargs[kwarg], value):   # one setting, one place
            raise ConfigError(f'{key} {value!r} conflicts with {spec.keys[kwarg]} {spec.kwargs[kwarg]!r} (both set '
                              f'the model argument {kwarg}); set it once, in {spec.keys[kwarg]}, and remove {key}')
        spec.set(kwarg, value, key)
    return spec


def _config_error(err: Exception, spec: ModelSpec) -> ConfigError:
    """The model's error with each keyword argument it mentions replaced by its config key (one line)."""
    msg = ' '.join(str(err).split()) if str(err) else type(err).__name__
    label = spec.model_type or spec.name
    if not spec.keys:
        return ConfigError(f'MODEL.TYPE {label}: {msg}')
    names = sorted(spec.keys, key=len, reverse=True)       # one pass: a replaced key is not scanned again
    pattern = re.compile(r'(?<![\w.])(' + '|'.join(re.escape(k) for k in names) + r')(?![\w])')
    msg, hits = pattern.subn(lambda m: spec.keys[m.group(1)], msg)
    return ConfigError(msg if hits else f'MODEL.TYPE {label}: {msg}')


_UNEXPECTED_KWARG = re.compile(r"unexpected keyword argument '(\w+)'")


def _create(spec: ModelSpec, kwargs: Dict[str, Any], stock: bool) -> Tuple[nn.Module, List[str]]:
    """``timm.create_model(spec.name, **kwargs)``; a stock timm model (``stock``) that does not take an
    experiment key of OPTIONAL_TIMM_KWARGS is built without it (never a MODEL.KWARGS entry). Returns the
    model and the kwargs left out; a model ValueError/TypeError becomes a ConfigError naming the key."""
    import timm  # local: importing models must stay cheap for tools that only list types

    kwargs = dict(kwargs)
    optional = {k for k in OPTIONAL_TIMM_KWARGS if not spec.keys.get(k, '').startswith('MODEL.KWARGS.')} \
        if stock else set()
    dropped: List[str] = []
    while True:
        try:
            return timm.create_model(spec.name, **kwargs), dropped
        except ConfigError:
            raise
        except TypeError as err:        # a stock timm model that does not take an optional experiment key
            hit = _UNEXPECTED_KWARG.search(str(err))
            if hit and hit.group(1) in optional and hit.group(1) in kwargs:
                kwargs.pop(hit.group(1))
                optional.discard(hit.group(1))
                dropped.append(hit.group(1))
                continue
            raise _config_error(err, spec) from None
        except ValueError as err:
            raise _config_error(err, spec) from None


def build_model(config: Any, **overrides: Any) -> nn.Module:
    """Build the model named by ``config.MODEL.TYPE`` (randomly initialised; its attention converted when
    MODEL.ATTENTION is set); ``overrides`` win."""
    spec = model_spec(config)
    return _converted(_create(spec, dict(spec.kwargs, **overrides), config.MODEL.TYPE not in _ADAPTERS)[0], config)


# The experiment keys a model may take, by model argument: set away from its default, each must reach the model.
EXPERIMENT_KEYS = {'num_classes': 'MODEL.NUM_CLASSES', 'drop_rate': 'MODEL.DROP_RATE',
                   'drop_path_rate': 'MODEL.DROP_PATH_RATE', 'in_chans': 'MODEL.IN_CHANS'}


def input_channels(config: Any) -> Tuple[int, str]:
    """(channels of the model's input, the config key that sets them): what the data pipeline must give
    (3 for a config whose model part does not resolve: validation reports that)."""
    try:
        spec = model_spec(config)
    except ConfigError:
        return 3, 'MODEL.IN_CHANS'
    return int(spec.kwargs.get('in_chans', 3)), spec.keys.get('in_chans', 'MODEL.IN_CHANS')


def check_experiment_keys(config: Any, spec: ModelSpec, defaults: Any) -> None:
    """ConfigError naming both keys when an experiment key (EXPERIMENT_KEYS) is set away from its default
    but the model argument it would set comes from another key (a family section, MODEL.KWARGS) or from
    nowhere (the MODEL.TYPE does not take it)."""
    label = spec.model_type or spec.name
    for kwarg, key in EXPERIMENT_KEYS.items():
        value = _value_at(config, key)
        if _same(value, _value_at(defaults, key)) or spec.keys.get(kwarg) == key:
            continue
        owner = spec.keys.get(kwarg)
        if owner is None:
            raise ConfigError(f'{key} is set ({value!r}) but MODEL.TYPE {label} does not take {kwarg}; remove it '
                              f'(or choose a MODEL.TYPE that has it)')
        raise ConfigError(f'{key} {value!r} is not what MODEL.TYPE {label} uses: its {kwarg} is {owner} '
                          f'({spec.kwargs[kwarg]!r}); set {owner} instead and remove {key}')


def _trial(spec: ModelSpec, kwargs: Dict[str, Any], stock: bool, img_size: int, forward: bool
           ) -> Tuple[Optional[Exception], List[str]]:
    """Build (and with ``forward`` run one image through, in eval mode) the model: (the error or None, the
    optional kwargs left out)."""
    import torch
    try:
        model, dropped = _create(spec, kwargs, stock)
        if forward:
            model.eval()
            with torch.no_grad():
                model(torch.zeros(1, int(kwargs.get('in_chans', 3)), img_size, img_size))
        return None, dropped
    except Exception as err:            # anything a bad keyword argument makes the model raise
        return err, []


def check_by_building(config: Any, spec: ModelSpec, defaults: Any) -> None:
    """Build the model once at load time where the config alone cannot tell whether it fits: with MODEL.KWARGS
    (built and run on one image, so that a bad value or type fails now, as a ConfigError naming
    ``MODEL.KWARGS.<key>``), and for a stock timm model with MODEL.DROP_RATE / MODEL.DROP_PATH_RATE away
    from their defaults (refused when the model does not take them)."""
    label = spec.model_type or spec.name
    extra = dict(config.MODEL.get('KWARGS') or {})
    stock = config.MODEL.TYPE not in _ADAPTERS
    watched = [k for k in ('drop_rate', 'drop_path_rate')
               if stock and not _same(spec.kwargs[k], _value_at(defaults, EXPERIMENT_KEYS[k]))]
    if not extra and not watched:
        return
    img_size = int(_value_at(config, 'DATA.IMG_SIZE'))
    err, dropped = _trial(spec, spec.kwargs, stock, img_size, forward=bool(extra))
    for k in watched:
        if k in dropped:
            raise ConfigError(f'{EXPERIMENT_KEYS[k]} is set ({spec.kwargs[k]!r}) but MODEL.TYPE {label} takes no '
                              f'{k}; remove it (or set it back to its default '
                              f'{_value_at(defaults, EXPERIMENT_KEYS[k])!r})')
    if err is None:
        return
    culprit = None
    if len(extra) == 1:
        culprit = next(iter(extra))
    else:                                  # which entry: the first that fails on its own
        base = {k: v for k, v in spec.kwargs.items() if not spec.keys[k].startswith('MODEL.KWARGS.')}
        for key in extra:
            if _trial(spec, dict(base, **{key: spec.kwargs[key]}), stock, img_size, True)[0] is not None:
                culprit = key
                break
    msg = ' '.join(str(err).split()) or type(err).__name__
    if culprit is None:
        raise ConfigError(f'MODEL.TYPE {label} with MODEL.KWARGS {dict(extra)} fails: {msg}; fix MODEL.KWARGS')
    value = spec.kwargs[culprit]
    raise ConfigError(f'MODEL.KWARGS.{culprit} {value!r} does not fit MODEL.TYPE {label}: {msg}; fix or remove '
                      f'MODEL.KWARGS.{culprit}')


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


def validate_model_config(config: Any, defaults: Any = None) -> None:
    """Everything the model layer checks before any work, in this order: declared key checks, an unknown
    MODEL.TYPE (with the closest names), keys set for another MODEL.TYPE, the family adapter's own checks,
    MODEL.KWARGS entries that duplicate a key, and (given the ``defaults`` config) experiment keys the model
    does not take and MODEL.KWARGS values the model rejects (:func:`check_by_building`)."""
    check_section_values(config)
    if config.MODEL.get('ATTENTION', '') not in ('', 'focused_linear'):
        raise ConfigError(f"MODEL.ATTENTION must be '' (the model's own) or 'focused_linear', "
                          f"got {config.MODEL.ATTENTION!r}")
    if config.MODEL.TYPE not in _ADAPTERS and config.MODEL.TYPE not in _timm_names():
        raise _unknown_type(config.MODEL.TYPE)
    check_config_keys(config)
    spec = model_spec(config)
    if defaults is not None:
        check_experiment_keys(config, spec, defaults)
        check_by_building(config, spec, defaults)