"""What a benchmark result is read against: the device's dense peak TFLOP/s and the environment of the run
(device, torch, threads, load, date, git commit)."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Any, Dict, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Dense peak TFLOP/s (no sparsity) by device-name substring: {dtype: peak}. Vendor datasheet figures.
DEVICE_PEAKS = {
    'H200': {'float32': 67.0, 'tf32': 494.7, 'bfloat16': 989.4, 'float16': 989.4},
    'H100 SXM': {'float32': 67.0, 'tf32': 494.7, 'bfloat16': 989.4, 'float16': 989.4},
    'H100 PCIe': {'float32': 51.2, 'tf32': 378.0, 'bfloat16': 756.0, 'float16': 756.0},
    'H100': {'float32': 67.0, 'tf32': 494.7, 'bfloat16': 989.4, 'float16': 989.4},
    'A100': {'float32': 19.5, 'tf32': 156.0, 'bfloat16': 312.0, 'float16': 312.0},
    'A800': {'float32': 19.5, 'tf32': 156.0, 'bfloat16': 312.0, 'float16': 312.0},
    'L40S': {'float32': 91.6, 'tf32': 183.0, 'bfloat16': 362.0, 'float16': 362.0},
    'RTX 4090': {'float32': 82.6, 'tf32': 82.6, 'bfloat16': 165.2, 'float16': 165.2},
    'V100': {'float32': 15.7, 'tf32': 15.7, 'bfloat16': 0.0, 'float16': 125.0},
}


def device_peak_tflops(device: torch.device, dtype: str) -> Optional[float]:
    """Dense peak of the device for the math the dtype selects (float32 -> TF32 when it is allowed)."""
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in DEVICE_PEAKS.items():
        if key in name:
            if dtype == 'float32' and torch.backends.cuda.matmul.allow_tf32:
                return peaks['tf32']
            return peaks[dtype] or None
    return None


def environment(device: torch.device) -> Dict[str, Any]:
    """Device, torch, threads, load average, date, git commit of this checkout and the attention implementation."""
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else (platform.processor() or
                                                                             platform.machine())
    if device.type == 'cpu':
        try:
            with open('/proc/cpuinfo') as f:
                name = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
        except (OSError, StopIteration):
            pass
    from models.focused_attention import get_attention_impl
    return {'device': str(device), 'device_name': name, 'torch': torch.__version__,
            'threads': torch.get_num_threads(), 'cpu_count': os.cpu_count(),
            'loadavg_start': list(os.getloadavg()) if hasattr(os, 'getloadavg') else None,
            'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'git_commit': commit, 'git_dirty': dirty, 'python': platform.python_version(),
            'attention_impl': get_attention_impl()}
