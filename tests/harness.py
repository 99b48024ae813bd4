"""The end-to-end harness of the suite: run the trainer's entry point on a config + options and read what
the run leaves behind (its folder, metrics.jsonl, summary.json, checkpoints, log).

* ``run_main(argv)`` runs ``main.main(argv)`` in this process (no interpreter start-up, ~5 s saved per
  run): exit code, console output (stdout/stderr, with Python warnings shown as a fresh interpreter
  shows them), the config the run used and the trainer's ``RunResult`` (models, accuracies).
* ``launch(argv)`` runs ``python main.py ...`` (or any command) in a subprocess with a wall-clock limit:
  only for checks whose point is the process boundary (signals, kill -9, exit of a process with live
  workers, torchrun, start-up imports).
* ``Watched`` is a process whose output is read line by line while it runs (to signal it at a step).
* ``ForkServer`` forks ``python main.py ARGV`` processes from one interpreter that imported the entry point
  once: real processes (own session, signals, kill -9, exit codes) without the start-up; for the tests that
  interrupt or kill training processes. Built with ``preload=THIRD_PARTY`` (torch and timm only) it runs
  any ``python COMMAND`` whose point is this repository's start-up (imports, environment read at import,
  an entry point's one-line errors): the ``startup_server`` fixture. A process exiting with live
  DataLoader workers and torchrun use real ``launch``/``Watched``. The server program is ``fork_server.py``.
* ``run_ranks(server, argv)`` runs one multi-rank gloo job as forked ranks with torchrun's environment (for
  multi-rank checks whose point is not the launcher).

The fixtures built on these (the shared digits folders) are in ``conftest.py``.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CFG = os.path.join(ROOT, 'cfgs', 'demo', 'flatten_swin_digits.yaml')
RUN_TIMEOUT = 180                        # any single tiny subprocess run; a hang fails, never blocks CI
# Tests that run several training processes at once (torchrun, ranks): one pytest-xdist worker runs them all
# (``make test`` uses --dist loadgroup), so two multi-rank jobs never share the two cores.
MULTI_RANK = pytest.mark.xdist_group('multi_rank')


# ----------------------------------------------------------------------------- what a run leaves behind
def read_records(folder: str, kind: Optional[str] = 'epoch') -> List[Dict[str, Any]]:
    """The records of ``folder``/metrics.jsonl (parsed with json, not with the logger's reader), of one
    ``kind`` ('epoch', 'eval'; None: all)."""
    with open(os.path.join(folder, 'metrics.jsonl')) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [r for r in recs if kind is None or r.get('kind') == kind]


def run_folder(output: str, name: str, tag: str = 'default') -> str:
    """``<output>/<MODEL.NAME>/<TAG>``: where a training run writes its files."""
    return os.path.join(output, name, tag)


def checkpoint_names(folder: str) -> List[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, '*.pth')))


@dataclass
class Run:
    """One run of the entry point: exit code, console output and (in-process) its config and result."""
    code: int
    out: str = ''
    err: str = ''
    folder: Optional[str] = None              # the run folder (OUTPUT); None if the run never got a config
    config: Any = None                        # the frozen config main.py built (in-process runs)
    result: Any = None                        # the trainer's RunResult (in-process runs that returned)

    @property
    def console(self) -> str:
        return self.out + self.err

    @property
    def metrics(self) -> List[Dict[str, Any]]:
        """The per-epoch records of metrics.jsonl."""
        return read_records(self.folder)

    @property
    def summary(self) -> Dict[str, Any]:
        with open(os.path.join(self.folder, 'summary.json')) as f:
            return json.load(f)

    @property
    def log(self) -> str:
        with open(os.path.join(self.folder, 'log_rank0.txt')) as f:
            return f.read()

    @property
    def checkpoints(self) -> List[str]:
        return checkpoint_names(self.folder)

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def checkpoint(self, name: Optional[str] = None) -> Dict[str, Any]:
        """A checkpoint of the run folder (default: the last epoch's), loaded weights-only."""
        if name is None:
            epochs = [n for n in self.checkpoints if n.startswith('ckpt_epoch_')]
            name = max(epochs, key=lambda n: int(n[len('ckpt_epoch_'):-len('.pth')]))
        return torch.load(self.path(name), weights_only=True)

    def error_line(self) -> str:
        """The one ``ERROR: ...`` line a clear failure prints on stderr (asserted: exit 2, nothing else)."""
        lines = [ln for ln in self.err.strip().splitlines() if ln.strip()]
        assert self.code == 2, f'exit code {self.code}:\n{self.console[-3000:]}'
        assert len(lines) == 1 and lines[0].startswith('ERROR: '), f'expected one ERROR line, got:\n{self.err[-3000:]}'
        return lines[0]

    def ok(self) -> 'Run':
        assert self.code == 0, f'exit code {self.code}:\n{self.console[-3000:]}'
        return self


# ----------------------------------------------------------------------------- in-process runs
def _run_entries() -> list:
    """The modules whose ``run(config)`` main.py may call (run setup lives in runner.py; engine.py had it)."""
    import importlib
    found = []
    for name in ('runner', 'engine'):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if callable(getattr(module, 'run', None)):
            found.append(module)
    return found


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """Run with ``n`` intra-op threads (as a subprocess started with OMP_NUM_THREADS=n), then restore."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def fresh_warnings() -> Iterator[None]:
    """Python warnings printed on sys.stderr once per place, as in a new interpreter (pytest would otherwise
    record them and a warning seen by an earlier test would not show)."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter('default')
        warnings.showwarning = warnings._showwarning_orig          # writes to the (redirected) sys.stderr
        yield


@contextlib.contextmanager
def environ(**env: Optional[str]) -> Iterator[None]:
    """Temporarily set (a value) or remove (None) environment variables."""
    saved = {k: os.environ.get(k) for k in env}
    try:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_main(argv: Sequence[str], threads: Optional[int] = None, ema: bool = False) -> Run:
    """``main.main(argv)`` in this process: the exit code, stdout/stderr, the config and the ``RunResult``.
    ``threads``: intra-op threads for this run (1 to match a subprocess run with OMP_NUM_THREADS=1 bit for
    bit). Clear failures come back as exit code 2 with their ERROR line in ``err``; bugs propagate."""
    import main as entry
    from logger import remove_handlers

    seen: Dict[str, Any] = {}

    def recording(real):
        def run(config):
            seen.setdefault('config', config)
            result = real(config)
            seen.setdefault('result', result)
            return result
        return run

    targets = [(module, module.run) for module in _run_entries()]
    out, err = io.StringIO(), io.StringIO()
    for module, real in targets:
        module.run = recording(real)
    try:
        with torch_threads(threads), fresh_warnings(), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            try:
                code = entry.main(list(argv), ema=ema)
            except SystemExit as e:                    # argparse errors
                code = e.code if isinstance(e.code, int) else 2
    finally:
        for module, real in targets:
            module.run = real
        remove_handlers()                              # the console handler wrote into ``out``
    config = seen.get('config')
    return Run(code=code, out=out.getvalue(), err=err.getvalue(), config=config,
               folder=config.OUTPUT if config is not None else None, result=seen.get('result'))


def train_args(cfg: str, data: str, output: str, *flags: str, tag: Optional[str] = None,
               opts: Sequence[str] = ()) -> List[str]:
    """main.py's command line: ``--cfg --data-path --output [--tag] --device cpu FLAGS [--opts OPTS]``."""
    argv = ['--cfg', cfg, '--data-path', data, '--output', output, *(['--tag', tag] if tag else []),
            '--device', 'cpu', *flags]
    return argv + (['--opts', *opts] if opts else [])


# ----------------------------------------------------------------------------- subprocess runs
def subprocess_env(extra: Optional[dict] = None) -> dict:
    """One thread per process, unbuffered output, this repository importable, no inherited rank variables."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1',
               PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(k, None)
    env.update(extra or {})
    return env


def descendants(pid: int) -> List[int]:
    """All processes below ``pid`` (Linux /proc; empty elsewhere)."""
    parent = {}
    for entry in os.listdir('/proc') if os.path.isdir('/proc') else []:
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent[int(entry)] = int(open(f'/proc/{entry}/stat').read().rsplit(')', 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``, everything below it (torchrun starts its ranks in their own sessions) and its group."""
    for pid in [*descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def launch(cmd: Sequence[str], timeout: float = RUN_TIMEOUT, env: Optional[dict] = None,
           folder: Optional[str] = None) -> Run:
    """Run ``cmd`` (a full command line; see ``main_cmd``) to completion in its own session. On timeout the
    whole process tree is killed and the test fails with the last output (a hang is a failure)."""
    import pytest
    proc = subprocess.Popen(list(cmd), cwd=ROOT, env=subprocess_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate()
        pytest.fail(f'no exit within {timeout} s (hang):\n{out[-2000:]}\n{err[-2000:]}')
    return Run(code=proc.returncode, out=out, err=err, folder=folder)


def main_cmd(argv: Sequence[str], entry: str = 'main.py', prefix: Sequence[str] = ()) -> List[str]:
    """``python [PREFIX...] <repo>/ENTRY ARGV...`` (PREFIX: e.g. a launcher script that patches, then runs ENTRY)."""
    return [sys.executable, *prefix, os.path.join(ROOT, entry), *argv]


class Watched:
    """A process (own session) whose merged output is read by a thread, so a test can react to log lines:
    ``Watched(cmd)`` starts ``cmd`` with Popen; ``Watched.forked(server, argv)`` is ``python main.py ARGV``
    forked by a ``ForkServer``."""

    def __init__(self, cmd: Optional[Sequence[str]], env: Optional[dict] = None) -> None:
        self.lines: List[str] = []
        self.err_lines: List[str] = []             # stderr, when read apart from stdout
        self._q: queue.Queue = queue.Queue()
        if cmd is not None:
            self.proc = subprocess.Popen(list(cmd), cwd=ROOT, env=subprocess_env(env), stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
            threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True).start()

    @classmethod
    def forked(cls, server: 'ForkServer', argv: Sequence[str], env: Optional[dict] = None,
               separate_stderr: bool = False, command: Optional[Sequence[str]] = None) -> 'Watched':
        """``python main.py ARGV`` (or ``python COMMAND...``) forked by ``server``; with ``separate_stderr`` the
        lines waited for are stdout's and stderr is collected in ``err``."""
        w = cls(None)
        w.proc, out, err = server.spawn(argv, env, separate_stderr, command=command)
        threading.Thread(target=lambda: w._pump(open(out)), daemon=True).start()
        if err:
            w._err_done = threading.Event()
            threading.Thread(target=w._collect_err, args=(err,), daemon=True).start()
        return w

    def _collect_err(self, path: str) -> None:
        with open(path) as f:
            for line in f:
                self.err_lines.append(line)
        self._err_done.set()

    @property
    def err(self) -> str:
        """Stderr (``separate_stderr``), complete once the process has ended and ``finish`` returned."""
        done = getattr(self, '_err_done', None)
        if done is not None:
            done.wait(timeout=10)
        return ''.join(self.err_lines)

    def _pump(self, stream) -> None:
        with stream:
            for line in stream:
                self._q.put(line)
        self._q.put(None)

    def wait_for(self, predicate, timeout: float = RUN_TIMEOUT) -> Optional[str]:
        """The first new line satisfying ``predicate``; None if the process ended first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self._q.get(timeout=max(0.01, deadline - time.time()))
            except queue.Empty:
                break
            if line is None:
                return None
            self.lines.append(line)
            if predicate(line):
                return line
        self.kill()
        raise AssertionError(f'timed out waiting for a log line; last output:\n{"".join(self.lines[-20:])}')

    def finish(self, timeout: float = RUN_TIMEOUT) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f'process did not exit within {timeout}s:\n{"".join(self.lines[-20:])}')
        while True:                                  # drain what is left
            try:
                line = self._q.get(timeout=5)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    @property
    def output(self) -> str:
        return ''.join(self.lines)


def run_ranks(server: 'ForkServer', argv: Sequence[str] = (), world: int = 2, env: Optional[dict] = None,
              command: Optional[Sequence[str]] = None, timeout: float = RUN_TIMEOUT) -> List[Run]:
    """One ``world``-process gloo job without a launcher: ``python main.py ARGV`` (or ``python COMMAND...``)
    forked by ``server`` once per rank with the variables torchrun gives its workers (RANK, LOCAL_RANK,
    WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT), to the end of every rank: each rank's exit code and merged
    output. For multi-rank checks where torchrun's agent is not the point (its start-up costs three
    interpreters)."""
    common = dict(env or {}, MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
                  LOCAL_WORLD_SIZE=str(world))
    ranks = [Watched.forked(server, argv, dict(common, RANK=str(r), LOCAL_RANK=str(r)), command=command)
             for r in range(world)]
    try:
        codes = [w.finish(timeout) for w in ranks]
    finally:
        for w in ranks:
            w.kill()
    return [Run(code=c, out=w.output) for c, w in zip(codes, ranks)]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- digits
class DigitsCache:
    """The embedded digits written once per (size, train/val per class, minus) per session; shared, so a test
    that changes files works on a ``copy``."""

    def __init__(self, make_dir) -> None:
        self._make_dir = make_dir
        self._made: Dict[tuple, str] = {}

    def __call__(self, size: int = 32, train: Optional[int] = None, val: Optional[int] = None,
                 drop_val: int = 0) -> str:
        """Root of ``train``/``val`` folders: at most ``train`` / ``val`` images per class (None: all), the last
        ``drop_val`` files of val/9 removed (an odd val count: unequal shards on two ranks)."""
        key = (size, train, val, drop_val)
        if key not in self._made:
            from data.digits import write_digits
            root = str(self._make_dir(f'digits{size}_{train}_{val}_{drop_val}'))
            write_digits(root, size=size, max_train_per_class=train, max_val_per_class=val)
            nines = sorted(glob.glob(os.path.join(root, 'val', '9', '*.png')))
            for p in nines[len(nines) - drop_val:]:
                os.remove(p)
            self._made[key] = root
        return self._made[key]


def count_images(root: str) -> Dict[str, int]:
    return {split: len(glob.glob(os.path.join(root, split, '*', '*'))) for split in ('train', 'val')}


# ----------------------------------------------------------------------------- forked entry-point processes
FORK_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fork_server.py')


class ForkedProcess:
    """A ``python main.py`` process forked by ``ForkServer`` (the Popen methods the tests use)."""

    def __init__(self, pid: int, server: 'ForkServer') -> None:
        self.pid, self._server = pid, server
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None and self.pid in self._server.exits:
            self.returncode = self._server.exits[self.pid]
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.time() + timeout
        while self.poll() is None:
            if deadline is not None and time.time() > deadline:
                raise subprocess.TimeoutExpired(f'pid {self.pid}', timeout)
            with self._server.changed:
                self._server.changed.wait(0.1)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


MAIN_MODULES = ('main', 'config', 'data', 'checkpoint', 'errors', 'logger', 'engine', 'runner')
THIRD_PARTY = ('torch', 'timm')


class ForkServer:
    """One interpreter that imports ``preload`` once and forks a ``python main.py ARGV`` process per run (~5 s
    of start-up each saved). The children are real processes, each in its own session: they are signalled,
    killed (-9), stopped and their process groups signalled exactly like a ``python main.py`` started by
    Popen; main.py itself runs as ``__main__`` in each (argv, environment and exit code its own).

    ``preload``: by default what main.main imports. With ``THIRD_PARTY`` (torch and timm only) the children
    import this repository themselves, so they check start-up (the environment read when ``models`` is
    imported, an entry point's own error handling): ``run(command)`` runs any ``python COMMAND...`` that way.
    Checks about the interpreter itself (a process exiting with live workers, torchrun) use ``launch``."""

    def __init__(self, workdir: str, preload: Sequence[str] = MAIN_MODULES) -> None:
        self.workdir = workdir
        self.proc = subprocess.Popen([sys.executable, FORK_SERVER], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, start_new_session=True,
                                     env=subprocess_env({'HARNESS_ROOT': ROOT, 'HARNESS_PRELOAD': ','.join(preload)}))
        self.exits: Dict[int, int] = {}
        self.changed = threading.Condition()
        self._pids: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._n = 0
        threading.Thread(target=self._read, daemon=True).start()
        assert self._pids.get(timeout=RUN_TIMEOUT) == 'READY', 'the fork server did not start (see stderr)'

    def _read(self) -> None:
        for raw in self.proc.stdout:
            word, *rest = raw.decode().split()
            if word == 'READY':
                self._pids.put('READY')
            elif word == 'PID':
                self._pids.put(int(rest[0]))
            elif word == 'EXIT':
                with self.changed:
                    self.exits[int(rest[0])] = int(rest[1])
                    self.changed.notify_all()
        self._pids.put('ended')                     # the server is gone (its traceback is on stderr)

    def run(self, command: Sequence[str], env: Optional[dict] = None, cwd: str = ROOT,
            timeout: float = RUN_TIMEOUT) -> Run:
        """``python COMMAND...`` (a script path, ``-m module`` or ``-c code``, then its arguments) forked with
        ``subprocess_env(env)`` in ``cwd``, to its end: exit code, stdout, stderr."""
        proc, out, err = self.spawn((), env, separate_stderr=True, command=command, cwd=cwd)
        texts: Dict[str, str] = {}

        def drain(key: str, path: str) -> None:
            with open(path) as f:
                texts[key] = f.read()
        readers = [threading.Thread(target=drain, args=kv, daemon=True) for kv in (('out', out), ('err', err))]
        for t in readers:
            t.start()
        try:
            code = proc.wait(timeout)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for t in readers:
            t.join(10)
        return Run(code, texts.get('out', ''), texts.get('err', ''))

    def spawn(self, argv: Sequence[str], env: Optional[dict] = None, separate_stderr: bool = False,
              command: Optional[Sequence[str]] = None, cwd: Optional[str] = None
              ) -> Tuple[ForkedProcess, str, Optional[str]]:
        """Fork ``python main.py ARGV`` with ``subprocess_env(env)``; returns it and the FIFOs its stdout and
        stderr go to (one FIFO, both merged, unless ``separate_stderr``). Open them for reading: the child
        blocks until then."""
        with self._lock:
            self._n += 1
            out = os.path.join(self.workdir, f'out{self._n}.fifo')
            err = os.path.join(self.workdir, f'err{self._n}.fifo') if separate_stderr else None
            for fifo in (out, err):
                if fifo:
                    os.mkfifo(fifo)
            full_env = subprocess_env(env)
            full_env['HARNESS_ROOT'] = ROOT
            request = {'argv': list(argv), 'env': full_env, 'out': out, 'err': err,
                       'command': None if command is None else list(command), 'cwd': cwd}
            self.proc.stdin.write((json.dumps(request) + '\n').encode())
            self.proc.stdin.flush()
            pid = self._pids.get(timeout=RUN_TIMEOUT)
        assert isinstance(pid, int), 'the fork server has ended (see stderr)'
        return ForkedProcess(pid, self), out, err

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc)
