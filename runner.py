"""Run setup and the three modes: ``run(config)`` is what ``main.py`` calls.

``run`` sets the run up (``setup_run``: data path check, lr scaling, output folder, logging) and dispatches to
one of three modes, each its own function:

* training: ``build_trainer(config, info)`` builds everything a run holds (loaders, model, optimizer,
  schedule, scaler, EMA, resume state) into an :class:`engine.Trainer`, and ``engine.train`` runs the epochs;
* evaluation: ``evaluate(config, info)``;
* throughput: ``measure_throughput(config, info)``.

The step, the epoch loop and evaluation are ``engine.py``; which weights a run starts from is ``resume.py``.
"""
from __future__ import annotations

import datetime
import fcntl
import logging
import os
import socket
from typing import IO, Optional

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3
from yacs.config import CfgNode

import report
from data import (build_mixup, build_train_loader, build_val_loader, check_data_path, check_images_open,
                  patch_randaugment_posterize)
from engine import RunResult, Trainer, build_criterion, compiled_for_inference, throughput, train, validate
from errors import ConfigError
from logger import MetricsWriter, create_logger
from lr_scheduler import build_scheduler
from models import build_model
from models.config_adapter import input_channels
from optimizer import build_optimizer
from resume import load_evaluated, load_finetune_weights, resume_run
from utils import (DistInfo, cleanup_distributed, init_distributed, pick_device, release_ddp_reducer,
                   seed_everything)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- setup
def accumulation_steps(config: CfgNode) -> int:
    """Micro-batches per optimizer step (TRAIN.ACCUMULATION_STEPS; 0 means 1, as the official default)."""
    return max(1, int(config.TRAIN.ACCUMULATION_STEPS))


def scale_lr(config: CfgNode, world_size: int) -> CfgNode:
    """TRAIN.LR_SCALING 'linear': base, warmup and min lr times the total batch (per-process batch x world
    size x accumulation steps) / TRAIN.LR_SCALE_BATCH, as the official Swin/FLatten/DeiT code; 'none': the
    configured values are absolute (ConvNeXt/L2ViT)."""
    if config.TRAIN.LR_SCALING == 'none':
        return config
    factor = config.DATA.BATCH_SIZE * world_size * accumulation_steps(config) / float(config.TRAIN.LR_SCALE_BATCH)
    config = config.clone()
    config.defrost()
    config.TRAIN.BASE_LR *= factor
    config.TRAIN.WARMUP_LR *= factor
    config.TRAIN.MIN_LR *= factor
    config.freeze()
    return config


def ensure_output(path: str) -> None:
    """Create the output folder and prove it is writable (ConfigError naming --output otherwise)."""
    probe = os.path.join(path, f'.write_test_{os.getpid()}')
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"output folder {path} is not writable ({e.strerror or e}); choose another --output") from None


LOCK_FILE = '.run.lock'
_held_locks: list = []          # (path, open file) of the run folders this process holds


def lock_run_folder(folder: str) -> None:
    """Hold ``folder`` for this run: an exclusive POSIX record lock (``lockf``) on ``folder/.run.lock``, which
    NFS / Lustre enforce across nodes, DataLoader workers do not inherit, and the kernel drops when the
    process dies, so a lock left by a run that was killed (kill -9, SIGTERM, an elastic restart) never blocks
    the next one. A folder held by a live run is a ConfigError naming the folder and its holder (host, pid,
    start time). Released by ``release_run_folders``."""
    path = os.path.join(folder, LOCK_FILE)
    f: IO[str] = open(path, 'a+')
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = ' '.join(f.read().split()) or 'another process'
        f.close()
        raise ConfigError(f'run folder {folder} is in use by another run ({holder}); wait for it to end, or give '
                          f'this run its own --output or --tag') from None
    f.seek(0)
    f.truncate()
    f.write(f'host {socket.gethostname()} pid {os.getpid()} started '
            f'{datetime.datetime.now().astimezone().isoformat(timespec="seconds")}\n')
    f.flush()
    _held_locks.append((path, f))


def release_run_folders() -> None:
    """Drop every run-folder lock this process holds (the file stays; its lock is what counts)."""
    while _held_locks:
        _, f = _held_locks.pop()
        f.close()


def files_dir(config: CfgNode) -> str:
    """Where this run writes its config.yaml, log and metrics: OUTPUT when training; its own sub-folder
    OUTPUT/eval (--eval) or OUTPUT/throughput (--throughput), so that evaluating a finished run's
    checkpoint with that run's --output never overwrites or appends to the training run's files."""
    if config.EVAL_MODE:
        return os.path.join(config.OUTPUT, 'eval')
    if config.THROUGHPUT_MODE:
        return os.path.join(config.OUTPUT, 'throughput')
    return config.OUTPUT


def setup_run(config: CfgNode, info: DistInfo) -> CfgNode:
    """What every mode needs first: the data path (and class count) checked once, before any work; the
    learning rate scaled (TRAIN.LR_SCALING); the output folder writable and held by this run (rank 0);
    logging; config.yaml written
    (rank 0); seeds. Returns the config the run uses."""
    training = not (config.EVAL_MODE or config.THROUGHPUT_MODE)
    if config.DATA.DATA_PATH or not config.THROUGHPUT_MODE:      # fail on a bad --data-path before any work
        check_data_path(config, ('train', 'val') if training else ('val',))
    config = scale_lr(config, info.world_size)
    folder = files_dir(config)
    ensure_output(folder)
    if info.is_main:            # one run per folder: a second run into a live run's folder stops here
        lock_run_folder(folder)
    create_logger(folder, info.rank, config.MODEL.NAME)
    if info.is_main:
        path = os.path.join(folder, 'config.yaml')
        with open(path, 'w') as f:
            f.write(config.dump())
        logger.info(f'Full config saved to {path}')
        logger.info(config.dump())
    logger.info(f'rank {info.rank}/{info.world_size} on {info.device}')
    seed_everything(config.SEED + info.rank)
    if info.device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    return config


def create_model(config: CfgNode, info: DistInfo) -> nn.Module:
    """The model on the run's device (channels_last when TRAIN.CHANNELS_LAST), with --pretrained weights."""
    logger.info(f'Creating model:{config.MODEL.TYPE}/{config.MODEL.NAME}')
    model = build_model(config).to(info.device)
    if config.TRAIN.CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    if info.is_main:      # the parameter/FLOPs table on the console, the full module tree in the log file only
        report.log_model(model, config.DATA.IMG_SIZE, input_channels(config)[0])
    logger.info(f'number of params: {sum(p.numel() for p in model.parameters() if p.requires_grad)}')
    if config.MODEL.PRETRAINED:
        load_finetune_weights(model, config.MODEL.PRETRAINED, index_22k_to_1k=config.MODEL.PRETRAINED_22K_TO_1K or None,
                              prefer_ema=config.MODEL.USE_EMA_WEIGHTS)
    return model


def create_ema(config: CfgNode, model: nn.Module) -> Optional[ModelEmaV3]:
    if not config.MODEL_EMA.ENABLE:
        return None
    ema = ModelEmaV3(model, decay=config.MODEL_EMA.DECAY,
                     device=torch.device('cpu') if config.MODEL_EMA.FORCE_CPU else None)
    logger.info(f'model EMA enabled, decay {config.MODEL_EMA.DECAY}')
    return ema


def convert_sync_batchnorm(model: nn.Module, config: CfgNode, info: DistInfo) -> nn.Module:
    """TRAIN.SYNC_BN: BatchNorm layers become SyncBatchNorm under DDP (a no-op on one process). The
    parameters are the same objects, so build the optimizer and EMA afterwards or before alike."""
    if not (config.TRAIN.SYNC_BN and info.distributed):
        return model
    if info.device.type != 'cuda':
        raise ConfigError('TRAIN.SYNC_BN needs CUDA devices (SyncBatchNorm has no CPU/gloo implementation); '
                          'train on GPUs or set TRAIN.SYNC_BN False')
    logger.info('BatchNorm layers converted to SyncBatchNorm')
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def build_trainer(config: CfgNode, info: Optional[DistInfo] = None, loader_val=None) -> Trainer:
    """Everything a training run holds, resumed when a checkpoint says so. ``config`` is the run's config
    (after ``setup_run``); ``info`` defaults to a single process on DEVICE."""
    info = info or DistInfo(device=pick_device(config.DEVICE))
    pin = info.device.type == 'cuda'
    if loader_val is None:
        dataset_val, loader_val = build_val_loader(config, info.rank, info.world_size, pin)
    check_images_open(loader_val.dataset, 'validation', info.rank, info.world_size)   # not after an epoch
    dataset_train, loader_train, sampler = build_train_loader(config, info.rank, info.world_size, pin)
    logger.info(f'{len(dataset_train)} training and {len(loader_val.dataset)} validation images')
    k = accumulation_steps(config)
    steps_per_epoch = sampler.per_rank() // (config.DATA.BATCH_SIZE * k)
    if steps_per_epoch < 1:
        raise ConfigError(f"DATA.BATCH_SIZE {config.DATA.BATCH_SIZE} x TRAIN.ACCUMULATION_STEPS {k} is larger than "
                          f"the {sampler.per_rank()} training images per process; lower one of them")

    model = create_model(config, info)
    model = convert_sync_batchnorm(model, config, info)
    optimizer = build_optimizer(config, model)
    step_model: nn.Module = model
    if info.distributed:
        # models whose official architecture has parameters unused in the forward declare it
        unused = config.FIND_UNUSED_PARAMS or bool(getattr(model, 'has_unused_parameters', False))
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if info.device.type == 'cuda' else None,
            find_unused_parameters=unused)
    ema = create_ema(config, model)      # after DDP broadcast rank 0's weights: one EMA on every rank
    if config.TRAIN.COMPILE:
        step_model = torch.compile(step_model, dynamic=False)
        logger.info('training step model compiled with torch.compile')
    mixup = build_mixup(config)
    use_scaler = config.AMP and config.AMP_DTYPE == 'float16'
    t = Trainer(config=config, info=info, model=step_model, model_without_ddp=model, optimizer=optimizer,
                lr_scheduler=build_scheduler(config, optimizer, steps_per_epoch),
                scaler=torch.amp.GradScaler(info.device.type, enabled=use_scaler),
                criterion=build_criterion(config, mixup), ema=ema, mixup=mixup, loader=loader_train,
                sampler=sampler, steps_per_epoch=steps_per_epoch, loader_val=loader_val, accumulation=k,
                epoch=config.TRAIN.START_EPOCH)
    resume_run(t)
    if info.is_main:
        t.metrics = MetricsWriter(config.OUTPUT, tensorboard=config.TENSORBOARD)
        t.metrics.truncate_after(t.epoch)        # records of epochs past the resume point are replayed
    return t


def evaluate(config: CfgNode, info: DistInfo) -> RunResult:
    """--eval: the model (and EMA, when the checkpoint holds one) on the validation set."""
    _, loader_val = build_val_loader(config, info.rank, info.world_size, info.device.type == 'cuda')
    model = create_model(config, info)
    ema = create_ema(config, model)
    source, ckpt = load_evaluated(config, info, model, ema)
    has_ema = isinstance(ckpt.get('model_ema'), dict)
    if not source and not config.MODEL.PRETRAINED:
        logger.warning('evaluating a randomly initialised model: give --resume CKPT or --pretrained CKPT')
    result = RunResult(model=model, ema_model=ema.module if ema is not None else None)
    run_model = compiled_for_inference(config, model, lambda: next(iter(loader_val))[0], info.device)
    result.eval = validate(config, loader_val, run_model, info.device)
    if ema is not None and has_ema:
        result.ema_eval = validate(config, loader_val, ema.module, info.device, name='ema network')
    if info.is_main:
        rec = {'kind': 'eval', 'checkpoint': source or config.MODEL.PRETRAINED or None,
               'val_acc1': result.eval.acc1, 'val_acc5': result.eval.acc5, 'val_loss': result.eval.loss}
        if result.ema_eval is not None:
            rec.update(ema_acc1=result.ema_eval.acc1, ema_acc5=result.ema_eval.acc5, ema_loss=result.ema_eval.loss)
        MetricsWriter(files_dir(config)).write(rec)
    return result


def measure_throughput(config: CfgNode, info: DistInfo) -> RunResult:
    """--throughput: images/s of the model on one validation batch (random images without --data-path)."""
    model = create_model(config, info)
    load_evaluated(config, info, model)
    if config.DATA.DATA_PATH:
        _, loader_val = build_val_loader(config, info.rank, info.world_size, info.device.type == 'cuda')
        images = next(iter(loader_val))[0]
    else:
        images = torch.randn(config.DATA.BATCH_SIZE, input_channels(config)[0], config.DATA.IMG_SIZE,
                             config.DATA.IMG_SIZE)
    run_model = compiled_for_inference(config, model, images, info.device)
    return RunResult(model=model, throughput=throughput(config, images, run_model, info.device))


# ----------------------------------------------------------------------------- run
def run(config: CfgNode) -> RunResult:
    """Train, evaluate (EVAL_MODE) or time (THROUGHPUT_MODE) as the config says. Raises an ``errors.UserError``
    (a clear one-line problem) or ``engine.Preempted``."""
    patch_randaugment_posterize()
    info = init_distributed(config.DEVICE, config.DIST_TIMEOUT)
    try:
        config = setup_run(config, info)
        if config.THROUGHPUT_MODE:
            return measure_throughput(config, info)
        if config.EVAL_MODE:
            return evaluate(config, info)
        t = build_trainer(config, info)
        try:
            return train(t)
        finally:
            if t.metrics is not None:
                t.metrics.close()
            release_ddp_reducer(t.model)
    finally:
        release_run_folders()
        cleanup_distributed()
