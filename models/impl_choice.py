"""A process-wide choice among implementations of one function (set by an environment variable, a setter,
or a context manager): focused linear attention's 'reference' / 'fast' / 'triton', neighbourhood
attention's 'torch' / 'natten'. A bad choice is a :class:`ConfigError` (one line naming the fix), raised
when it is made: at import for the environment variable, else by :meth:`ImplChoice.set`."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional, Sequence

from errors import ConfigError


class ImplChoice:
    """``what``: how errors name the choice; ``env``: the variable read once at import (default ``default``);
    ``check(name)``: called before a name is taken, the environment's too (e.g. to verify an optional
    package); it raises ConfigError."""

    def __init__(self, what: str, choices: Sequence[str], env: str, default: str,
                 check: Optional[Callable[[str], None]] = None) -> None:
        self.what, self.choices, self.check = what, tuple(choices), check
        name = os.environ.get(env, default)
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
