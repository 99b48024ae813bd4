"""MODEL.TYPE -> model. Families register a constructor ``fn(config) -> nn.Module`` with
:func:`register_model`; :func:`build_model` looks it up (a dict, never ``eval`` of strings)."""
from __future__ import annotations

from typing import Callable, Dict

import torch.nn as nn
from yacs.config import CfgNode

from config import ConfigError

ModelFactory = Callable[[CfgNode], nn.Module]
_REGISTRY: Dict[str, ModelFactory] = {}


def register_model(*names: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register ``fn(config)`` under one or more MODEL.TYPE names."""
    def wrap(fn: ModelFactory) -> ModelFactory:
        for name in names:
            if name in _REGISTRY:
                raise RuntimeError(f'MODEL.TYPE {name!r} registered twice')
            _REGISTRY[name] = fn
        return fn
    return wrap


def model_types() -> list:
    """Every valid MODEL.TYPE."""
    return sorted(_REGISTRY)


def build_model(config: CfgNode) -> nn.Module:
    """Build the backbone named by ``config.MODEL.TYPE`` (randomly initialised)."""
    model_type = config.MODEL.TYPE
    if model_type not in _REGISTRY:
        raise ConfigError(f"unknown MODEL.TYPE {model_type!r}; valid types: {', '.join(model_types())}")
    return _REGISTRY[model_type](config)
