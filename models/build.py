"""The one adapter between the experiment config and the model library.

A family file registers, for each ``MODEL.TYPE`` it serves, a function ``adapter(config) -> ModelSpec``:
the timm-registered model name, its keyword arguments, and which config key each keyword came from.
:func:`build_model` turns the spec into a model with ``timm.create_model`` and turns a model's
``ValueError`` into a one-line :class:`ConfigError` naming the config key (model messages name the keyword
argument, e.g. ``"depths=(2, 2) needs one entry per stage ..."``; the adapter maps it back to the key).

Families that have not moved to the library design yet register ``fn(config) -> nn.Module`` with the
legacy :func:`register_model`; both kinds are looked up by ``MODEL.TYPE``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict

import torch.nn as nn

from errors import ConfigError


@dataclass
class ModelSpec:
    """What one ``MODEL.TYPE`` builds: ``timm.create_model(name, **kwargs)``; ``keys`` maps kwarg -> config key."""
    name: str
    kwargs: Dict[str, Any] = field(default_factory=dict)
    keys: Dict[str, str] = field(default_factory=dict)


Adapter = Callable[[Any], ModelSpec]
_ADAPTERS: Dict[str, Adapter] = {}
_LEGACY: Dict[str, Callable[[Any], nn.Module]] = {}


def register_config_adapter(*model_types: str) -> Callable[[Adapter], Adapter]:
    """Decorator: ``adapter(config) -> ModelSpec`` serves the given ``MODEL.TYPE`` names."""
    def wrap(fn: Adapter) -> Adapter:
        for name in model_types:
            if name in _ADAPTERS or name in _LEGACY:
                raise RuntimeError(f'MODEL.TYPE {name!r} registered twice')
            _ADAPTERS[name] = fn
        return fn
    return wrap


def register_model(*names: str):
    """Legacy decorator: ``fn(config) -> nn.Module`` under one or more MODEL.TYPE names."""
    def wrap(fn):
        for name in names:
            if name in _ADAPTERS or name in _LEGACY:
                raise RuntimeError(f'MODEL.TYPE {name!r} registered twice')
            _LEGACY[name] = fn
        return fn
    return wrap


def common_spec(config, name: str) -> ModelSpec:
    """The keys every family honours: class count, dropout, drop path, input size."""
    return ModelSpec(name, dict(num_classes=config.MODEL.NUM_CLASSES, drop_rate=config.MODEL.DROP_RATE,
                                drop_path_rate=config.MODEL.DROP_PATH_RATE, img_size=config.DATA.IMG_SIZE),
                     dict(num_classes='MODEL.NUM_CLASSES', drop_rate='MODEL.DROP_RATE',
                          drop_path_rate='MODEL.DROP_PATH_RATE', img_size='DATA.IMG_SIZE'))


def model_types() -> list:
    """Every valid MODEL.TYPE."""
    return sorted(set(_ADAPTERS) | set(_LEGACY))


def model_spec(config) -> ModelSpec:
    """The (timm name, kwargs, keys) that ``config`` selects; ConfigError for an unknown MODEL.TYPE."""
    model_type = config.MODEL.TYPE
    if model_type not in _ADAPTERS:
        raise ConfigError(f"unknown MODEL.TYPE {model_type!r}; valid types: {', '.join(model_types())}")
    return _ADAPTERS[model_type](config)


def _config_error(err: ValueError, spec: ModelSpec) -> ConfigError:
    """The model's ValueError with each keyword argument it mentions replaced by its config key (one line)."""
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    hit = False
    for kwarg, key in sorted(spec.keys.items(), key=lambda kv: -len(kv[0])):
        msg, n = re.subn(rf'\b{re.escape(kwarg)}\b', key, msg)
        hit = hit or n > 0
    return ConfigError(msg if hit else f'MODEL.TYPE {spec.name}: {msg}')


def build_model(config, **overrides: Any) -> nn.Module:
    """Build the backbone named by ``config.MODEL.TYPE`` (randomly initialised); ``overrides`` win."""
    import timm  # local: importing models must stay cheap for tools that only list types

    if config.MODEL.TYPE in _LEGACY:
        return _LEGACY[config.MODEL.TYPE](config)
    spec = model_spec(config)
    try:
        return timm.create_model(spec.name, **dict(spec.kwargs, **overrides))
    except ConfigError:
        raise
    except ValueError as err:
        raise _config_error(err, spec) from None
