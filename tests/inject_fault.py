"""Test-only launcher: ``python tests/inject_fault.py main.py ARGV...`` runs the entry point (as ``python
main.py ARGV`` would) after patching ``torch.Tensor.backward`` so that one rank raises once.

Environment (read here only; nothing in the library knows about it):
  FAULT_RANK       the rank (torchrun's RANK) that fails
  FAULT_BACKWARD   the 1-based count of its ``backward`` calls at which it raises
  FAULT_RECORD     a file: every worker start appends ``start rank R attempt A`` and the fault appends
                   ``fault rank R backward N`` (what the test asserts happened)
The fault fires only in torchrun's first attempt (``TORCHELASTIC_RESTART_COUNT`` 0): the restarted worker
group trains normally.
"""
import os
import runpy
import sys

import torch


def _record(line: str) -> None:
    path = os.environ.get('FAULT_RECORD')
    if path:
        with open(path, 'a') as f:
            f.write(line + '\n')


def main() -> None:
    rank = os.environ.get('RANK', '0')
    attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')
    _record(f'start rank {rank} attempt {attempt}')
    if rank == os.environ.get('FAULT_RANK') and attempt == '0':
        at, calls, real = int(os.environ['FAULT_BACKWARD']), [0], torch.Tensor.backward

        def backward(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == at:
                _record(f'fault rank {rank} backward {at}')
                raise RuntimeError(f'injected fault at backward {at} of rank {rank}')
            return real(self, *args, **kwargs)

        torch.Tensor.backward = backward
    entry = os.path.abspath(sys.argv[1])
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(entry))
    runpy.run_path(entry, run_name='__main__')


if __name__ == '__main__':
    main()
