"""What every family's ``checkpoint_filter_fn`` does last, after its own renames: fit a checkpoint to a model
built for another input size, and refuse a checkpoint of another model.

* absolute position tables (``pos_embed``, ``pos_embed<i>``, ``absolute_pos_embed``, focused-attention
  ``positional_encoding``) of another size are resampled bicubically to the model's grid (timm's
  ``resample_abs_pos_embed``, without antialiasing: the official fine-tuning scripts' ``F.interpolate``);
* relative position bias tables of another window are resized bicubically (timm's
  ``resize_rel_pos_bias_table_simple``, in float32 at least): flat ``relative_position_bias_table``
  ((2w-1)^2, heads) and map-shaped ``rpe_table`` (heads, 2h-1, 2w-1), DAT++'s deformable tables;
* the buffers a model re-creates from its size (``relative_position_index``, ``attn_mask``) are the model's;
* a checkpoint sharing fewer than half of the model's tensor names is a :class:`errors.CheckpointError`.

Also the one check of a ``pretrained_cfg`` file before timm reads it (a missing or non-checkpoint file is one
line, not an empty ``FileNotFoundError`` or an unpickling ``KeyError``).
"""

import math
import os
import re
import zipfile
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table_simple

from errors import CheckpointError

POSITION_TABLE = re.compile(r'(^|\.)(pos_embed\d*|absolute_pos_embed|positional_encoding)$')
RELATIVE_TABLES = ('relative_position_bias_table', 'rpe_table')
RECREATED_BUFFERS = ('relative_position_index', 'attn_mask')
MIN_SHARED = 0.5        # the fraction of the model's tensor names a checkpoint of it must have

Grid = Tuple[int, int]


def resample_position_map(v: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """A (1, C, h, w) position map resampled bicubically to (1, C, H, W) (as timm resamples position
    embeddings; TorchScript compiles it: Visformer resamples its tables at run time)."""
    tokens = v.flatten(2).transpose(1, 2)                                        # (1, h*w, C)
    out = resample_abs_pos_embed(tokens, [H, W], [v.shape[2], v.shape[3]], num_prefix_tokens=0, antialias=False)
    return out.transpose(1, 2).reshape(1, v.shape[1], H, W)


def resample_position_table(v: torch.Tensor, shape: Sequence[int], grid: Optional[Grid] = None,
                            num_prefix_tokens: int = 0) -> Optional[torch.Tensor]:
    """A checkpoint's absolute position table resampled to the model's ``shape`` (bicubic):

    * (1, C, h, w) map -> (1, C, H, W);
    * (1, P + n, C) tokens, ``num_prefix_tokens`` P (class / register rows, kept as they are) then the grid
      row-major -> (1, P + N, C): the model's grid is ``grid`` (default: square), the checkpoint's is taken
      to have the same aspect, else to be square.

    None when ``v`` cannot be read as such a grid (the caller leaves it to the strict load to name)."""
    shape = tuple(shape)
    if v.dim() != len(shape) or v.shape[0] != 1 or shape[0] != 1:
        return None
    if v.dim() == 4:
        if v.shape[1] != shape[1]:
            return None
        return resample_position_map(v, shape[2], shape[3])
    P = num_prefix_tokens
    if v.dim() != 3 or v.shape[2] != shape[2] or min(v.shape[1], shape[1]) <= P:
        return None
    if grid is None:
        side = math.isqrt(shape[1] - P)
        grid = (side, side)
    if grid[0] * grid[1] != shape[1] - P:
        return None
    n = v.shape[1] - P
    scale = math.sqrt(n / (grid[0] * grid[1]))
    old = (round(grid[0] * scale), round(grid[1] * scale))
    if old[0] * old[1] != n:                    # not of the model's aspect: a square grid (timm's default)
        old = (math.isqrt(n),) * 2
        if old[0] * old[1] != n:
            return None
    return resample_abs_pos_embed(v, list(grid), list(old), num_prefix_tokens=P, antialias=False)


def _resize_rel_table(v: torch.Tensor, shape: Sequence[int]) -> Optional[torch.Tensor]:
    """A relative position bias table resized to the model's ``shape``: flat ((2w-1)^2, heads) ->
    ((2w'-1)^2, heads), or map-shaped (heads, 2h-1, 2w-1) -> (heads, 2h'-1, 2w'-1); None if ``v`` is
    neither (the strict load then names it)."""
    shape = tuple(shape)
    if v.dim() != len(shape) or v.dim() not in (2, 3):
        return None
    if v.dim() == 2:
        side = math.isqrt(shape[0])
        if (v.shape[1] != shape[1] or side * side != shape[0] or side % 2 == 0
                or math.isqrt(v.shape[0]) ** 2 != v.shape[0]):
            return None
        window = ((side + 1) // 2,) * 2
    else:
        if v.shape[0] != shape[0] or shape[1] % 2 == 0 or shape[2] % 2 == 0:
            return None
        window = ((shape[1] + 1) // 2, (shape[2] + 1) // 2)
    work = v.to(torch.promote_types(v.dtype, torch.float32))       # bicubic in float32 at least
    return resize_rel_pos_bias_table_simple(work, window, shape).to(v.dtype)


def check_shared_keys(state_dict: Dict[str, Any], model: nn.Module, what: str = 'the checkpoint') -> None:
    """CheckpointError (one line) when ``state_dict`` holds fewer than half of the tensor names of ``model``
    (buffers it re-creates not counted): a checkpoint of another model, which a non-strict load (timm's,
    with another class count) would otherwise take as 'nothing loaded'."""
    names = [k for k in model.state_dict() if not k.endswith(RECREATED_BUFFERS)]
    shared = sum(k in state_dict for k in names)
    if names and shared < MIN_SHARED * len(names):
        theirs = [k for k in state_dict if k not in names][:2]
        raise CheckpointError(
            f'{what} does not fit {type(model).__name__}: it has {shared} of the model\'s {len(names)} tensors '
            f'(its keys look like {", ".join(theirs) or "nothing"}; the model\'s like {", ".join(names[:2])}); '
            f'give a checkpoint of this architecture')


def run_checkpoint_filter(filter_fn: Optional[Callable], state_dict: Dict[str, Any], model: nn.Module,
                          source: str) -> Dict[str, Any]:
    """``filter_fn(state_dict, model)`` (a family's ``checkpoint_filter_fn`` or timm's; None: unchanged). Any
    exception it raises on a file of another model becomes one CheckpointError line naming ``source`` (the
    file), the model and the filter's own reason."""
    if filter_fn is None:
        return state_dict
    try:
        return filter_fn(state_dict, model)
    except Exception as e:          # the family's "not for this model", or whatever a timm filter raises
        arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
        reason = ' '.join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"weights {source} do not fit the model {arch} ({type(e).__name__} in its checkpoint "
                              f"filter: {reason}); give a checkpoint of {arch}, or the config of the file's "
                              f"model") from None


def fit_state_dict(state_dict: Dict[str, Any], model: nn.Module,
                   grid_of: Optional[Callable[[str], Optional[Grid]]] = None) -> Dict[str, Any]:
    """``state_dict`` (already in the model's names) fitted to ``model`` as the module docstring says;
    ``grid_of(key)`` names the (H, W) token grid of a non-square (1, N, C) position table. Other tensors
    pass unchanged: a real mismatch stays visible to the strict load."""
    check_shared_keys(state_dict, model)
    target = model.state_dict()
    out: Dict[str, Any] = {}
    for k, v in state_dict.items():
        if k.endswith(RECREATED_BUFFERS):
            continue
        want = target.get(k)
        if want is not None and isinstance(v, torch.Tensor) and v.shape != want.shape:
            fitted = None
            if POSITION_TABLE.search(k):
                fitted = resample_position_table(v, want.shape, grid_of(k) if grid_of is not None else None)
            elif k.endswith(RELATIVE_TABLES):
                fitted = _resize_rel_table(v, want.shape)
            v = v if fitted is None else fitted
        out[k] = v
    for k, v in target.items():
        if k.endswith(RECREATED_BUFFERS):
            out[k] = v
    return out


def _looks_like_checkpoint(path: str) -> bool:
    """A file torch.load or safetensors can read: a zip (torch.save), a pickle (legacy torch.save), or a
    ``.safetensors`` file (timm chooses its reader by that extension)."""
    if path.endswith('.safetensors'):
        return True
    if zipfile.is_zipfile(path):
        return True
    with open(path, 'rb') as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5       # pickle PROTO opcode


def check_pretrained_file(name: str, pretrained_cfg: Any = None, pretrained_cfg_overlay: Any = None) -> None:
    """Before timm reads weights from a file (``pretrained_cfg_overlay=dict(file=PATH)``): a missing path
    or a file that is no checkpoint is a CheckpointError naming the path."""
    from timm.models._builder import _resolve_pretrained_source, resolve_pretrained_cfg
    cfg = resolve_pretrained_cfg(name, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay)
    load_from, path = _resolve_pretrained_source(cfg.to_dict() if cfg is not None else {})
    if load_from != 'file':
        return
    if not os.path.isfile(path):
        raise CheckpointError(f"pretrained file {path!r} for {name} does not exist; give the path of a downloaded "
                              f"checkpoint: pretrained_cfg_overlay=dict(file=PATH)")
    if not _looks_like_checkpoint(path):
        raise CheckpointError(f"pretrained file {path!r} for {name} is not a PyTorch checkpoint (no torch.save zip "
                              f"or pickle, no .safetensors); give the downloaded .pth/.pt/.safetensors file")
