"""What ``--cfgs`` names: a YAML config of ours, or ``timm:<name>[,key=value...]``; loading, building (random
weights, seed 0) and the FLOP count of one image."""
from __future__ import annotations

import argparse
import ast
import contextlib
import io
import logging
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from errors import ConfigError

logger = logging.getLogger(__name__)


class TimmSpec:
    """``timm:<name>[,key=value...]`` in --cfgs: a model straight from timm, e.g.
    ``timm:swin_tiny_patch4_window7_224`` or ``timm:pvt_v2_b0,sr_ratios=(1,1,1,1)`` (global softmax keys);
    each value is a Python literal passed to ``timm.create_model``. ``MODEL.NUM_CLASSES`` is the class count
    the keywords set (timm's default, 1000, otherwise)."""

    def __init__(self, spec: str, img_size: Optional[int]) -> None:
        self.spec = spec
        self.name, self.kwargs = parse_timm_spec(spec)
        self.DATA = argparse.Namespace(IMG_SIZE=img_size or 224)
        self.MODEL = argparse.Namespace(NUM_CLASSES=self.kwargs.get('num_classes', 1000))


def parse_timm_spec(spec: str) -> Tuple[str, Dict[str, Any]]:
    """'name,key=literal,...' -> (name, kwargs); commas inside brackets belong to the value."""
    parts, depth, cur = [], 0, ''
    for ch in spec:
        depth += ch in '([{'
        depth -= ch in ')]}'
        if ch == ',' and depth == 0:
            parts.append(cur)
            cur = ''
        else:
            cur += ch
    parts.append(cur)
    kwargs = {}
    for item in parts[1:]:
        key, sep, value = item.partition('=')
        try:
            if not sep:
                raise ValueError
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ConfigError(f"--cfgs timm:{spec}: '{item}' is not key=<python literal>; "
                              "e.g. timm:pvt_v2_b0,sr_ratios=(1,1,1,1)") from None
    return parts[0], kwargs


def load_cfg(path: str, img_size: Optional[int] = None, opts: Sequence[str] = ()):
    """The config of one --cfgs entry (a yacs node, or a :class:`TimmSpec`), at ``img_size`` when given."""
    if path.startswith('timm:'):
        return TimmSpec(path[len('timm:'):], img_size)
    from config import load_config
    extra = list(opts) + (['DATA.IMG_SIZE', str(img_size)] if img_size else [])
    try:
        return load_config(path, opts=extra)
    except ConfigError as e:                     # a missing file or a wrong key, named with the argument
        raise ConfigError(f'--cfgs {path}: {e}') from None


def _create_timm(spec: TimmSpec) -> nn.Module:
    """``timm.create_model`` with the spec's keywords (and its image size where the model takes one); any
    error of the keywords (unknown, wrong type, invalid value) is one line naming the --cfgs entry."""
    import timm
    if not timm.is_model(spec.name):
        raise ConfigError(f'--cfgs timm:{spec.name}: timm has no such model (see timm.list_models())')
    try:
        try:
            return timm.create_model(spec.name, img_size=spec.DATA.IMG_SIZE, **spec.kwargs)
        except TypeError as e:                   # models without an img_size argument (CNNs)
            if 'img_size' not in str(e):
                raise
            return timm.create_model(spec.name, **spec.kwargs)
    except Exception as e:  # noqa: BLE001  (whatever the model's constructor raises on the user's keywords)
        raise ConfigError(f'--cfgs timm:{spec.spec}: timm.create_model refused the keywords '
                          f'({type(e).__name__}: {" ".join(str(e).split())}); see the model\'s signature') from None


def check_timm(spec: TimmSpec) -> None:
    """Build the spec's model on the meta device (no memory, no weights): a bad name or keyword fails here."""
    with torch.device('meta'):
        _create_timm(spec)


def build(config) -> nn.Module:
    """The model of one config, random weights from seed 0."""
    torch.manual_seed(0)
    if isinstance(config, TimmSpec):
        return _create_timm(config)
    from models import build_model
    return build_model(config)


def num_classes(model: nn.Module, config) -> int:
    """The model's class count (the targets of a training step), else the config's."""
    return int(getattr(model, 'num_classes', config.MODEL.NUM_CLASSES))


def count_flops(model: nn.Module, img_size: int) -> Optional[float]:
    """The fvcore multiply-adds of one image (``report.count_flops``, the project's one counter), or None
    without fvcore or when tracing fails."""
    try:
        import fvcore  # noqa: F401
    except ImportError:
        return None
    from report import count_flops as fvcore_flops
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return float(fvcore_flops(model, img_size))
    except Exception as err:  # noqa: BLE001  (tracing can fail on exotic ops: report n/a, keep timing)
        logger.warning('fvcore could not count FLOPs (%s: %s); reporting n/a', type(err).__name__, err)
        return None
