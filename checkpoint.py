"""Checkpoints (file I/O only, no model code): atomic save, safe (``weights_only``) load, strict state loading,
auto-resume discovery, pruning. Which weights a run starts from (resume, fine-tuning) is ``resume.py``.

Every failure is a ``CheckpointError`` whose one-line message names the file, the problem and the fix.

Safe loading: ``torch.load(weights_only=True)`` with a scoped allow-list. The only non-tensor classes we
admit are yacs' ``CfgNode`` (official FLatten/Swin checkpoints pickle their config) and
``argparse.Namespace`` (L2ViT/ConvNeXt and Visformer/DeiT checkpoints pickle their ``args``; it is rebuilt
as a plain attribute bag whose values pass the same weights_only checks). ``weights_only`` cannot rebuild a
dict subclass, so the global ``yacs.config.CfgNode`` is mapped to a plain ``OrderedDict`` while
unpickling, and nodes carrying yacs' attributes are turned back into ``CfgNode`` afterwards. Anything
else a file asks for (``os.system``, ``builtins.eval``, custom classes) is refused; there is no unsafe
fallback.
"""
from __future__ import annotations

import glob
import logging
import os
import pickle
import re
import uuid
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from yacs.config import CfgNode

from errors import CheckpointError
from state_dicts import OFFICIAL_CHECKPOINT_GLOBALS, state_dict_mismatch, unwrap_state_dict  # shared with timm's path

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- save
def _nonfinite_model_keys(state: Dict[str, Any]) -> List[str]:
    model = state.get('model') if isinstance(state, dict) else None
    if not isinstance(model, dict):
        return []
    return [k for k, v in model.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:            # some filesystems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


class _RecordingWriter:
    """File wrapper that remembers the OSError of a failed write: torch's zip writer swallows it and
    reports only an internal position mismatch."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Write ``state`` to ``path`` atomically: temp file in the same folder, flush + fsync, rename, fsync
    the folder. A previous ``path`` stays intact on any failure. Refuses non-finite model weights."""
    bad = _nonfinite_model_keys(state)
    if bad:
        raise CheckpointError(f"refusing to write checkpoint {path}: model tensors contain NaN/Inf "
                              f"({', '.join(bad[:3])}{'...' if len(bad) > 3 else ''}); the previous checkpoint "
                              f"is kept; lower the learning rate or enable gradient clipping")
    folder = os.path.dirname(os.path.abspath(path))
    tmp: Optional[str] = None
    writer: Optional[_RecordingWriter] = None
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f'.{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')
        with open(tmp, 'xb') as f:                 # honours the umask, unlike mkstemp's 0600
            writer = _RecordingWriter(f)
            torch.save(state, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(folder)
    except (OSError, RuntimeError) as e:     # torch's zip writer turns a failed write into RuntimeError
        cause = e if isinstance(e, OSError) else (writer.error if writer is not None else None) or e
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause).splitlines()[0]
        raise CheckpointError(f"could not write checkpoint {path}: {reason}; "
                              f"free space or choose a writable --output") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass


# ----------------------------------------------------------------------------- load
def _restore_cfgnodes(obj: Any) -> Any:
    """Turn the OrderedDict stand-ins of pickled CfgNodes (they carry yacs' ``__immutable__`` attribute)
    back into ``CfgNode``; recurse through plain containers."""
    if isinstance(obj, dict):
        items = {k: _restore_cfgnodes(v) for k, v in obj.items()}
        attrs = getattr(obj, '__dict__', {})
        if '__immutable__' in attrs:
            node = CfgNode.__new__(CfgNode)
            dict.update(node, items)
            node.__dict__.update(attrs)
            return node
        obj.update(items)
        return obj
    if isinstance(obj, list):
        return [_restore_cfgnodes(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_restore_cfgnodes(v) for v in obj)
    return obj


def _safe_load(path: str, map_location: Any = 'cpu', mmap: bool = False) -> Any:
    """torch.load(weights_only=True) with the CfgNode stand-in; raises CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path} (check the path given to --resume/--pretrained)")
    try:
        with torch.serialization.safe_globals(OFFICIAL_CHECKPOINT_GLOBALS):
            try:
                obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
            except (RuntimeError, OSError, ValueError):
                if not mmap:
                    raise
                # legacy (non-zip) format or a filesystem without mmap: read it normally before judging
                obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        m = re.search(r'GLOBAL ([\w.]+)', text) or re.search(r'unrecognized function (\S+)', text) \
            or re.search(r'but got (<[^>]*>)', text)
        if m:
            raise CheckpointError(
                f"refusing to load {path}: it needs {m.group(1)} which weights_only loading does not allow "
                f"(only tensors, plain containers, yacs CfgNode and argparse.Namespace are accepted); "
                f"it may be hostile — "
                f"use a checkpoint you trust or re-save its weights as a plain state_dict") from None
        raise CheckpointError(f"could not read checkpoint {path}: {_first_line(text)}; the file is truncated "
                              f"or corrupt — use an earlier checkpoint") from None
    except Exception as e:   # zip reader errors, EOFError, bad magic number...
        raise CheckpointError(f"could not read checkpoint {path}: {type(e).__name__}: {_first_line(str(e))}; "
                              f"the file is truncated or corrupt — use an earlier checkpoint") from None
    return _restore_cfgnodes(obj)


def _first_line(text: str) -> str:
    """The informative sentence of a torch/pickle error (torch wraps it in boilerplate)."""
    m = re.search(r'WeightsUnpickler error:\s*(.+)', text)
    if m:
        return m.group(1).strip()[:200]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), 'unknown error')
    return line.split('. ')[0][:200]


def load_checkpoint(path: str, map_location: Any = 'cpu') -> Dict[str, Any]:
    """Safely load a checkpoint dict (tensors on ``map_location``). Never falls back to unsafe loading."""
    obj = _safe_load(path, map_location)
    if not isinstance(obj, dict):
        raise CheckpointError(f"could not use checkpoint {path}: it holds a {type(obj).__name__}, not a dict; "
                              f"save a dict such as {{'model': state_dict}}")
    return obj


# ----------------------------------------------------------------------------- model state
def extract_model_state(ckpt: Dict[str, Any], prefer_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The model state_dict inside ``ckpt`` (the model library's ``unwrap_state_dict``: any official
    wrapping, 'module.' prefixes stripped); CheckpointError when the file holds no weights at all."""
    sd = unwrap_state_dict(ckpt, prefer_ema=prefer_ema)
    if not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError(f"checkpoint has no model weights (keys: {', '.join(map(str, list(ckpt)[:8]))}); "
                              f"expected 'model', 'state_dict' or 'model_ema'")
    return sd


def load_model_state(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """Strict load: keys and shapes are compared first; any mismatch raises CheckpointError."""
    mismatch = state_dict_mismatch(model.state_dict(), state_dict)
    if mismatch:
        raise CheckpointError(f"weights in {source} do not fit the model: {mismatch}; does --cfg match the "
                              f"checkpoint's model (MODEL.TYPE, sizes, ATTN_TYPE, NUM_CLASSES, IMG_SIZE)?")
    model.load_state_dict(state_dict, strict=True)


# ----------------------------------------------------------------------------- resume
def _progress(ckpt: Dict[str, Any]) -> Optional[Tuple[int, int]]:
    """(epoch, step) recorded by the engine, or None when the file is not a resumable checkpoint."""
    if not isinstance(ckpt, dict) or 'model' not in ckpt or 'epoch' not in ckpt:
        return None
    try:
        return int(ckpt['epoch']), int(ckpt.get('step') or 0)
    except (TypeError, ValueError):
        return None


def _set_aside(path: str, reason: str) -> None:
    target = path + '.corrupt'
    n = 1
    while os.path.exists(target):
        target, n = f'{path}.corrupt{n}', n + 1
    try:
        os.replace(path, target)
        logger.warning('checkpoint %s cannot be loaded (%s); kept aside as %s', path, reason, target)
    except OSError as e:
        logger.warning('checkpoint %s cannot be loaded (%s) and could not be renamed: %s', path, reason, e)


_TMP_NAME = re.compile(r'^\..+\.pth\.(\d+)\.[0-9a-f]{8}\.tmp$')


def _remove_stale_temp_files(output_dir: str) -> None:
    """Delete temp files of saves that never finished (their writer process is gone, e.g. kill -9)."""
    for name in os.listdir(output_dir):
        m = _TMP_NAME.match(name)
        if not m:
            continue
        pid = int(m.group(1))
        try:
            if pid != os.getpid():
                os.kill(pid, 0)
                continue                       # its writer is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue                           # alive, owned by someone else
        try:
            os.remove(os.path.join(output_dir, name))
            logger.info('removed %s, left by an interrupted checkpoint save', name)
        except OSError:
            pass


def find_resume_checkpoint(output_dir: str) -> Optional[str]:
    """Newest loadable resumable checkpoint in ``output_dir`` by recorded (epoch, step), ties by mtime.
    Unloadable *.pth files are logged and renamed aside to '<name>.corrupt'; None if nothing usable.
    Temp files of interrupted saves are removed."""
    if not output_dir or not os.path.isdir(output_dir):
        return None
    _remove_stale_temp_files(output_dir)
    found: List[Tuple[Tuple[int, int], float, str]] = []
    for path in glob.glob(os.path.join(output_dir, '*.pth')):
        try:
            ckpt = _safe_load(path, 'cpu', mmap=True)      # metadata only: tensors stay on disk
            mtime = os.path.getmtime(path)
        except (CheckpointError, FileNotFoundError) as e:
            if os.path.isfile(path):       # else a live run pruned it since the listing (--eval beside it)
                _set_aside(path, str(e))
            continue
        progress = _progress(ckpt)
        del ckpt
        if progress is None:
            logger.info('ignoring %s for auto-resume: it records no epoch', path)
            continue
        found.append((progress, mtime, path))
    if not found:
        return None
    found.sort()
    logger.info('auto-resume candidate %s (epoch %d, step %d)', found[-1][2], *found[-1][0])
    return found[-1][2]


def _epoch_of(path: str) -> int:
    m = re.search(r'ckpt_epoch_(\d+)\.pth$', path)
    return int(m.group(1)) if m else -1


def prune_checkpoints(output_dir: str, keep: int) -> None:
    """Delete all but the newest ``keep`` ckpt_epoch_*.pth files (by epoch number); keep <= 0 keeps all."""
    if keep <= 0:
        return
    paths = sorted(glob.glob(os.path.join(output_dir, 'ckpt_epoch_*.pth')), key=_epoch_of)
    for path in paths[:-keep]:
        try:
            os.remove(path)
            logger.info('pruned old checkpoint %s', path)
        except OSError as e:
            logger.warning('could not prune %s: %s', path, e)


__all__ = ['save_checkpoint', 'load_checkpoint', 'extract_model_state', 'load_model_state', 'find_resume_checkpoint',
           'prune_checkpoints']
