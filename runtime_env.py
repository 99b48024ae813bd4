"""Process settings that our entry points (main.py, main_ema.py, tools/benchmark.py) make before torch is imported.

torch reads these from the environment once, at its first CPU allocation, so they must be set before
``import torch``; this module imports nothing heavy. A value the user exported is never overridden.

- ``THP_MEM_ALLOC_ENABLE=1``: PyTorch's CPU allocator backs every tensor of 2 MiB or more with transparent
  huge pages (``madvise(MADV_HUGEPAGE)``). A CPU training step frees and re-allocates its large activations
  every step, and with 4 KiB pages each fresh one page-faults page by page: about 100-150 thousand faults per
  FLatten-Swin-T step at batch 8, 4-7 thousand with huge pages, and 10-20% of the step's time on a 2-core
  machine (BENCHMARKS.md). Values are unchanged; GPU work is unaffected; where the kernel's THP mode is
  ``never`` it does nothing. Export ``THP_MEM_ALLOC_ENABLE=0`` to turn it off.
"""
from __future__ import annotations

import os
from typing import Dict, MutableMapping, Optional

CPU_HUGE_PAGES = 'THP_MEM_ALLOC_ENABLE'
DEFAULTS: Dict[str, str] = {CPU_HUGE_PAGES: '1'}
THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'


def apply_defaults(environ: Optional[MutableMapping[str, str]] = None) -> Dict[str, Optional[str]]:
    """Set each default the user has not set. Returns the user's own values before this call (None where
    unset), so that a caller can hand a child process the environment it would have had without us."""
    environ = os.environ if environ is None else environ
    before = {key: environ.get(key) for key in DEFAULTS}
    for key, value in DEFAULTS.items():
        environ.setdefault(key, value)
    return before


def kernel_thp_mode() -> Optional[str]:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), or None where unknown."""
    try:
        with open(THP_MODE_FILE) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find('['), text.find(']')
    return text[start + 1:end] if 0 <= start < end else None
