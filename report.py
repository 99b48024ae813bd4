"""What a run tells its user besides the step logs: the model summary (a parameter/FLOPs table; the full
module tree goes to the log file only) and the end-of-run summary (printed and written to
``<output>/summary.json`` and ``summary.txt``).

Rank 0 calls these; nothing here synchronises ranks.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from logger import METRICS_FILE, read_metrics

logger = logging.getLogger(__name__)

SUMMARY_JSON, SUMMARY_TXT = 'summary.json', 'summary.txt'


# ----------------------------------------------------------------------------- model summary
def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_summary(model: nn.Module, img_size: int, in_chans: int = 3, flops: bool = True) -> str:
    """A table of the model's top-level parts (parameters each), the totals and the FLOPs (multiply-adds,
    the papers' convention) of one ``img_size`` image."""
    rows = [(name, type(child).__name__, _count(child)) for name, child in model.named_children()]
    total = _count(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    width = max([len(r[0]) + len(r[1]) + 3 for r in rows] + [24])
    lines = [f'model {type(model).__name__}', f'  {"part".ljust(width)} {"params":>12}']
    lines += [f'  {f"{n} ({t})".ljust(width)} {p:>12,}' for n, t, p in rows]
    lines.append(f'  {"total".ljust(width)} {total:>12,}  ({total / 1e6:.2f} M, {trainable:,} trainable)')
    if flops:
        lines.append(f'  {"FLOPs".ljust(width)} {_flops_text(model, img_size, in_chans):>12}  '
                     f'(one {img_size}x{img_size} image, multiply-adds)')
    return '\n'.join(lines)


def count_flops(model: nn.Module, img_size: int, in_chans: int = 3) -> int:
    """The project's one FLOP count: fvcore multiply-adds (the papers' convention) of one forward pass of a
    (1, in_chans, img_size, img_size) input on the model's own device, in eval mode: plain
    ``FlopCountAnalysis`` with the one handle it lacks, fused attention as its two matmuls
    (``models.flops.FVCORE_HANDLES``); the models' fast paths run plain operators while traced."""
    import warnings
    with warnings.catch_warnings():          # fvcore's import uses the deprecated torch.jit.script
        warnings.filterwarnings('ignore', category=FutureWarning)
        from fvcore.nn import FlopCountAnalysis
    from models.flops import FVCORE_HANDLES

    was_training = model.training
    param = next(model.parameters(), None)
    x = torch.zeros(1, in_chans, img_size, img_size, device=param.device if param is not None else None)
    try:
        analysis = FlopCountAnalysis(model.eval(), x).set_op_handle(**FVCORE_HANDLES)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings('none')
        with torch.no_grad():
            return int(analysis.total())
    finally:
        model.train(was_training)


def _flops_text(model: nn.Module, img_size: int, in_chans: int) -> str:
    """:func:`count_flops` as text (G or M multiply-adds), or 'n/a' where it cannot count."""
    try:
        n = count_flops(model, img_size, in_chans)
    except Exception as e:            # a summary must never stop a run  # noqa: BLE001
        logger.debug('FLOP count failed: %s', e)
        return 'n/a'
    return f'{n / 1e9:.2f} G' if n >= 1e8 else f'{n / 1e6:.2f} M'


def log_model(model: nn.Module, img_size: int, in_chans: int = 3) -> None:
    """The full module tree to the log file only; the summary table to console and log."""
    logger.info(str(model), extra={'file_only': True})
    logger.info('\n' + model_summary(model, img_size, in_chans))


# ----------------------------------------------------------------------------- end-of-run summary
def run_summary(output_dir: str, seconds: float, skipped_steps: int, bad_images: int,
                bad_val_images: int = 0) -> Dict[str, Any]:
    """The summary of the training run in ``output_dir``, from its metrics.jsonl (all epochs, including
    those of earlier sessions of a resumed run) and the checkpoints on disk. ``bad_images``: unreadable
    training images skipped this session; ``bad_val_images``: unreadable validation images skipped (by the
    last validation); ``skipped_images`` is their sum."""
    epochs = [r for r in read_metrics(os.path.join(output_dir, METRICS_FILE)) if r.get('kind') == 'epoch'] \
        if os.path.exists(os.path.join(output_dir, METRICS_FILE)) else []
    summary: Dict[str, Any] = {'output': output_dir, 'epochs': len(epochs), 'session_seconds': round(seconds, 1),
                               'skipped_steps': skipped_steps, 'skipped_images': bad_images + bad_val_images,
                               'skipped_train_images': bad_images, 'skipped_val_images': bad_val_images}

    def best(key: str) -> Optional[Dict[str, Any]]:
        scored = [r for r in epochs if isinstance(r.get(key), (int, float))]
        if not scored:
            return None
        top = max(scored, key=lambda r: (r[key], r['epoch']))
        return {'acc1': top[key], 'epoch': top['epoch']}

    summary['best'], summary['best_ema'] = best('val_acc1'), best('ema_acc1')
    if epochs:
        summary['final_acc1'] = epochs[-1].get('val_acc1')
        train_s = sum(r.get('epoch_time_s') or 0 for r in epochs)
        summary['train_seconds'] = round(train_s, 1)
        speeds = [r['images_per_s'] for r in epochs if isinstance(r.get('images_per_s'), (int, float))]
        summary['images_per_s'] = round(sum(speeds) / len(speeds), 1) if speeds else None
    summary['checkpoints'] = sorted(os.path.basename(p) for p in glob.glob(os.path.join(output_dir, '*.pth')))
    return summary


def summary_text(s: Dict[str, Any]) -> str:
    def acc(b: Optional[Dict[str, Any]]) -> str:
        return f"{b['acc1']:.2f}% at epoch {b['epoch']}" if b else 'n/a'
    lines = ['run summary',
             f"  best Acc@1       {acc(s.get('best'))}"]
    if s.get('best_ema'):
        lines.append(f"  best EMA Acc@1   {acc(s['best_ema'])}")
    if s.get('final_acc1') is not None:
        lines.append(f"  final Acc@1      {s['final_acc1']:.2f}% after {s['epochs']} epochs")
    if s.get('train_seconds') is not None:
        speed = f", {s['images_per_s']:.1f} images/s" if s.get('images_per_s') else ''
        lines.append(f"  training time    {s['train_seconds']:.0f} s over all sessions{speed}")
    split = (f" ({s['skipped_train_images']} training, {s['skipped_val_images']} validation)"
             if s.get('skipped_val_images') else '')
    lines.append(f"  skipped          {s['skipped_steps']} non-finite steps, {s['skipped_images']} unreadable "
                 f"images{split} (this session, all ranks)")
    lines.append(f"  checkpoints      {', '.join(s['checkpoints']) or 'none'} in {s['output']}")
    return '\n'.join(lines)


def write_summary(output_dir: str, seconds: float, skipped_steps: int, bad_images: int,
                  bad_val_images: int = 0) -> Dict[str, Any]:
    """Build, log and write (``summary.json``, ``summary.txt``) the end-of-run summary; returns it."""
    s = run_summary(output_dir, seconds, skipped_steps, bad_images, bad_val_images)
    text = summary_text(s)
    logger.info('\n' + text)
    with open(os.path.join(output_dir, SUMMARY_JSON), 'w') as f:
        json.dump(s, f, indent=2, sort_keys=True)
    with open(os.path.join(output_dir, SUMMARY_TXT), 'w') as f:
        f.write(text + '\n')
    return s
