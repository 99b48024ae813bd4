"""The one adapter between the experiment config and the model library.

A family file registers, for each ``MODEL.TYPE`` it serves, a function ``adapter(config) -> ModelSpec``:
the timm-registered model name, its keyword arguments, and which config key each keyword came from.
:func:`build_model` turns the spec into a model with ``timm.create_model`` and turns a model's
``ValueError`` into a one-line :class:`ConfigError` naming the config key (model messages name the keyword
argument, e.g. ``"depths=(2, 2) needs one entry per stage ..."``; the adapter maps it back to the key).

Also here, for the experiment layer: :func:`check_config_keys` (a size key set for another MODEL.TYPE is a
ConfigError) and :func:`load_pretrained` (fine-tuning load through the family's ``checkpoint_filter_fn``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
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


def register_config_adapter(*model_types: str) -> Callable[[Adapter], Adapter]:
    """Decorator: ``adapter(config) -> ModelSpec`` serves the given ``MODEL.TYPE`` names."""
    def wrap(fn: Adapter) -> Adapter:
        for name in model_types:
            if name in _ADAPTERS:
                raise RuntimeError(f'MODEL.TYPE {name!r} registered twice')
            _ADAPTERS[name] = fn
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
    return sorted(_ADAPTERS)


def model_spec(config) -> ModelSpec:
    """The (timm name, kwargs, keys) that ``config`` selects; ConfigError for an unknown MODEL.TYPE."""
    model_type = config.MODEL.TYPE
    if model_type not in _ADAPTERS:
        raise ConfigError(f"unknown MODEL.TYPE {model_type!r}; valid types: {', '.join(model_types())}")
    return _ADAPTERS[model_type](config)


def _config_error(err: ValueError, spec: ModelSpec) -> ConfigError:
    """The model's ValueError with each keyword argument it mentions replaced by its config key (one line)."""
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    if not spec.keys:
        return ConfigError(f'MODEL.TYPE {spec.name}: {msg}')
    names = sorted(spec.keys, key=len, reverse=True)       # one pass: a replaced key is not scanned again
    pattern = re.compile(r'(?<![\w.])(' + '|'.join(re.escape(k) for k in names) + r')(?![\w])')
    msg, hits = pattern.subn(lambda m: spec.keys[m.group(1)], msg)
    return ConfigError(msg if hits else f'MODEL.TYPE {spec.name}: {msg}')


def build_model(config, **overrides: Any) -> nn.Module:
    """Build the backbone named by ``config.MODEL.TYPE`` (randomly initialised); ``overrides`` win."""
    import timm  # local: importing models must stay cheap for tools that only list types

    spec = model_spec(config)
    try:
        return timm.create_model(spec.name, **dict(spec.kwargs, **overrides))
    except ConfigError:
        raise
    except ValueError as err:
        raise _config_error(err, spec) from None


# ----------------------------------------------------------------------------- config keys
def _leaves(node: Any, prefix: str) -> Dict[str, Any]:
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


def _value_at(config: Any, key: str) -> Any:
    node = config
    for part in key.split('.'):
        node = node[part]
    return node


# Sections shared by several families, whose keys each family reads in its own way: not checked (the
# official YAMLs and tests set e.g. MODEL.LA.PVT_LA_SR_RATIOS whatever the model).
SHARED_SECTIONS = ('LA',)


def check_config_keys(config, defaults) -> None:
    """ConfigError naming the key when a key under a family section MODEL.<section> that some model type
    reads (e.g. MODEL.SWIN.EMBED_DIM, MODEL.PVT.DEPTHS, MODEL.CSWIN.DEPTHS) is set away from its default in
    ``defaults`` but the selected MODEL.TYPE does not read it. Keys no adapter reads (kept only so that
    official YAMLs and checkpoints load) and the shared MODEL.LA section are not checked; an unknown
    MODEL.TYPE is left to build_model."""
    if config.MODEL.TYPE not in _ADAPTERS:
        return
    used = set(model_spec(config).keys.values())
    readable = set()
    probe = config.clone()
    probe.defrost()
    for adapter, model_type in {a: t for t, a in _ADAPTERS.items()}.items():
        probe.MODEL.TYPE = model_type
        try:
            readable |= set(adapter(probe).keys.values())
        except Exception:          # another family's adapter may not understand this config
            continue
    model_keys = _leaves({k: v for k, v in config.MODEL.items() if isinstance(v, dict) and k not in SHARED_SECTIONS},
                         'MODEL.')
    for key, value in model_keys.items():
        if key in readable and key not in used:
            try:
                default = _value_at(defaults, key)
            except KeyError:
                continue
            if value != default and not (isinstance(value, (list, tuple)) and isinstance(default, (list, tuple))
                                         and list(value) == list(default)):
                raise ConfigError(f'{key} is set ({value!r}) but MODEL.TYPE {config.MODEL.TYPE!r} does not read it; '
                                  f'remove it or set the key of this model type')


# ----------------------------------------------------------------------------- pretrained weights
def load_pretrained(model: nn.Module, checkpoint: Dict[str, Any], index_22k_to_1k: Optional[Sequence[int]] = None,
                    prefer_ema: bool = False) -> List[str]:
    """Fine-tuning load of ``checkpoint`` (any official wrapping) into ``model``, strictly: the model's family
    ``checkpoint_filter_fn`` (defined next to the model class) adapts it (re-creatable buffers, resized
    position tables / encodings); a head of another class count keeps the model's fresh head, or with
    ``index_22k_to_1k`` (1000 indices) a 21841-class head is mapped to 1000 classes. Returns log notes;
    raises ValueError naming the mismatching keys."""
    import sys

    from .layers import unwrap_state_dict

    sd = unwrap_state_dict(checkpoint, prefer_ema=prefer_ema)
    notes = []
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get('model_ema'), dict):
        notes.append(f"took its {'model_ema' if prefer_ema else 'model'} weights (the file has both; "
                     f"{'without' if prefer_ema else 'with'} --ema the other)")
    family = sys.modules.get(type(model).__module__)
    filter_fn = getattr(family, 'checkpoint_filter_fn', None)
    if filter_fn is not None:
        sd = filter_fn(sd, model)
    target = model.state_dict()
    head = getattr(model, 'pretrained_cfg', {}).get('classifier', 'head') or 'head'
    for suffix in ('weight', 'bias'):
        key = f'{head}.{suffix}'
        if key in sd and key in target and sd[key].shape != target[key].shape:
            v = sd[key]
            if index_22k_to_1k is not None and v.shape[0] == 21841 and target[key].shape[0] == 1000:
                idx = torch.as_tensor(list(index_22k_to_1k), dtype=torch.long)
                if idx.numel() != 1000:
                    raise ValueError(f'index_22k_to_1k has {idx.numel()} class indices; 1000 are needed')
                sd[key] = v[idx]
                notes.append(f'{key}: 21841 -> 1000 classes')
            else:
                sd[key] = target[key]
                notes.append(f'{key}: class count differs, head re-initialised')
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [f'{k} {tuple(sd[k].shape)} vs model {tuple(v.shape)}' for k, v in target.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(items)} {what}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                 for what, items in (('missing', missing), ('unexpected', unexpected), ('shape mismatches', shapes))
                 if items]
        raise ValueError('; '.join(parts))
    model.load_state_dict(sd, strict=True)
    return notes
