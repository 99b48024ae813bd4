"""A process-wide choice among implementations of one function (set by an environment variable, a setter,
or a context manager): focused linear attention's 'reference' / 'fast' / 'triton', neighbourhood
attention's 'torch' / 'natten'. A bad choice is a :class:`ConfigError` (one line naming the fix), raised
when it is made: at import for the environment variable, else by :meth:`ImplChoice.set`."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from errors import ConfigError


def operators_observed(under_compile: bool = True) -> bool:
    """True while a tool records or counts operators instead of only computing them: ``torch.jit.trace``
    (fvcore, the TorchScript-based ONNX exporter), ``torch.fx`` symbolic tracing, torch.export (and the
    ONNX exporter built on it), a dispatch mode (``torch.utils.flop_counter.FlopCounterMode``, fake
    tensors), and torch.compile unless ``under_compile=False``. A fast path that hides its operators inside
    an autograd Function then runs its plain-operator form (the same maths), so that such tools see, count
    and export the true operators."""
    if torch.compiler.is_compiling():
        return under_compile or torch.compiler.is_exporting()
    return torch.jit.is_tracing() or is_fx_symbolic_tracing() or is_in_torch_dispatch_mode()


class ImplChoice:
    """``what``: how errors name the choice; ``env``: the variable read once at import (unset or empty:
    ``default``; surrounding blanks ignored); ``check(name)``: called before a name is taken, the
    environment's too (e.g. to verify an optional package); it raises ConfigError."""

    def __init__(self, what: str, choices: Sequence[str], env: str, default: str,
                 check: Optional[Callable[[str], None]] = None) -> None:
        self.what, self.choices, self.check = what, tuple(choices), check
        name = os.environ.get(env, '').strip() or default
        if name not in self.choices:
            raise ConfigError(f'{env}={name!r} is unknown; use one of {", ".join(self.choices)}')
        if check is not None and name != default:
            check(name)
        self.name = name

    def set(self, name: str) -> None:
        if name not in self.choices:
            raise ConfigError(f'{self.what} {name!r} is unknown; use one of {", ".join(self.choices)}')
        if self.check is not None:
            self.check(name)
        self.name = name

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        previous = self.name
        self.set(name)
        try:
            yield
        finally:
            self.name = previous


# ----------------------------------------------------------------------------- op micro-benchmarks
Inputs = Tuple[torch.Tensor, ...]


@dataclass
class OpBenchmark:
    """The micro-benchmark of one function with several implementations, declared beside it and run by
    ``tools/benchmark.py --op NAME``: ``cases(batch, device)`` gives (label, inputs) pairs at the shapes a
    model uses; ``impls()`` gives name -> function(*inputs) for the implementations usable here, and notes
    on the ones that are not (e.g. an optional package missing)."""
    what: str
    cases: Callable[[int, torch.device], List[Tuple[Dict[str, Any], Inputs]]]
    impls: Callable[[], Tuple[Dict[str, Callable[..., torch.Tensor]], List[str]]]


OP_BENCHMARKS: Dict[str, OpBenchmark] = {}


def register_op_benchmark(name: str, benchmark: OpBenchmark) -> None:
    OP_BENCHMARKS[name] = benchmark
