"""Rank-aware logging for the entry points. Library modules log through ``logging.getLogger(__name__)``;
``create_logger`` attaches the handlers to the root logger once per run:

* rank 0: console (stdout, coloured) and ``<output>/log_rank0.txt`` at INFO;
* other ranks: console at WARNING only (their errors still show).

Line format as the official code: ``[time name] (file line): LEVEL message``.

``MetricsWriter`` writes the run's machine-readable record, ``<output>/metrics.jsonl`` (one JSON object
per line: per epoch and per evaluation), and optionally TensorBoard event files (``--tensorboard``,
needs the ``tensorboard`` package; never imported otherwise). Only rank 0 creates one.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any, Dict, List, Optional

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


METRICS_FILE = 'metrics.jsonl'


def _json_value(v: Any) -> Any:
    """NaN/inf are not JSON: written as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """The records of a metrics.jsonl file (or of ``<path>/metrics.jsonl`` for a run folder); a torn last
    line (a crash while writing) is ignored."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class MetricsWriter:
    """Appends records to ``<output>/metrics.jsonl``: each record is one ``os.write`` of one complete line
    on a file opened with O_APPEND (atomic for a line of this size on a local file system), flushed to
    disk; a reader never sees half a record from a live run. ``truncate_after(epoch)`` drops the records
    of epochs after a resume point (written, then lost with an interrupted run), so that a resumed run
    leaves every epoch exactly once."""

    def __init__(self, output_dir: str, tensorboard: bool = False) -> None:
        self.path = os.path.join(output_dir, METRICS_FILE)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from errors import ConfigError
                raise ConfigError('--tensorboard needs the tensorboard package (pip install tensorboard); '
                                  'metrics.jsonl is written without it') from None
            self._tb = SummaryWriter(os.path.join(output_dir, 'tensorboard'))

    def truncate_after(self, epoch: int) -> None:
        """Keep only epoch records with ``epoch`` <= the given count of completed epochs (and all
        non-epoch records); rewritten atomically (temp file + rename)."""
        if not os.path.exists(self.path):
            return
        records = read_metrics(self.path)
        keep = [r for r in records if not (r.get('kind') == 'epoch' and r.get('epoch', 0) > epoch)]
        if len(keep) == len(records) and os.path.getsize(self.path) == sum(
                len(json.dumps(r, sort_keys=True)) + 1 for r in records):
            return
        tmp = self.path + '.tmp'
        with open(tmp, 'w') as f:
            for r in keep:
                f.write(json.dumps(r, sort_keys=True) + '\n')
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def write(self, record: Dict[str, Any]) -> None:
        record = {k: _json_value(v) for k, v in record.items()}
        line = (json.dumps(record, sort_keys=True) + '\n').encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if self._tb is not None and record.get('kind') == 'epoch':
            step = record['epoch']
            for key, value in record.items():
                if key not in ('kind', 'epoch', 'step') and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
