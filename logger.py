"""Rank-aware logging for the entry points. Library modules log through ``logging.getLogger(__name__)``;
``create_logger`` attaches the handlers to the root logger once per run:

* rank 0: console (stdout, coloured) and ``<output>/log_rank0.txt`` at INFO;
* other ranks: console at WARNING only (their errors still show).

Line format as the official code: ``[time name] (file line): LEVEL message``.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

_FMT = '[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s'
_DATEFMT = '%Y-%m-%d %H:%M:%S'
_MARK = '_flatten_handler'


def _colour_fmt() -> str:
    try:
        from termcolor import colored
    except ImportError:
        return _FMT
    return (colored('[%(asctime)s %(name)s]', 'green') + colored(' (%(filename)s %(lineno)d)', 'yellow')
            + ': %(levelname)s %(message)s')


def remove_handlers() -> None:
    """Detach (and close) the handlers a previous ``create_logger`` call attached."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _MARK, False):
            root.removeHandler(h)
            h.close()


def create_logger(output_dir: Optional[str], dist_rank: int = 0, name: str = 'flatten') -> logging.Logger:
    """Configure console/file handlers for this process and return the logger ``name``."""
    remove_handlers()
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if dist_rank == 0 else logging.WARNING)
    console.setFormatter(logging.Formatter(_colour_fmt() if sys.stdout.isatty() else _FMT, _DATEFMT))
    console.addFilter(lambda record: not getattr(record, 'file_only', False))
    handlers = [console]
    if dist_rank == 0 and output_dir:
        file_handler = logging.FileHandler(os.path.join(output_dir, f'log_rank{dist_rank}.txt'), mode='a')
        file_handler.setLevel(logging.INFO)
        file_handler.setFormatter(logging.Formatter(_FMT, _DATEFMT))
        handlers.append(file_handler)
    for h in handlers:
        setattr(h, _MARK, True)
        root.addHandler(h)
    return logging.getLogger(name)


def log_to_file(message: str, level: int = logging.ERROR) -> None:
    """Write ``message`` to the run's log file only (nothing when no run has set up logging)."""
    root = logging.getLogger()
    if any(getattr(h, _MARK, False) for h in root.handlers):
        logging.getLogger('main').log(level, message, extra={'file_only': True})
