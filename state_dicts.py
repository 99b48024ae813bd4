"""State-dict helpers shared by the model library (timm's pretrained loading through each family's
``checkpoint_filter_fn``) and the checkpoint I/O of the experiment layer: the official wrappings of a model
state dict, the classes official checkpoints pickle beside their tensors, and the one strict key/shape
comparison both loading paths report mismatches with. Imports only torch."""
from __future__ import annotations

import argparse
import collections
from typing import Any, Mapping, Optional

import torch

# The classes that official checkpoints pickle beside their tensors: the Swin-codebase trainers store the yacs
# config (read back as a plain OrderedDict, so yacs runs nothing), the DeiT/ConvNeXt trainers an
# argparse.Namespace. weights_only loading allows these and nothing else.
OFFICIAL_CHECKPOINT_GLOBALS = [(collections.OrderedDict, 'yacs.config.CfgNode'), argparse.Namespace]


EMA_ENTRIES = ('model_ema', 'state_dict_ema')


def state_dict_entry(checkpoint: dict, prefer_ema: bool = False) -> Optional[str]:
    """The key of ``checkpoint`` whose value is the model state dict in the official wrappings ('model',
    'state_dict', or with ``prefer_ema`` first the EMA entries 'model_ema' / 'state_dict_ema'); None when
    ``checkpoint`` is a bare state dict."""
    order = EMA_ENTRIES + ('model', 'state_dict') if prefer_ema else ('model', 'state_dict') + EMA_ENTRIES
    return next((k for k in order if isinstance(checkpoint.get(k), dict)), None)


def unwrap_state_dict(checkpoint: dict, prefer_ema: bool = False) -> dict:
    """The model state dict inside a checkpoint in any official wrapping ({'model': sd}, {'state_dict': sd},
    {'model_ema' / 'state_dict_ema': sd} or a bare sd), with leading ``module.`` prefixes stripped."""
    entry = state_dict_entry(checkpoint, prefer_ema)
    sd = checkpoint[entry] if entry is not None else checkpoint
    out = {}
    for k, v in sd.items():
        while k.startswith('module.'):
            k = k[len('module.'):]
        out[k] = v
    return out


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, Any]) -> str:
    """How ``given`` fails a strict load into a model whose state dict is ``expected``, on one line
    (``'2 missing: a, b; 1 shape mismatches: c (3,) vs model (4,)'``, at most 3 names per kind); '' when the
    keys and shapes match exactly."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f'{k} {tuple(given[k].shape)} vs model {tuple(v.shape)}' for k, v in expected.items()
              if k in given and torch.is_tensor(given[k]) and tuple(given[k].shape) != tuple(v.shape)]
    parts = []
    for name, items in (('missing', missing), ('unexpected', unexpected), ('shape mismatches', shapes)):
        if items:
            more = f' (+{len(items) - 3} more)' if len(items) > 3 else ''
            parts.append(f"{len(items)} {name}: {', '.join(items[:3])}{more}")
    return '; '.join(parts)
