"""torch.hub entry points: every model this repository registers in timm.

    model = torch.hub.load('/path/to/this/repo', 'flatten_swin_t', source='local', num_classes=10)

Keyword arguments go to ``timm.create_model`` (``pretrained=True`` needs
``pretrained_cfg_overlay=dict(file=PATH)``: nothing is downloaded).
"""
from __future__ import annotations

from functools import partial as _partial

dependencies = ['torch', 'timm', 'einops']

import timm as _timm  # noqa: E402

import models as _models  # noqa: E402,F401  (registers the families in timm)


def _create(_name: str, **kwargs):
    return _timm.create_model(_name, **kwargs)


def _entries():
    """(name, the file of its family) of every model this repository registers."""
    for name in _timm.list_models():
        module = _timm.models.model_entrypoint(name).__module__
        if module.startswith('models.'):
            yield name, module.replace('.', '/') + '.py'


for _name, _file in _entries():
    _fn = _partial(_create, _name)
    _fn.__doc__ = f"timm.create_model('{_name}', **kwargs) (see {_file})"
    globals()[_name] = _fn
