"""The one training / evaluation loop (with or without EMA): ``run(config)`` plus its pieces
``train_one_epoch``, ``validate`` and ``throughput``.

Reproducibility contract (CPU, fixed seed): the epoch's sample order is a function of (SEED, epoch)
(``ResumableSampler``), each sample's augmentation of (SEED, epoch, index), and the step's
mixup/drop-path/dropout randomness of (SEED, epoch, step, rank) (reseeded before every step). A run
resumed from any checkpoint, including a mid-epoch preemption checkpoint, therefore replays exactly
and ends with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import datetime
import logging
import math
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import AverageMeter, ModelEmaV3
from yacs.config import CfgNode

import checkpoint as ckpt_io
from checkpoint import CheckpointError
from config import ConfigError
from data import build_mixup, build_train_loader, build_val_loader, check_data_path
from logger import create_logger
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer
from utils import (DistInfo, PreemptionHandler, all_reduce_max, all_reduce_sum, barrier, cleanup_distributed,
                   derive_seed, get_rank, grad_norm, init_distributed, seed_everything)

logger = logging.getLogger(__name__)

PREEMPT_CHECKPOINT = 'preempt.pth'


class Preempted(Exception):
    """Raised after a SIGTERM/SIGINT once the resumable checkpoint is written (exit code 143)."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite steps); one line with the fix."""


@dataclass
class EvalResult:
    acc1: float
    acc5: float
    loss: float
    count: int
    skipped: int = 0


@dataclass
class RunResult:
    """What ``run`` leaves behind (for tests and scripts)."""
    model: nn.Module
    ema_model: Optional[nn.Module] = None
    eval: Optional[EvalResult] = None
    ema_eval: Optional[EvalResult] = None
    max_accuracy: float = 0.0
    max_ema_accuracy: float = 0.0
    throughput: Optional[float] = None
    epochs_done: int = 0
    skipped_steps: int = 0


@dataclass
class Trainer:
    """Everything one training run holds."""
    config: CfgNode
    info: DistInfo
    model: nn.Module                      # DDP wrapper or the model itself
    model_without_ddp: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    ema: Optional[ModelEmaV3]
    mixup: Any
    loader: Any
    sampler: Any
    steps_per_epoch: int
    preempt: PreemptionHandler = field(default_factory=PreemptionHandler)
    epoch: int = 0                        # epochs completed
    step: int = 0                         # steps completed in epoch ``epoch`` (mid-epoch resume)
    max_accuracy: float = 0.0
    max_ema_accuracy: float = 0.0
    nonfinite_run: int = 0
    skipped_steps: int = 0
    bad_images: int = 0

    @property
    def total_epochs(self) -> int:
        return self.config.TRAIN.EPOCHS + self.config.TRAIN.COOLDOWN_EPOCHS


# ----------------------------------------------------------------------------- helpers
def amp_dtype(config: CfgNode) -> torch.dtype:
    return torch.bfloat16 if config.AMP_DTYPE == 'bfloat16' else torch.float16


def memory_mb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # peak RSS (KiB on Linux)


def scale_lr(config: CfgNode, world_size: int) -> CfgNode:
    """Linear LR scaling by the total batch / 512 (base, warmup and min lr), as officially."""
    factor = config.DATA.BATCH_SIZE * world_size / 512.0
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


def build_criterion(config: CfgNode, mixup: Any) -> nn.Module:
    """SoftTargetCrossEntropy with Mixup/CutMix (smoothing is in the soft targets), label smoothing CE,
    or plain CE."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


def _broadcast_path(path: Optional[str]) -> Optional[str]:
    if dist.is_available() and dist.is_initialized():
        box = [path]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return path


def resume_source(config: CfgNode, info: DistInfo) -> Optional[str]:
    """--resume, unless TRAIN.AUTO_RESUME finds a checkpoint of this run in OUTPUT (training only:
    an explicit --resume with --eval is never replaced)."""
    explicit = config.MODEL.RESUME or None
    if explicit and (config.EVAL_MODE or config.THROUGHPUT_MODE):
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


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def validate(config: CfgNode, loader, model: nn.Module, device: torch.device, name: str = 'network') -> EvalResult:
    """Exact top-1/top-5 over the whole validation set: every rank counts its disjoint shard, then the
    correct counts, loss sums and image counts are all-reduced (no padding, no averaging of averages).
    ``model`` must be the bare module (no DDP: ranks may run different numbers of batches)."""
    model.eval()
    correct1 = correct5 = loss_sum = count = skipped = 0.0
    batch_time, acc1_meter = AverageMeter(), AverageMeter()
    end, n_batches = time.time(), len(loader)
    for idx, (images, target, bad) in enumerate(loader):
        for path in bad:
            logger.warning('skipped unreadable validation image %s', path)
        skipped += len(bad)
        if images is None:
            continue
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype(config), enabled=config.AMP):
            output = model(images)
        output = output.float()
        loss_sum += F.cross_entropy(output, target, reduction='sum').item()
        top = output.topk(min(5, output.shape[1]), dim=1).indices.eq(target[:, None])
        c1, c5 = top[:, :1].sum().item(), top.sum().item()
        correct1, correct5, count = correct1 + c1, correct5 + c5, count + target.numel()
        acc1_meter.update(100.0 * c1 / target.numel(), target.numel())
        batch_time.update(time.time() - end)
        end = time.time()
        if (idx + 1) % config.PRINT_FREQ == 0 or idx + 1 == n_batches:
            logger.info(f'Test: [{idx + 1}/{n_batches}]\tTime {batch_time.val:.3f} ({batch_time.avg:.3f})\t'
                        f'Acc@1 {acc1_meter.val:.3f} ({acc1_meter.avg:.3f})\tMem {memory_mb(device):.0f}MB')
    correct1, correct5, loss_sum, count, skipped = all_reduce_sum(
        [correct1, correct5, loss_sum, count, skipped], device)
    n = max(count, 1.0)
    result = EvalResult(100.0 * correct1 / n, 100.0 * correct5 / n, loss_sum / n, int(count), int(skipped))
    logger.info(f' * Acc@1 {result.acc1:.3f} Acc@5 {result.acc5:.3f}')
    if result.skipped and get_rank() == 0:
        logger.warning(f'{result.skipped} unreadable validation images were skipped; accuracy is over the '
                       f'remaining {result.count} images')
    logger.info(f'Accuracy of the {name} on the {result.count} test images: {result.acc1:.1f}%')
    return result


@torch.no_grad()
def throughput(config: CfgNode, images: torch.Tensor, model: nn.Module, device: torch.device) -> float:
    """Images/s of ``model`` on one batch: 50 warm-up + 30 timed passes on CUDA (2 + 5 on CPU)."""
    model.eval()
    warmup, timed = (50, 30) if device.type == 'cuda' else (2, 5)
    images = images.to(device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    with torch.autocast(device.type, dtype=amp_dtype(config), enabled=config.AMP):
        for _ in range(warmup):
            model(images)
        sync()
        logger.info(f'throughput averaged with {timed} times')
        start = time.time()
        for _ in range(timed):
            model(images)
        sync()
    value = timed * images.shape[0] / (time.time() - start)
    logger.info(f'batch_size {images.shape[0]} throughput {value}')
    return value


# ----------------------------------------------------------------------------- training
def checkpoint_state(t: Trainer, epoch: int, step: int = 0) -> Dict[str, Any]:
    """The resumable checkpoint dict (see the checkpoint API contract)."""
    return {
        'model': t.model_without_ddp.state_dict(),
        'optimizer': t.optimizer.state_dict(),
        'lr_scheduler': t.lr_scheduler.state_dict(),
        'scaler': t.scaler.state_dict() if t.scaler.is_enabled() else None,
        'model_ema': t.ema.module.state_dict() if t.ema is not None else None,
        'epoch': epoch, 'step': step,
        'max_accuracy': t.max_accuracy, 'max_ema_accuracy': t.max_ema_accuracy,
        'config': t.config.dump(),
    }


def save(t: Trainer, name: str, epoch: int, step: int = 0) -> str:
    path = os.path.join(t.config.OUTPUT, name)
    logger.info(f'{path} saving......')
    ckpt_io.save_checkpoint(checkpoint_state(t, epoch, step), path)
    logger.info(f'{path} saved !!!')
    return path


def load_resume(t: Optional[Trainer], path: str, model: nn.Module, ema: Optional[ModelEmaV3]) -> Dict[str, Any]:
    """Load weights (and, when training, optimizer/scheduler/scaler/EMA/progress) from ``path``."""
    logger.info(f'==============> Resuming from {path}....................')
    ckpt = ckpt_io.load_checkpoint(path)
    ckpt_io.load_model_state(model, ckpt_io.extract_model_state(ckpt), path)
    if ema is not None:
        if isinstance(ckpt.get('model_ema'), dict):
            ckpt_io.load_model_state(ema.module, ckpt_io.extract_model_state({'model': ckpt['model_ema']}), path)
        else:
            ema.module.load_state_dict(model.state_dict())
            logger.info('%s holds no EMA weights: EMA restarts from the loaded model', path)
    if t is not None and all(k in ckpt for k in ('optimizer', 'lr_scheduler', 'epoch')):
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
    return ckpt


def _step_flags(t: Trainer, local_bad: bool) -> tuple:
    """(any rank asked to stop, any rank saw a non-finite loss): one tiny collective per step under DDP."""
    flags = [float(t.preempt.requested), float(local_bad)]
    if t.info.distributed:
        flags = all_reduce_max(flags, t.info.device)
    return bool(flags[0]), bool(flags[1])


def _preempt_exit(t: Trainer, epoch: int, step: int) -> None:
    if t.info.is_main:
        save(t, PREEMPT_CHECKPOINT, epoch, step)
        logger.warning(f'preempted: saved epoch {epoch} step {step}; rerun the same command to continue')
    barrier()
    raise Preempted()


def train_one_epoch(t: Trainer, epoch: int, start_step: int = 0) -> None:
    """One epoch from ``start_step`` (skipped batches are never loaded). Steps whose loss or gradients
    are non-finite are skipped (float16: by the GradScaler); TRAIN.MAX_NONFINITE_STEPS in a row stop
    the run. A SIGTERM/SIGINT saves a preemption checkpoint at the next step boundary."""
    config, device, model = t.config, t.info.device, t.model
    model.train()
    t.sampler.set_epoch(epoch)
    t.sampler.set_start(start_step * config.DATA.BATCH_SIZE)
    num_steps = t.steps_per_epoch
    batch_time, loss_meter, norm_meter = AverageMeter(), AverageMeter(), AverageMeter()
    limit = max(1, config.TRAIN.MAX_NONFINITE_STEPS)
    start = end = time.time()
    for idx, (images, targets, bad) in enumerate(t.loader, start=start_step):
        for path in bad:
            logger.warning(f'skipped unreadable training image {path}')
        t.bad_images += len(bad)
        if images is None:
            raise TrainingError(f'epoch {epoch + 1} step {idx + 1}: every image of the batch is unreadable; '
                                f'check the dataset')
        if t.mixup is not None and images.shape[0] % 2:       # Mixup pairs images: keep an even batch
            images, targets = images[:-1], targets[:-1]
        seed_everything(derive_seed(config.SEED, epoch, idx, t.info.rank))
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if t.mixup is not None:
            images, targets = t.mixup(images, targets)
        t.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype(config), enabled=config.AMP):
            outputs = model(images)
            loss = t.criterion(outputs, targets)
        t.scaler.scale(loss).backward()
        if t.scaler.is_enabled():
            t.scaler.unscale_(t.optimizer)                     # grad norm / clipping on true gradients
        norm = float(grad_norm(model.parameters(), config.TRAIN.CLIP_GRAD))
        loss_value = loss.item()
        stop, nonfinite = _step_flags(t, not (math.isfinite(loss_value) and math.isfinite(norm)))
        if t.scaler.is_enabled():
            scale = t.scaler.get_scale()
            t.scaler.step(t.optimizer)                          # skips the update on inf/nan gradients
            t.scaler.update()
            skipped = nonfinite or t.scaler.get_scale() < scale
        else:
            skipped = nonfinite
            if not skipped:
                t.optimizer.step()
        if skipped:
            t.nonfinite_run += 1
            t.skipped_steps += 1
            logger.warning(f'epoch {epoch + 1} step {idx + 1}: non-finite loss ({loss_value}) or gradient norm '
                           f'({norm}); update skipped ({t.nonfinite_run} in a row)')
            if t.nonfinite_run >= limit:
                raise TrainingError(
                    f'training diverged: {t.nonfinite_run} consecutive steps with non-finite loss or gradients, '
                    f'the last at epoch {epoch + 1} step {idx + 1}; lower TRAIN.BASE_LR, set TRAIN.CLIP_GRAD or '
                    f'use --amp-dtype bfloat16 (limit: TRAIN.MAX_NONFINITE_STEPS)')
        else:
            t.nonfinite_run = 0
            if t.ema is not None:
                t.ema.update(t.model_without_ddp)
            loss_meter.update(loss_value, targets.size(0))
            norm_meter.update(norm)
        t.lr_scheduler.step_update(epoch * num_steps + idx + 1)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        batch_time.update(time.time() - end)
        end = time.time()
        if (idx + 1) % config.PRINT_FREQ == 0 or idx + 1 == num_steps:
            lr = t.optimizer.param_groups[0]['lr']
            eta = batch_time.avg * (num_steps - idx - 1)
            logger.info(
                f'Train: [{epoch + 1}/{t.total_epochs}][{idx + 1}/{num_steps}]\t'
                f'eta {datetime.timedelta(seconds=int(eta))} lr {lr:.6f}\t'
                f'time {batch_time.val:.4f} ({batch_time.avg:.4f})\t'
                f'loss {loss_meter.val:.4f} ({loss_meter.avg:.4f})\t'
                f'grad_norm {norm_meter.val:.4f} ({norm_meter.avg:.4f})\t'
                f'mem {memory_mb(device):.0f}MB')
        if stop:
            _preempt_exit(t, epoch, idx + 1)
    logger.info(f'EPOCH {epoch + 1} training takes {datetime.timedelta(seconds=int(time.time() - start))}')


def _end_of_epoch(t: Trainer, epoch: int, acc1: float, ema_acc1: Optional[float]) -> None:
    """Checkpoints after epoch ``epoch`` (0-based): every SAVE_FREQ epochs and at the end, keep the last
    TRAIN.KEEP_CHECKPOINTS; ``max_acc.pth`` / ``max_ema_acc.pth`` on every new best (rank 0 only). A stale
    preemption checkpoint is removed once a newer complete checkpoint exists."""
    config, done = t.config, epoch + 1
    save_now = done % config.SAVE_FREQ == 0 or done == t.total_epochs
    best = acc1 >= t.max_accuracy
    t.max_accuracy = max(t.max_accuracy, acc1)
    best_ema = ema_acc1 is not None and ema_acc1 >= t.max_ema_accuracy
    if ema_acc1 is not None:
        t.max_ema_accuracy = max(t.max_ema_accuracy, ema_acc1)
    if t.info.is_main:
        if save_now:
            save(t, f'ckpt_epoch_{done}.pth', done)
            ckpt_io.prune_checkpoints(config.OUTPUT, config.TRAIN.KEEP_CHECKPOINTS)
        if best:                       # on every new best, not only on SAVE_FREQ epochs: never lose it
            save(t, 'max_acc.pth', done)
        if best_ema:
            save(t, 'max_ema_acc.pth', done)
        stale = os.path.join(config.OUTPUT, PREEMPT_CHECKPOINT)
        if (save_now or best or best_ema) and os.path.exists(stale):
            os.remove(stale)
    logger.info(f'Max accuracy: {t.max_accuracy:.2f}%')
    if ema_acc1 is not None:
        logger.info(f'Max ema accuracy: {t.max_ema_accuracy:.2f}%')


def train(t: Trainer, loader_val) -> RunResult:
    """Epoch loop from the resumed (epoch, step); validates (and the EMA) after every epoch."""
    config, device = t.config, t.info.device
    eval_ema = t.ema is not None and not (config.MODEL_EMA.FORCE_CPU and device.type == 'cuda')
    result = RunResult(model=t.model_without_ddp, ema_model=t.ema.module if t.ema is not None else None)
    logger.info('Start training')
    start = time.time()
    with t.preempt:
        for epoch in range(t.epoch, t.total_epochs):
            train_one_epoch(t, epoch, t.step if epoch == t.epoch else 0)
            result.eval = validate(config, loader_val, t.model_without_ddp, device)
            if eval_ema:
                result.ema_eval = validate(config, loader_val, t.ema.module, device, name='ema network')
            _end_of_epoch(t, epoch, result.eval.acc1, result.ema_eval.acc1 if eval_ema else None)
            result.epochs_done += 1
            if _step_flags(t, False)[0]:           # signal arrived during validation
                _preempt_exit(t, epoch + 1, 0)
    logger.info(f'Training time {datetime.timedelta(seconds=int(time.time() - start))}')
    if t.skipped_steps or t.bad_images:
        logger.warning(f'{t.skipped_steps} non-finite steps skipped, {t.bad_images} unreadable training images skipped')
    result.max_accuracy, result.max_ema_accuracy = t.max_accuracy, t.max_ema_accuracy
    result.skipped_steps = t.skipped_steps
    return result


# ----------------------------------------------------------------------------- run
def run(config: CfgNode) -> RunResult:
    """Train, evaluate (EVAL_MODE) or time (THROUGHPUT_MODE) as the config says. Raises ConfigError,
    CheckpointError, DataError, TrainingError (clear one-line problems) or Preempted."""
    info = init_distributed(config.DEVICE, config.DIST_TIMEOUT)
    try:
        return _run(config, info)
    finally:
        cleanup_distributed()


def _run(config: CfgNode, info: DistInfo) -> RunResult:
    training = not (config.EVAL_MODE or config.THROUGHPUT_MODE)
    if config.DATA.DATA_PATH or not config.THROUGHPUT_MODE:      # fail on a bad --data-path before any work
        check_data_path(config, ('train', 'val') if training else ('val',))
    config = scale_lr(config, info.world_size)
    config.defrost()
    config.LOCAL_RANK = info.local_rank
    config.freeze()
    ensure_output(config.OUTPUT)
    create_logger(config.OUTPUT, info.rank, config.MODEL.NAME)
    if info.is_main:
        path = os.path.join(config.OUTPUT, 'config.yaml')
        with open(path, 'w') as f:
            f.write(config.dump())
        logger.info(f'Full config saved to {path}')
        logger.info(config.dump())
    logger.info(f'rank {info.rank}/{info.world_size} on {info.device}')
    seed_everything(config.SEED + info.rank)
    if info.device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    pin = info.device.type == 'cuda'

    loader_val = None
    if config.DATA.DATA_PATH or not config.THROUGHPUT_MODE:
        dataset_val, loader_val = build_val_loader(config, info.rank, info.world_size, pin)
    if training:
        dataset_train, loader_train, sampler = build_train_loader(config, info.rank, info.world_size, pin)
        logger.info(f'{len(dataset_train)} training and {len(dataset_val)} validation images')

    logger.info(f'Creating model:{config.MODEL.TYPE}/{config.MODEL.NAME}')
    model = build_model(config).to(info.device)
    logger.info(str(model))
    logger.info(f'number of params: {sum(p.numel() for p in model.parameters() if p.requires_grad)}')
    if config.MODEL.PRETRAINED:
        ckpt_io.load_pretrained(model, config.MODEL.PRETRAINED, logger,
                                index_22k_to_1k=config.MODEL.PRETRAINED_22K_TO_1K or None)
    ema = None
    if config.MODEL_EMA.ENABLE:
        ema = ModelEmaV3(model, decay=config.MODEL_EMA.DECAY,
                         device=torch.device('cpu') if config.MODEL_EMA.FORCE_CPU else None)
        logger.info(f'model EMA enabled, decay {config.MODEL_EMA.DECAY}')

    source = resume_source(config, info)
    if not training:
        has_ema = False
        if source:
            has_ema = isinstance(load_resume(None, source, model, ema).get('model_ema'), dict)
        elif not config.MODEL.PRETRAINED and config.EVAL_MODE:
            logger.warning('evaluating a randomly initialised model: give --resume CKPT or --pretrained CKPT')
        result = RunResult(model=model, ema_model=ema.module if ema is not None else None)
        if config.THROUGHPUT_MODE:
            if loader_val is not None:
                images = next(iter(loader_val))[0]
            else:
                images = torch.randn(config.DATA.BATCH_SIZE, 3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE)
            result.throughput = throughput(config, images, model, info.device)
            return result
        result.eval = validate(config, loader_val, model, info.device)
        if ema is not None and has_ema:
            result.ema_eval = validate(config, loader_val, ema.module, info.device, name='ema network')
        return result

    optimizer = build_optimizer(config, model)
    model_ddp = model
    if info.distributed:
        model_ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if info.device.type == 'cuda' else None,
            find_unused_parameters=config.FIND_UNUSED_PARAMS)
    steps_per_epoch = sampler.per_rank() // config.DATA.BATCH_SIZE
    mixup = build_mixup(config)
    use_scaler = config.AMP and config.AMP_DTYPE == 'float16'
    t = Trainer(config=config, info=info, model=model_ddp, model_without_ddp=model, optimizer=optimizer,
                lr_scheduler=build_scheduler(config, optimizer, steps_per_epoch),
                scaler=torch.amp.GradScaler(info.device.type, enabled=use_scaler),
                criterion=build_criterion(config, mixup), ema=ema, mixup=mixup, loader=loader_train,
                sampler=sampler, steps_per_epoch=steps_per_epoch, epoch=config.TRAIN.START_EPOCH)
    if source:
        load_resume(t, source, model, ema)
    return train(t, loader_val)
