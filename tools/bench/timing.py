"""The one timing helper of the benchmarks (:func:`time_calls`), peak memory, and the inference / training-step
measures of one model (model-agnostic: the official worker imports this too, so nothing of the project here)."""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Dict, Sequence

import torch
import torch.nn as nn

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA; nothing elsewhere)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA allocator stats, or the process's VmHWM on Linux)."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak since :func:`reset_peak_memory`: CUDA max allocated, or the peak RSS of this process (MiB)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> Dict[str, float]:
    """Median wall and process-CPU seconds of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    wall, cpu = [], []
    for _ in range(repeats):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {'wall_s': statistics.median(wall), 'cpu_s': statistics.median(cpu), 'wall_all_s': wall}


def _autocast(device: torch.device, dtype: str):
    if dtype == 'float32':
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def make_input(batch: int, img_size: int, device: torch.device, channels_last: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size, generator=g).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _per_image(step: Callable[[], Any], x: torch.Tensor, warmup: int, repeats: int) -> Dict[str, float]:
    """:func:`time_calls` of ``step`` on the batch ``x`` after a first call outside the peak window (lazy init,
    compile), with its peak memory, images/s and CPU seconds per image."""
    step()
    reset_peak_memory(x.device)
    res = time_calls(step, x.device, warmup, repeats)
    res['peak_mb'] = peak_memory_mb(x.device)
    res['img_s'] = x.shape[0] / res['wall_s']
    res['cpu_s_per_img'] = res['cpu_s'] / x.shape[0]
    return res


def measure_inference(model: nn.Module, x: torch.Tensor, dtype: str, warmup: int, repeats: int) -> Dict[str, float]:
    device = x.device
    model.eval()

    def step():
        # no_grad rather than inference_mode: models that cache tensors (e.g. index plans of a fast path) must
        # stay usable for the training measure that follows
        with torch.no_grad(), _autocast(device, dtype):
            model(x)

    return _per_image(step, x, warmup, repeats)


def measure_train(model: nn.Module, x: torch.Tensor, num_classes: int, dtype: str, warmup: int,
                  repeats: int, fused: bool = False) -> Dict[str, float]:
    """Forward + cross-entropy + backward + AdamW step; float16 uses a GradScaler. ``fused``: the fused AdamW
    kernel (what our optimizer.py builds where the device has one), else torch's default implementation."""
    device = x.device
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, **({'fused': True} if fused else {}))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == 'float16')
    target = torch.randint(0, num_classes, (x.shape[0],), generator=torch.Generator().manual_seed(0)).to(device)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss = loss_fn(model(x), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return _per_image(step, x, warmup, repeats)


def measure(model: nn.Module, opts: Dict[str, Any], modes: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """The measures of one model on one side; ``opts``: device, batch, img_size, dtype, channels_last,
    compile, warmup, repeats, num_classes, fused_optimizer."""
    device = torch.device(opts['device'])
    model = model.to(device)
    if opts['channels_last']:
        model = model.to(memory_format=torch.channels_last)
    run = torch.compile(model) if opts['compile'] else model
    x = make_input(opts['batch'], opts['img_size'], device, opts['channels_last'])
    out = {}
    if 'infer' in modes:
        out['infer'] = measure_inference(run, x, opts['dtype'], opts['warmup'], opts['repeats'])
    if 'train' in modes:
        out['train'] = measure_train(run, x, opts['num_classes'], opts['dtype'], opts['warmup'], opts['repeats'],
                                     opts['fused_optimizer'])
    return out
