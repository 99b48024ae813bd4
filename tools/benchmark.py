"""Speed and memory benchmark (``--help`` says what it measures and how): ``python tools/benchmark.py ...`` or
``python -m tools.benchmark ...``. The modes live in ``tools/bench/``, one module each."""
from __future__ import annotations

import sys

if __name__ == '__main__' and not __package__:   # run as a file: tools/_root.py puts the repository root on the path
    import _root  # noqa: F401

from tools.bench.cli import main, parse_args  # noqa: E402
from tools.bench.official import WORKER_FLAG, official_worker  # noqa: E402

__all__ = ['main', 'parse_args', 'run']


def run(argv=None) -> int:
    """The command line: run ``main``, a user's error as one line on stderr and exit status 2."""
    import errors
    return errors.cli(lambda: main(argv) and 0)


if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == WORKER_FLAG:
        official_worker(sys.argv[2:])
    else:
        sys.exit(run())
