"""The step, the epoch loop and evaluation (with or without EMA).

A :class:`Trainer` (built by ``runner.build_trainer``) holds everything a training run holds; ``train(t)`` runs
the epochs (``train_one_epoch`` -> ``forward_backward`` / ``optimizer_step`` per step, ``validate`` per epoch,
checkpoints through :func:`save`); ``validate`` and ``throughput`` measure a model. Run setup and the
modes are ``runner.py``; which weights a run starts from is ``resume.py``.

The training step does no host synchronisation: the loss, the gradient norm, the non-finite flag and the
count of consecutive non-finite steps stay on the device and are read back once every PRINT_FREQ steps
(and at the end of an epoch). A non-finite step is skipped on the device (fused optimizers take a
``found_inf`` tensor; the EMA update is masked), so the guarantees hold without a per-step read-back.

Reproducibility contract (CPU, fixed seed): the epoch's sample order is a function of (SEED, epoch)
(``ResumableSampler``), each sample's augmentation of (SEED, epoch, index), and the micro-batch's
mixup/drop-path/dropout randomness of (SEED, epoch, micro-batch, rank) (reseeded before every micro-batch).
A run resumed from any checkpoint, including a mid-epoch preemption checkpoint, therefore replays exactly
and ends with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import datetime
import logging
import os
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from yacs.config import CfgNode

import checkpoint as ckpt_io
import report
from errors import ConfigError, DataError, Preempted, TrainingError
from logger import MetricsWriter
from optimizer import supports_found_inf
from utils import (DistInfo, PreemptionHandler, all_reduce_max, all_reduce_sum, barrier, derive_seed, get_rank,
                   grad_norm, seed_everything)

logger = logging.getLogger(__name__)

PREEMPT_CHECKPOINT = 'preempt.pth'
VALIDATION_LOG_SECONDS = 30.0            # validation progress at least this often (rank 0 logs it)


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
class EpochStats:
    """Host-side figures of one epoch, filled at the read-backs (every PRINT_FREQ steps)."""
    loss_sum: float = 0.0
    loss_count: int = 0
    norm_sum: float = 0.0
    norm_count: int = 0
    images: int = 0
    skipped_steps: int = 0
    seconds: float = 0.0
    last_loss: float = float('nan')
    last_norm: float = float('nan')

    @property
    def loss(self) -> float:
        return self.loss_sum / self.loss_count if self.loss_count else float('nan')

    @property
    def grad_norm(self) -> float:
        return self.norm_sum / self.norm_count if self.norm_count else float('nan')


@dataclass
class Trainer:
    """Everything one training run holds."""
    config: CfgNode
    info: DistInfo
    model: nn.Module                      # what the step calls: DDP wrapper and/or torch.compile, or the model
    model_without_ddp: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    ema: Optional[ModelEmaV3]
    mixup: Any
    loader: Any
    sampler: Any
    steps_per_epoch: int                  # optimizer steps per epoch
    loader_val: Any = None
    accumulation: int = 1                 # micro-batches per optimizer step
    metrics: Optional[MetricsWriter] = None
    preempt: PreemptionHandler = field(default_factory=PreemptionHandler)
    epoch: int = 0                        # epochs completed
    step: int = 0                         # optimizer steps completed in epoch ``epoch`` (mid-epoch resume)
    max_accuracy: float = 0.0
    max_ema_accuracy: float = 0.0
    nonfinite_run: int = 0                # consecutive skipped steps, as of the last read-back
    skipped_steps: int = 0
    bad_images: int = 0
    _run_dev: Optional[torch.Tensor] = None   # the same count on the device, updated every step

    @property
    def total_epochs(self) -> int:
        return self.config.TRAIN.EPOCHS + self.config.TRAIN.COOLDOWN_EPOCHS


# ----------------------------------------------------------------------------- what a checkpoint holds
def checkpoint_state(t: Trainer, epoch: int, step: int = 0) -> Dict[str, Any]:
    """The resumable checkpoint dict of ``t`` at (epoch, step) (see the checkpoint API contract;
    ``resume.resume_training`` reads it back)."""
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
    """Write the resumable checkpoint of ``t`` at (epoch, step) as OUTPUT/``name``; returns its path."""
    path = os.path.join(t.config.OUTPUT, name)
    logger.info(f'{path} saving......')
    ckpt_io.save_checkpoint(checkpoint_state(t, epoch, step), path)
    logger.info(f'{path} saved !!!')
    return path


# ----------------------------------------------------------------------------- helpers
def amp_dtype(config: CfgNode) -> torch.dtype:
    return torch.bfloat16 if config.AMP_DTYPE == 'bfloat16' else torch.float16


def memory_mb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # peak RSS (KiB on Linux)


def build_criterion(config: CfgNode, mixup: Any) -> nn.Module:
    """SoftTargetCrossEntropy with Mixup/CutMix (smoothing is in the soft targets), label smoothing CE,
    or plain CE."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """Non-blocking copy (the loader pins memory on CUDA); 4-D images optionally in channels_last."""
    if channels_last and x.ndim == 4:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device, non_blocking=True)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def validate(config: CfgNode, loader, model: nn.Module, device: torch.device, name: str = 'network') -> EvalResult:
    """Exact top-1/top-5 over the whole validation set: every rank counts its disjoint shard, then the
    correct counts, loss sums and image counts are all-reduced (no padding, no averaging of averages).
    ``model`` must be the bare module (no DDP: ranks may run different numbers of batches). Counts stay
    on the device and are read back every PRINT_FREQ batches."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)           # correct@1, correct@5, loss sum
    count = skipped = 0
    window_c1, window_n = torch.zeros((), dtype=torch.float64, device=device), 0
    channels_last = config.TRAIN.CHANNELS_LAST
    start = end = time.time()
    n_batches, last = len(loader), 0
    for idx, (images, target, bad) in enumerate(loader):
        for path in bad:
            logger.warning('skipped unreadable validation image %s', path)
        skipped += len(bad)
        if images is not None:
            images, target = to_device(images, device, channels_last), to_device(target, device)
            with torch.autocast(device.type, dtype=amp_dtype(config), enabled=config.AMP):
                output = model(images)
            output = output.float()
            top = output.topk(min(5, output.shape[1]), dim=1).indices.eq(target[:, None])
            c1 = top[:, :1].sum()
            sums += torch.stack([c1, top.sum(), F.cross_entropy(output, target, reduction='sum')]).double()
            window_c1 += c1
            count += target.numel()
            window_n += target.numel()
        # progress every PRINT_FREQ batches, and at least every VALIDATION_LOG_SECONDS on long validations
        if (idx + 1) % config.PRINT_FREQ == 0 or idx + 1 == n_batches or time.time() - end >= VALIDATION_LOG_SECONDS:
            acc = 100.0 * window_c1.item() / max(window_n, 1)
            logger.info(f'Test: [{idx + 1}/{n_batches}]\tTime {(time.time() - end) / max(idx + 1 - last, 1):.3f} '
                        f'({(time.time() - start) / (idx + 1):.3f})\tAcc@1 {acc:.3f}\tMem {memory_mb(device):.0f}MB')
            window_c1.zero_()
            window_n, end, last = 0, time.time(), idx + 1
    correct1, correct5, loss_sum = sums.tolist()
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
    images = to_device(images, device, config.TRAIN.CHANNELS_LAST)
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


def check_same_predictions(ref: torch.Tensor, out: torch.Tensor, what: str, rtol: float = 1e-3,
                           atol_rel: float = 1e-4) -> Dict[str, Any]:
    """``out`` (N, classes) logits of a faster runtime against the eager ``ref``: top-1 identical wherever
    the eager top-2 margin exceeds twice the logit tolerance (closer ones are ties at float precision,
    counted), and |out - ref| <= atol + rtol |ref| with atol = atol_rel x max |ref|. Raises a one-line
    ConfigError naming ``what`` otherwise; returns the measured differences."""
    ref, out = ref.detach().float().cpu(), out.detach().float().cpu()
    atol = atol_rel * ref.abs().max().item()
    tol = atol + rtol * ref.abs()
    diff = (out - ref).abs()
    top2 = ref.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * tol.max(dim=-1).values
    agree = out.argmax(-1) == ref.argmax(-1)
    res = {'images': ref.shape[0], 'max_abs_diff': diff.max().item(), 'atol': atol,
           'top1_agree': int(agree.sum()), 'ties': int((~decided).sum())}
    if not bool((diff <= tol).all()):
        raise ConfigError(f'{what}: logits differ from eager by up to {res["max_abs_diff"]:.3g} (> atol '
                          f'{atol:.3g} + rtol {rtol}); it does not compute the same function here: run eager')
    if not bool(agree[decided].all()):
        raise ConfigError(f'{what}: top-1 differs from eager on {int((~agree[decided]).sum())} of '
                          f'{int(decided.sum())} images; run eager')
    return res


@torch.no_grad()
def compiled_for_inference(config: CfgNode, model: nn.Module,
                           images: Union[torch.Tensor, Callable[[], torch.Tensor]], device: torch.device) -> nn.Module:
    """``model`` itself, or with TRAIN.COMPILE (--compile) ``torch.compile(model)`` once it gave the eager
    predictions on ``images`` (a validation batch, or a function returning one: it is only called when
    compiling; see :func:`check_same_predictions`)."""
    if not config.TRAIN.COMPILE:
        return model
    model.eval()
    images = to_device(images() if callable(images) else images, device, config.TRAIN.CHANNELS_LAST)
    compiled = torch.compile(model, dynamic=False)
    with torch.autocast(device.type, dtype=amp_dtype(config), enabled=config.AMP):
        res = check_same_predictions(model(images), compiled(images), 'TRAIN.COMPILE (--compile)')
    logger.info(f"torch.compile gives the eager predictions on {res['images']} images "
                f"(max |logit diff| {res['max_abs_diff']:.2g}, top-1 agree {res['top1_agree']})")
    return compiled


# ----------------------------------------------------------------------------- the step
def _poison_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` unchanged when finite; otherwise multiplied by NaN so that every gradient is NaN too.
    Under DDP the gradients are averaged over the ranks, so every rank then sees the same non-finite
    gradient norm and skips the same steps, without a collective for the flag."""
    return loss * torch.where(torch.isfinite(loss), 1.0, float('nan')).to(loss.dtype)


def forward_backward(t: Trainer, images: torch.Tensor, targets: torch.Tensor, sync_grads: bool = True
                     ) -> torch.Tensor:
    """One micro-batch: forward, loss / accumulation steps, backward (gradients accumulate). Under DDP
    the gradient all-reduce happens only when ``sync_grads``. Returns the undivided loss (a device
    scalar, detached); no host synchronisation."""
    config, device = t.config, t.info.device
    sync_ctx = t.model.no_sync() if (not sync_grads and hasattr(t.model, 'no_sync')) else nullcontext()
    with sync_ctx:
        with torch.autocast(device.type, dtype=amp_dtype(config), enabled=config.AMP):
            outputs = t.model(images)
            loss = _poison_nonfinite(t.criterion(outputs, targets))
        t.scaler.scale(loss / t.accumulation).backward()
    return loss.detach().float()


@torch.no_grad()
def ema_update(ema: ModelEmaV3, model: nn.Module, ok: torch.Tensor) -> None:
    """ModelEmaV3's update (floating state lerped toward the model by 1 - decay, other state copied),
    masked by the device flag ``ok``: a skipped step leaves the EMA untouched, without a read-back."""
    ok = ok.to(ema.device or ok.device)
    weight = ok.float() * (1.0 - ema.get_decay())
    floats_e, floats_m = [], []
    for e, m in zip(ema.module.state_dict().values(), model.state_dict().values()):
        m = m.to(device=e.device)
        if e.is_floating_point():
            floats_e.append(e)
            floats_m.append(m.to(e.dtype))
        else:
            e.copy_(torch.where(ok, m, e))
    if floats_e:
        torch._foreach_lerp_(floats_e, floats_m, weight.to(floats_e[0].device))


def optimizer_step(t: Trainer) -> torch.Tensor:
    """Clip, step, zero, EMA, all on the device. Returns ``[gradient norm, skipped (0/1), consecutive
    skipped steps]`` (float32 device tensor). A non-finite gradient norm (a non-finite loss makes every
    gradient NaN, see ``_poison_nonfinite``) skips the update: fused optimizers get it as ``found_inf``,
    others (a host read-back, the only one) skip ``step()``; float16's GradScaler lowers its scale."""
    config = t.config
    if t.scaler.is_enabled():
        t.scaler.unscale_(t.optimizer)                     # grad norm / clipping on true gradients
    params = [p for group in t.optimizer.param_groups for p in group['params']]
    norm = grad_norm(params, config.TRAIN.CLIP_GRAD).float()
    bad = ~torch.isfinite(norm)
    if supports_found_inf(t.optimizer):
        t.optimizer.grad_scale, t.optimizer.found_inf = None, bad.float()
        try:
            t.optimizer.step()
        finally:
            del t.optimizer.grad_scale, t.optimizer.found_inf
    elif not bool(bad):
        t.optimizer.step()
    if t.scaler.is_enabled():
        t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    if t.ema is not None:
        ema_update(t.ema, t.model_without_ddp, ~bad)
    if t._run_dev is None:
        t._run_dev = torch.full((), float(t.nonfinite_run), device=norm.device)
    t._run_dev = (t._run_dev + 1) * bad.float()
    return torch.stack([norm, bad.float(), t._run_dev])


def preemption_point(t: Trainer, epoch: int, step: int) -> str:
    """Where a run stopped, in the training log's numbering: ``step`` optimizer steps of 0-based epoch
    ``epoch`` done -> ``[epoch+1/E][step/S]`` as in ``Train: [1/2][12/22]``; at an epoch boundary (step 0)
    ``after epoch [epoch/E]``."""
    if step == 0:
        return f'after epoch [{epoch}/{t.total_epochs}]'
    return f'at [{epoch + 1}/{t.total_epochs}][{step}/{t.steps_per_epoch}]'


def _preempt_exit(t: Trainer, epoch: int, step: int) -> None:
    """Save the resumable checkpoint of (0-based epoch, steps done in it) and raise Preempted."""
    if t.info.is_main:
        path = save(t, PREEMPT_CHECKPOINT, epoch, step)
        logger.warning(f'preempted {preemption_point(t, epoch, step)}: saved {path}; rerun the same command to '
                       f'continue')
    barrier()
    raise Preempted()


def _stop_requested(t: Trainer) -> bool:
    """Whether any rank received SIGTERM/SIGINT: a host flag (free) alone; one tiny collective under DDP,
    so callers ask at read-back steps only."""
    if not t.info.distributed:
        return t.preempt.requested
    return bool(all_reduce_max([float(t.preempt.requested)], t.info.device)[0])


def _read_back(t: Trainer, epoch: int, first_step: int, window: List[torch.Tensor], sizes: List[int],
               stats: EpochStats) -> None:
    """The one host synchronisation of PRINT_FREQ steps: log skipped steps, stop on divergence, update the
    epoch statistics. ``window[i]`` = [loss, grad norm, skipped, consecutive skipped] of step first_step+i."""
    rows = torch.stack(window).tolist()
    limit = max(1, t.config.TRAIN.MAX_NONFINITE_STEPS)
    for i, (loss, norm, bad, run) in enumerate(rows):
        step = first_step + i + 1
        if bad:
            t.skipped_steps += 1
            stats.skipped_steps += 1
            logger.warning(f'epoch {epoch + 1} step {step}: non-finite loss ({loss}) or gradient norm '
                           f'({norm}); update skipped ({int(run)} in a row)')
            if run >= limit:
                raise TrainingError(
                    f'training diverged: {int(run)} consecutive steps with non-finite loss or gradients, '
                    f'the last at epoch {epoch + 1} step {step}; lower TRAIN.BASE_LR, set TRAIN.CLIP_GRAD or '
                    f'use --amp-dtype bfloat16 (limit: TRAIN.MAX_NONFINITE_STEPS)')
        else:
            stats.loss_sum += loss * sizes[i]
            stats.loss_count += sizes[i]
            stats.norm_sum += norm
            stats.norm_count += 1
            stats.last_loss, stats.last_norm = loss, norm
        t.nonfinite_run = int(run)


def train_one_epoch(t: Trainer, epoch: int, start_step: int = 0) -> EpochStats:
    """One epoch of optimizer steps from ``start_step`` (skipped batches are never loaded); each step
    accumulates TRAIN.ACCUMULATION_STEPS micro-batches (left-over micro-batches at the end of the epoch
    are not loaded). Non-finite steps are skipped; TRAIN.MAX_NONFINITE_STEPS in a row stop the run. A
    SIGTERM/SIGINT saves a preemption checkpoint at the next step boundary (under DDP: the next
    read-back, every PRINT_FREQ steps)."""
    config, device = t.config, t.info.device
    k, batch = t.accumulation, config.DATA.BATCH_SIZE
    t.model.train()
    t.sampler.set_epoch(epoch)
    t.sampler.set_start(start_step * k * batch)
    num_steps = t.steps_per_epoch
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    stats = EpochStats()
    window: List[torch.Tensor] = []
    sizes: List[int] = []
    window_start, loss_acc, n_images = start_step, None, 0
    start = window_time = time.time()
    t.optimizer.zero_grad(set_to_none=True)
    loader_iter = iter(t.loader)
    for step in range(start_step, num_steps):
        for micro in range(k):
            images, targets, bad = next(loader_iter)
            index = step * k + micro                       # micro-batch index in the epoch
            for path in bad:
                logger.warning(f'skipped unreadable training image {path}')
            t.bad_images += len(bad)
            if images is None:
                raise TrainingError(f'epoch {epoch + 1} step {step + 1}: every image of the batch is unreadable; '
                                    f'check the dataset')
            if bad:
                logger.warning(f'epoch {epoch + 1} step {step + 1}: batch shortened to {images.shape[0]} of '
                               f'{batch} images ({len(bad)} unreadable skipped)')
            if t.mixup is not None and images.shape[0] % 2:   # Mixup pairs images: keep an even batch
                # (BATCH_SIZE is even, see config; only skipped images make it odd): drop the last image,
                # or repeat a lone one (mixed with itself it stays itself)
                if images.shape[0] > 1:
                    images, targets = images[:-1], targets[:-1]
                else:
                    images, targets = torch.cat([images, images]), torch.cat([targets, targets])
            seed_everything(derive_seed(config.SEED, epoch, index, t.info.rank))
            images = to_device(images, device, config.TRAIN.CHANNELS_LAST)
            targets = to_device(targets, device)
            if t.mixup is not None:
                images, targets = t.mixup(images, targets)
            loss = forward_backward(t, images, targets, sync_grads=micro == k - 1)
            loss_acc = loss if micro == 0 else loss_acc + loss
            n_images += images.shape[0]
        row = optimizer_step(t)
        window.append(torch.cat([(loss_acc / k).reshape(1), row]))
        sizes.append(n_images)
        stats.images += n_images
        n_images = 0
        t.lr_scheduler.step_update(epoch * num_steps + step + 1)
        if (step + 1) % config.PRINT_FREQ == 0 or step + 1 == num_steps:
            _read_back(t, epoch, window_start, window, sizes, stats)
            now = time.time()
            per_step = (now - window_time) / len(window)
            avg = (now - start) / (step + 1 - start_step)
            lr = t.optimizer.param_groups[0]['lr']
            eta = avg * (num_steps - step - 1)
            logger.info(
                f'Train: [{epoch + 1}/{t.total_epochs}][{step + 1}/{num_steps}]\t'
                f'eta {datetime.timedelta(seconds=int(eta))} lr {lr:.6f}\t'
                f'time {per_step:.4f} ({avg:.4f})\t'
                f'loss {stats.last_loss:.4f} ({stats.loss:.4f})\t'
                f'grad_norm {stats.last_norm:.4f} ({stats.grad_norm:.4f})\t'
                f'mem {memory_mb(device):.0f}MB')
            window, sizes, window_start, window_time = [], [], step + 1, now
            if _stop_requested(t):
                _preempt_exit(t, epoch, step + 1)
        elif not t.info.distributed and t.preempt.requested:   # a host flag: no synchronisation
            _read_back(t, epoch, window_start, window, sizes, stats)
            _preempt_exit(t, epoch, step + 1)
    stats.seconds = time.time() - start
    logger.info(f'EPOCH {epoch + 1} training takes {datetime.timedelta(seconds=int(stats.seconds))}')
    return stats


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


def epoch_record(t: Trainer, epoch: int, stats: EpochStats, val: EvalResult, ema_val: Optional[EvalResult]
                 ) -> Dict[str, Any]:
    """The metrics.jsonl record of epoch ``epoch`` (0-based; written as the 1-based count of done epochs)."""
    rec: Dict[str, Any] = {
        'kind': 'epoch', 'epoch': epoch + 1, 'step': (epoch + 1) * t.steps_per_epoch,
        'lr': t.optimizer.param_groups[0]['lr'], 'train_loss': stats.loss, 'grad_norm': stats.grad_norm,
        'val_acc1': val.acc1, 'val_acc5': val.acc5, 'val_loss': val.loss,
        'images_per_s': stats.images * t.info.world_size / stats.seconds if stats.seconds else None,
        'epoch_time_s': stats.seconds, 'peak_mem_mb': memory_mb(t.info.device),
        'skipped_steps': stats.skipped_steps, 'bad_images': t.bad_images, 'bad_val_images': val.skipped,
    }
    if ema_val is not None:
        rec.update(ema_acc1=ema_val.acc1, ema_acc5=ema_val.acc5, ema_loss=ema_val.loss)
    return rec


def _saved_before_failing(t: Trainer, epoch: int, error: DataError) -> DataError:
    """Validation of epoch ``epoch`` (0-based) hit an unreadable image: save the trained epoch (rank 0) so
    that rerunning the command resumes after it, and return the error saying so."""
    if not t.info.is_main:
        return error
    name = f'ckpt_epoch_{epoch + 1}.pth'
    save(t, name, epoch + 1)
    return DataError(f'{error} (epoch {epoch + 1} was trained and saved as {name} before validating it; '
                     f'rerun the same command to continue from there)')


def train(t: Trainer, loader_val=None) -> RunResult:
    """Epoch loop from the resumed (epoch, step); validates (and the EMA) after every epoch, then saves
    checkpoints and appends the epoch's record to metrics.jsonl."""
    config, device = t.config, t.info.device
    loader_val = loader_val if loader_val is not None else t.loader_val
    eval_ema = t.ema is not None and not (config.MODEL_EMA.FORCE_CPU and device.type == 'cuda')
    result = RunResult(model=t.model_without_ddp, ema_model=t.ema.module if t.ema is not None else None)
    logger.info('Start training')
    start = time.time()
    with t.preempt:
        for epoch in range(t.epoch, t.total_epochs):
            stats = train_one_epoch(t, epoch, t.step if epoch == t.epoch else 0)
            try:
                result.eval = validate(config, loader_val, t.model_without_ddp, device)
                if eval_ema:
                    result.ema_eval = validate(config, loader_val, t.ema.module, device, name='ema network')
            except DataError as e:          # an image that became unreadable: keep the trained epoch first
                raise _saved_before_failing(t, epoch, e) from None
            _end_of_epoch(t, epoch, result.eval.acc1, result.ema_eval.acc1 if eval_ema else None)
            if t.metrics is not None:
                t.metrics.write(epoch_record(t, epoch, stats, result.eval, result.ema_eval if eval_ema else None))
            result.epochs_done += 1
            if _stop_requested(t):                   # signal arrived during validation
                _preempt_exit(t, epoch + 1, 0)
    logger.info(f'Training time {datetime.timedelta(seconds=int(time.time() - start))}')
    if t.skipped_steps or t.bad_images:
        logger.warning(f'{t.skipped_steps} non-finite steps skipped, {t.bad_images} unreadable training images skipped')
    bad_images = int(all_reduce_sum([t.bad_images], device)[0])       # over all ranks
    bad_val = result.eval.skipped if result.eval is not None else 0    # validate() summed the ranks already
    if t.info.is_main:              # printed, and written to summary.json / summary.txt in the run folder
        report.write_summary(config.OUTPUT, time.time() - start, t.skipped_steps, bad_images, bad_val)
    result.max_accuracy, result.max_ema_accuracy = t.max_accuracy, t.max_ema_accuracy
    result.skipped_steps = t.skipped_steps
    return result
