"""The fork server behind ``harness.ForkServer``, run as ``python tests/fork_server.py`` (never imported by
the tests): it imports the modules named in ``HARNESS_PRELOAD`` once, then forks one child per request.

Protocol (one JSON object per line on stdin, one word per line on stdout):
* request ``{"argv", "env", "out", "err", "command", "cwd"}`` -> ``PID <pid>`` once the child is forked;
* ``EXIT <pid> <code>`` when a child ends (code as ``subprocess`` reports it: -N for a signal);
* ``READY`` once the preloaded modules are imported; end of stdin ends the server.

Each child becomes ``python main.py ARGV`` (or ``python COMMAND...``) as far as this repository can tell:
its own session, stdout/stderr on the FIFOs it was given, its environment, ``sys.path`` and ``sys.argv``
those of a fresh interpreter, the script or module run as ``__main__`` and its exit code its own.
"""
import atexit
import importlib
import json
import os
import runpy
import sys
import threading
import time
import traceback
from typing import Dict, List, Optional, Sequence

# A fresh ``python main.py`` has the script's folder first on sys.path, never this file's folder (tests/).
if sys.path and os.path.abspath(sys.path[0] or '.') == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]
sys.path.insert(0, os.environ['HARNESS_ROOT'])
BASE_PATH: List[str] = list(sys.path)          # sys.path of every child, after its PYTHONPATH entries


def _redirect(out: str, err: Optional[str]) -> None:
    """fd 1 to ``out``, fd 2 to ``err`` (or ``out``), and fresh line-buffered sys.stdout / sys.stderr."""
    for target, path in ((1, out), (2, err or out)):
        fd = os.open(path, os.O_WRONLY)
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout = open(1, 'w', buffering=1, closefd=False)
    sys.stderr = open(2, 'w', buffering=1, closefd=False)


def _run_as_main(command: Sequence[str]) -> int:
    """Run ``python COMMAND...`` (a script path, ``-m module`` or ``-c code``, then its arguments) in this
    process with sys.argv / sys.path[0] set as that interpreter would; its exit code."""
    kind = command[0]
    if kind == '-m':
        sys.argv = [command[1], *command[2:]]
    elif kind == '-c':
        sys.argv = ['-c', *command[2:]]
    else:
        sys.argv = list(command)
    try:
        if kind == '-c':
            sys.path.insert(0, '')
            exec(compile(command[1], '<string>', 'exec'), {'__name__': '__main__'})
        elif kind == '-m':
            sys.path.insert(0, os.getcwd())
            runpy.run_module(command[1], run_name='__main__', alter_sys=True)
        else:
            sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
            runpy.run_path(sys.argv[0], run_name='__main__')
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)                 # sys.exit('message'), as the interpreter prints it
        return 1
    except BaseException:  # noqa: BLE001  (the interpreter prints any uncaught exception and exits 1)
        traceback.print_exc()
        return 1
    return 0


def child(request: Dict) -> None:
    """The forked process: become the requested command, then exit as the interpreter would (non-daemon
    threads joined, atexit handlers run, streams flushed)."""
    os.setsid()
    _redirect(request['out'], request.get('err'))
    os.environ.clear()
    os.environ.update(request['env'])
    if request.get('cwd'):
        os.chdir(request['cwd'])
    sys.path[:] = [p for p in request['env'].get('PYTHONPATH', '').split(os.pathsep) if p] + BASE_PATH
    command = request.get('command') or [os.path.join(os.environ['HARNESS_ROOT'], 'main.py'), *request['argv']]
    code = _run_as_main(command)
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _reap() -> None:
    """Report every child's end on stdout (a thread: the main loop only reads requests)."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(0.05)
            continue
        os.write(1, f'EXIT {pid} {os.waitstatus_to_exitcode(status)}\n'.encode())


def main() -> None:
    for name in filter(None, os.environ['HARNESS_PRELOAD'].split(',')):       # imported once, before any fork
        importlib.import_module(name)
    threading.Thread(target=_reap, daemon=True).start()
    os.write(1, b'READY\n')
    buf = b''
    while True:
        chunk = os.read(0, 65536)
        if not chunk:                                  # the test session ended
            os._exit(0)
        buf += chunk
        while b'\n' in buf:
            line, buf = buf.split(b'\n', 1)
            pid = os.fork()
            if pid == 0:
                child(json.loads(line))
            os.write(1, f'PID {pid}\n'.encode())


if __name__ == '__main__':
    main()
