"""A process-wide choice among implementations of one function (set by an environment variable, a setter,
or a context manager): focused linear attention's 'reference' / 'fast' / 'triton', neighbourhood
attention's 'torch' / 'natten'."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional, Sequence


class ImplChoice:
    """``what``: how errors name the choice; ``env``: the variable read once at import (default ``default``);
    ``check(name)``: called by :meth:`set` before a name is taken (e.g. to verify an optional package)."""

    def __init__(self, what: str, choices: Sequence[str], env: str, default: str,
                 check: Optional[Callable[[str], None]] = None) -> None:
        self.what, self.choices, self.check = what, tuple(choices), check
        name = os.environ.get(env, default)
        if name not in self.choices:
            raise ValueError(f'{env}={name!r} is unknown; use one of {", ".join(self.choices)}')
        self.name = name

    def set(self, name: str) -> None:
        if name not in self.choices:
            raise ValueError(f'{self.what} {name!r} is unknown; use one of {", ".join(self.choices)}')
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
