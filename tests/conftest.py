"""Shared test setup: small thread count (CI has 2 cores), the repo root on sys.path and the shared digits
folders. The end-to-end harness (in-process and subprocess runs of main.py) is ``harness.py`` beside this file."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Under pytest-xdist (``-n N``) the cores are shared among N workers: each worker, and every process it
# starts, computes on cores/N threads instead of oversubscribing the machine.
_WORKERS = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1') or 1)
_THREADS = max(1, min(2, os.cpu_count() or 1) // _WORKERS)
if _WORKERS > 1:
    os.environ['OMP_NUM_THREADS'] = str(_THREADS)

import torch  # noqa: E402

torch.set_num_threads(_THREADS)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


# ----------------------------------------------------------------------------- shared digits data
@pytest.fixture(scope='session')
def make_digits(tmp_path_factory):
    """``make_digits(size=32, train=None, val=None, drop_val=0)``: the embedded digits (scikit-learn's real
    8x8 scans as RGB PNGs, ImageNet folder layout) written once per session per argument set. Shared by
    every test that asks for the same set: copy it before changing files."""
    from harness import DigitsCache
    return DigitsCache(tmp_path_factory.mktemp)


@pytest.fixture(scope='session')
def startup_server(tmp_path_factory):
    """``harness.ForkServer`` that imported torch and timm only: ``startup_server.run(['-m', 'visualize',
    ...], env)`` is a fresh ``python -m visualize ...`` as far as this repository is concerned (its imports,
    the environment read at import, the entry point's error handling), without the 5 s of third-party
    imports per process."""
    from harness import THIRD_PARTY, ForkServer
    server = ForkServer(str(tmp_path_factory.mktemp('startup_server')), preload=THIRD_PARTY)
    yield server
    server.close()


@pytest.fixture(scope='session')
def fork_server(tmp_path_factory):
    """``harness.ForkServer``: ``python main.py`` processes forked from one interpreter that imported the
    entry point once (for tests that signal or kill a training process; ~5 s of start-up saved per process)."""
    from harness import ForkServer
    server = ForkServer(str(tmp_path_factory.mktemp('fork_server')))
    yield server
    server.close()


# the standard end-to-end set: 32 px, 300 train (30 per class) and 99 val images (an odd count, so two ranks
# get unequal shards)
DIGITS = dict(size=32, train=30, val=10, drop_val=1)


@pytest.fixture(scope='module')
def digits(request, make_digits) -> str:
    """The digits folders of this module: the sizes of its ``pytestmark = pytest.mark.digits(size=..., train=...,
    val=..., drop_val=...)`` (``make_digits``'s arguments; unset ones from ``DIGITS``), else ``DIGITS``. One
    folder per set per session, read only (copy it before changing files)."""
    marker = request.node.get_closest_marker('digits')
    return make_digits(**dict(DIGITS, **(marker.kwargs if marker else {})))
