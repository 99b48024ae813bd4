"""Every error class of the project, in one place, under one base class, :class:`ProjectError`.

The errors a user can fix (:class:`UserError` and its subclasses) are reported as one line
(``ERROR: <message>``, exit 2) by every entry point and tool, never as a traceback; the subclasses say which
layer found the problem. :class:`Preempted` is the one that is not a user's: a run stopped by a signal once
its resumable checkpoint is written. This module imports nothing from the project, so the model library, the
experiment layer, ``visualize`` and the tools can all use it.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

ERROR_EXIT_CODE = 2


class ProjectError(Exception):
    """The base class of every error this project raises."""


class UserError(ProjectError):
    """A problem the user can fix (a setting, a file, the data): its message is one line that names the
    problem and the fix."""


class ConfigError(UserError, ValueError):
    """A configuration problem, reported as one line that names the key and the fix."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


class DataError(UserError, RuntimeError):
    """A dataset that cannot be read (missing folder, unreadable image, no classes)."""


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the last good checkpoint is kept."""


class InputError(UserError, ValueError):
    """``visualize``: an unreadable image or a malformed option value."""


class LayoutError(UserError, ValueError):
    """``visualize``: the block's token grouping cannot be mapped back to image positions."""


class SelectionError(UserError, ValueError):
    """``visualize``: a block/module selection that does not exist; the message lists the valid ones."""


class Preempted(ProjectError):
    """Raised after a SIGTERM/SIGINT once the resumable checkpoint is written (exit code 143)."""


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (errors re-raised from DataLoader workers carry the worker's
    traceback: keep its last line, without the exception's module path)."""
    import re
    text = str(error).strip()
    if 'Traceback (most recent call last)' in text:
        text = re.sub(r'^[\w.]*Error:\s*', '', text.splitlines()[-1].strip())
    return ' '.join(text.split()) or type(error).__name__


def report(error: BaseException, log: Optional[Callable[[str], None]] = None) -> int:
    """Print ``ERROR: <one line>`` on stderr (and to ``log`` when given); returns the exit code 2."""
    message = f'ERROR: {one_line(error)}'
    if log is not None:
        log(message)
    print(message, file=sys.stderr, flush=True)
    return ERROR_EXIT_CODE


def cli(main: Callable[[], Optional[int]]) -> int:
    """Run a tool's ``main`` and turn a :class:`UserError` (raised anywhere, including while importing the
    model library) into one line and exit 2: ``sys.exit(errors.cli(main))``."""
    try:
        return main() or 0
    except UserError as e:
        return report(e)
