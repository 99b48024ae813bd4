"""Which weights a run starts from (the policy over ``checkpoint.py``'s I/O).

* ``resume_source``: the checkpoint a run continues from or evaluates (``--resume``, auto-resume, or none
  when ``--eval``/``--throughput`` name ``--pretrained`` weights);
* ``resume_run`` / ``resume_training``: a :class:`engine.Trainer` restored from it (weights, optimizer,
  schedule, scaler, EMA, progress); ``load_weights``: the weights alone (evaluation, throughput);
* ``load_finetune_weights``: ``--pretrained`` (the family's ``checkpoint_filter_fn``, a new head for
  another class count, 21841 -> 1000 classes, strict otherwise).

What a checkpoint holds is written by ``engine.save`` (the epoch loop's); this module only reads it.

No model code is imported: a model's family module (where ``checkpoint_filter_fn`` lives) is found through
the model's class.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.utils import ModelEmaV3
from yacs.config import CfgNode

import checkpoint as ckpt_io
from engine import Trainer
from errors import CheckpointError
from models.checkpoint_fit import run_checkpoint_filter
from state_dicts import EMA_ENTRIES, state_dict_entry, state_dict_mismatch
from utils import DistInfo

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the source
def _broadcast_path(path: Optional[str]) -> Optional[str]:
    if dist.is_available() and dist.is_initialized():
        box = [path]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return path


def resume_source(config: CfgNode, info: DistInfo) -> Optional[str]:
    """The checkpoint this run continues from (training) or evaluates (--eval / --throughput).

    Training: the newest checkpoint of this run in OUTPUT (TRAIN.AUTO_RESUME) over --resume, so that a
    preempted run continues. --eval / --throughput evaluate the weights the command line names: --resume,
    else none when --pretrained is given (``create_model`` loaded it); auto-resume only when neither is given
    (evaluating a finished run by its --output/--tag)."""
    explicit = config.MODEL.RESUME or None
    if (config.EVAL_MODE or config.THROUGHPUT_MODE) and (explicit or config.MODEL.PRETRAINED):
        return explicit
    if not config.TRAIN.AUTO_RESUME:
        return explicit
    found = ckpt_io.find_resume_checkpoint(config.OUTPUT) if info.is_main else None
    found = _broadcast_path(found)
    if found:
        if explicit and os.path.abspath(explicit) != os.path.abspath(found):
            logger.warning('auto-resume: continuing this run from %s instead of --resume %s', found, explicit)
        logger.info('auto resuming from %s', found)
        return found
    logger.info('no checkpoint found in %s, ignoring auto resume', config.OUTPUT)
    return explicit


# ----------------------------------------------------------------------------- resuming
def load_evaluated(config: CfgNode, info: DistInfo, model: nn.Module, ema: Optional[ModelEmaV3] = None
                   ) -> Tuple[Optional[str], Dict[str, Any]]:
    """--eval / --throughput: :func:`resume_source`, then :func:`load_weights` (``{}`` when there is no
    source). An auto-resume checkpoint that a live run of the same folder pruned between the two (it rotates
    its ckpt_epoch_* files) is looked up again, up to three times."""
    attempts = 3
    while True:
        attempts -= 1
        source = resume_source(config, info)
        if not source:
            return None, {}
        try:
            return source, load_weights(source, model, ema, config.MODEL.USE_EMA_WEIGHTS)
        except CheckpointError:
            if os.path.isfile(source) or source == (config.MODEL.RESUME or None) or not attempts:
                raise
            logger.info('%s was removed by the run writing this folder; looking again', source)


def load_weights(path: str, model: nn.Module, ema: Optional[ModelEmaV3] = None,
                 prefer_ema: bool = False) -> Dict[str, Any]:
    """Load the model (and EMA) weights of checkpoint ``path``; returns the checkpoint dict. Without EMA
    weights in the file the EMA restarts from the loaded model. ``prefer_ema`` (--ema, evaluation only): the
    model gets the file's 'model_ema' weights when it has them."""
    logger.info(f'==============> Resuming from {path}....................')
    ckpt = ckpt_io.load_checkpoint(path)
    if prefer_ema:
        logger.info("%s: evaluating its %s weights (--ema)", path,
                    "'model_ema'" if isinstance(ckpt.get('model_ema'), dict) else "'model' (it has no EMA)")
    ckpt_io.load_model_state(model, ckpt_io.extract_model_state(ckpt, prefer_ema=prefer_ema), path)
    if ema is not None:
        if isinstance(ckpt.get('model_ema'), dict):
            ckpt_io.load_model_state(ema.module, ckpt_io.extract_model_state({'model': ckpt['model_ema']}), path)
        else:
            ema.module.load_state_dict(model.state_dict())
            logger.info('%s holds no EMA weights: EMA restarts from the loaded model', path)
    return ckpt


def resume_training(t: Trainer, path: str) -> None:
    """Weights, optimizer, schedule, scaler, EMA and progress (epoch, step, best accuracies) from ``path``;
    a weights-only file (no optimizer state) starts the schedule from TRAIN.START_EPOCH."""
    ckpt = load_weights(path, t.model_without_ddp, t.ema)
    if not all(k in ckpt for k in ('optimizer', 'lr_scheduler', 'epoch')):
        return
    try:
        t.optimizer.load_state_dict(ckpt['optimizer'])
        t.lr_scheduler.load_state_dict(ckpt['lr_scheduler'])
        if t.scaler.is_enabled() and isinstance(ckpt.get('scaler'), dict):
            t.scaler.load_state_dict(ckpt['scaler'])
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"optimizer/scheduler state in {path} does not fit this run ({str(e).splitlines()[0]}); "
                              f"resume with the config the checkpoint was trained with") from None
    t.epoch, t.step = int(ckpt['epoch']), int(ckpt.get('step') or 0)
    t.max_accuracy = float(ckpt.get('max_accuracy', 0.0))
    t.max_ema_accuracy = float(ckpt.get('max_ema_accuracy', 0.0) or 0.0)
    logger.info(f"=> loaded successfully '{path}' (epoch {t.epoch}, step {t.step})")


def resume_run(t: Trainer) -> None:
    """Restore ``t`` from ``resume_source`` when there is one. A checkpoint that auto-resume found but that
    does not fit says so: the output folder holds another experiment's run."""
    config = t.config
    source = resume_source(config, t.info)
    if not source:
        return
    try:
        resume_training(t, source)
    except CheckpointError as e:
        if os.path.abspath(source) == os.path.abspath(config.MODEL.RESUME or '.'):
            raise
        raise CheckpointError(
            f"{e} Auto-resume found {source} in this run's output folder {config.OUTPUT}, which holds a run of "
            f"another model or config: give this experiment its own --output or --tag, or set "
            f"TRAIN.AUTO_RESUME False to start afresh") from None


# ----------------------------------------------------------------------------- fine-tuning
def _read_index_file(path: str) -> List[int]:
    try:
        with open(path) as f:
            return [int(line.split()[0]) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise CheckpointError(f"could not read the 22k->1k class index file {path}: {e}; give a text file "
                              f"with one class index per line") from None


def _which_weights(ckpt: Dict[str, Any], entry: Optional[str], prefer_ema: bool) -> str:
    """The log line's account of the state dict taken from a --pretrained file (the README promises it)."""
    taken = f'its {entry} weights' if entry else 'its weights (a bare state dict)'
    has_ema = any(isinstance(ckpt.get(k), dict) for k in EMA_ENTRIES)
    if prefer_ema and entry not in EMA_ENTRIES:
        return f'{taken} (--ema, but the file holds no EMA weights)'
    if not prefer_ema and has_ema:
        return f'{taken} (the file also holds EMA weights; --ema takes those)'
    return taken + (' (--ema)' if prefer_ema else '')


def load_finetune_weights(model: nn.Module, path: str, index_22k_to_1k: Optional[str] = None,
                          prefer_ema: bool = False) -> None:
    """--pretrained: the weights of ``path`` (any official wrapping; ``prefer_ema``: its EMA entry when it has
    one) adapted to ``model`` and loaded strictly. The family's ``checkpoint_filter_fn`` (in the module that
    defines the model's class, timm's convention) makes re-creatable buffers and resizes position tables /
    encodings; a head of another class count stays the model's fresh head, or with ``index_22k_to_1k`` (a text
    file of 1000 class indices) a 21841-class head is mapped to 1000 classes. Logs which weights were taken;
    any other mismatch raises CheckpointError naming the keys."""
    ckpt = ckpt_io.load_checkpoint(path)
    index = _read_index_file(index_22k_to_1k) if index_22k_to_1k else None
    entry = state_dict_entry(ckpt, prefer_ema)
    sd = ckpt_io.extract_model_state(ckpt, prefer_ema=prefer_ema)
    notes = [f'took {_which_weights(ckpt, entry, prefer_ema)}']
    filter_fn = getattr(sys.modules.get(type(model).__module__), 'checkpoint_filter_fn', None)
    sd = run_checkpoint_filter(filter_fn, sd, model, f'--pretrained {path}')
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    from models.attention_convert import fill_converted_state
    sd, added = fill_converted_state(sd, model)      # MODEL.ATTENTION: a softmax checkpoint lacks these
    if added:
        notes.append(f'{len(added)} focused-linear tensors not in the file, left at their initialisation: '
                     f'{", ".join(added[:4])}{" ..." if len(added) > 4 else ""}')
    target = model.state_dict()
    heads = cfg.get('classifier', 'head') or 'head'      # several for a distilled DeiT: ('head', 'head_dist')
    for key in [f'{h}.{suffix}' for h in ((heads,) if isinstance(heads, str) else heads)
                for suffix in ('weight', 'bias')]:
        if key in sd and key in target and sd[key].shape != target[key].shape:
            if index is not None and sd[key].shape[0] == 21841 and target[key].shape[0] == 1000:
                if len(index) != 1000:
                    raise CheckpointError(f"the 22k->1k class index file {index_22k_to_1k} has {len(index)} "
                                          f"class indices; 1000 are needed")
                sd[key] = sd[key][torch.as_tensor(index, dtype=torch.long)]
                notes.append(f'{key}: 21841 -> 1000 classes')
            else:
                sd[key] = target[key]
                notes.append(f'{key}: class count differs, head re-initialised')
    mismatch = state_dict_mismatch(target, sd)
    if mismatch:
        raise CheckpointError(f"pretrained weights {path} do not fit the model: {mismatch}; does --cfg match the "
                              f"checkpoint's model?")
    model.load_state_dict(sd, strict=True)
    for note in notes:
        logger.info('pretrained %s: %s', path, note)
    logger.info('loaded pretrained weights from %s', path)


__all__ = ['resume_source', 'load_weights', 'resume_training', 'resume_run', 'load_finetune_weights']
