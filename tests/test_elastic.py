"""torchrun's own fault-tolerance paths, end to end on CPU/gloo (subprocess runs by nature: the point is the
launcher): an elastic restart (``--max-restarts 1``, a fault injected once on rank 1) and a 2-node c10d
rendezvous (two launchers on 127.0.0.1). Both must end with the weights of an uninterrupted 2-process run,
tensor for tensor.

The fault is injected by ``tests/inject_fault.py``, a launcher that patches ``torch.Tensor.backward`` and then
runs main.py; the library has no test hook. Runs are tiny (32 px digits, 100 training images, 2 epochs of
3 steps per rank) and every launcher has a wall-clock limit (a hang fails the test).
"""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from typing import Dict, List

import pytest
import torch

from harness import (MULTI_RANK, ROOT, checkpoint_names, free_port, kill_tree, launch, main_cmd, run_folder,
                     run_ranks, subprocess_env)

# 100 training images (10 per class: 50 per rank), 20 validation images
pytestmark = [pytest.mark.slow, MULTI_RANK, pytest.mark.digits(train=10, val=2, drop_val=0)]

CFG = os.path.join(ROOT, 'cfgs', 'demo', 'flatten_swin_digits.yaml')
NAME = 'flatten_swin_digits'
EPOCHS = 2
# 50 training images per rank, batch 16, drop_last: 3 steps per epoch; backward 5 is epoch 2, step 2
STEPS_PER_EPOCH = 3
FAULT_BACKWARD = STEPS_PER_EPOCH + 2
OPTS = ('DATA.IMG_SIZE', '32', 'MODEL.SWIN.PATCH_SIZE', '4', 'MODEL.SWIN.EMBED_DIM', '16',
        'MODEL.SWIN.DEPTHS', '[1, 1, 1, 1]', 'MODEL.SWIN.NUM_HEADS', '[1, 1, 2, 2]', 'DATA.BATCH_SIZE', '16',
        'DATA.NUM_WORKERS', '0', 'TRAIN.EPOCHS', str(EPOCHS), 'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.BASE_LR', '0.032',
        'TRAIN.MIN_LR', '0.0016', 'SAVE_FREQ', '1', 'PRINT_FREQ', '1', 'MODEL_EMA.ENABLE', 'True',
        'MODEL_EMA.DECAY', '0.8', 'MODEL.DROP_PATH_RATE', '0.1', 'DIST_TIMEOUT', '60')
LAUNCH_TIMEOUT = 420                     # one launcher (both attempts of the elastic run); a hang fails


def torchrun(*launcher: str) -> List[str]:
    return [sys.executable, '-m', 'torch.distributed.run', *launcher]


def main_argv(data: str, output: str) -> List[str]:
    return ['--cfg', CFG, '--data-path', data, '--output', output, '--device', 'cpu', '--opts', *OPTS]


def final_checkpoint(output: str) -> Dict:
    folder = run_folder(output, NAME)
    assert f'ckpt_epoch_{EPOCHS}.pth' in checkpoint_names(folder), checkpoint_names(folder)
    return torch.load(os.path.join(folder, f'ckpt_epoch_{EPOCHS}.pth'), weights_only=True)


def tensors(ckpt: Dict) -> Dict[str, torch.Tensor]:
    """Every tensor of the model, its EMA and the optimizer state, by a flat name."""
    out = {}

    def walk(prefix: str, obj) -> None:
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f'{prefix}.{k}', v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f'{prefix}.{i}', v)

    for part in ('model', 'model_ema', 'optimizer'):
        assert ckpt.get(part) is not None, f'checkpoint has no {part!r}'
        walk(part, ckpt[part])
    return out


def assert_same_tensors(got: Dict, want: Dict) -> None:
    a, b = tensors(got), tensors(want)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f'{len(differ)} of {len(a)} tensors differ, e.g. {differ[:5]}'
    assert got['epoch'] == want['epoch']


@pytest.fixture(scope='module')
def uninterrupted(digits, tmp_path_factory, fork_server) -> Dict:
    """The reference: one 2-process job without a fault. Its two ``python main.py`` processes are forked by
    the harness with the environment torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*): the
    launcher is what the tests below check, not what the reference needs (three interpreter start-ups saved)."""
    out = str(tmp_path_factory.mktemp('uninterrupted'))
    ranks = run_ranks(fork_server, main_argv(digits, out), timeout=LAUNCH_TIMEOUT)
    assert [r.code for r in ranks] == [0, 0], '\n----\n'.join(r.out[-2000:] for r in ranks)
    return final_checkpoint(out)


def test_elastic_restart_resumes_to_the_uninterrupted_weights(digits, uninterrupted, tmp_path):
    """torchrun --max-restarts 1: rank 1 raises at its 5th backward (epoch 2) in the first attempt; torchrun
    restarts the worker group, auto-resume continues from the last (epoch-1) checkpoint, and the final checkpoint
    equals the uninterrupted run's tensor for tensor."""
    out, record = str(tmp_path / 'out'), tmp_path / 'record.txt'
    entry = main_cmd(main_argv(digits, out), prefix=[os.path.join(ROOT, 'tests', 'inject_fault.py')])[1:]
    run = launch(torchrun('--standalone', '--nproc_per_node', '2', '--max-restarts', '1', '--monitor-interval', '1',
                          *entry),
                 timeout=LAUNCH_TIMEOUT,
                 env=dict(FAULT_RANK='1', FAULT_BACKWARD=str(FAULT_BACKWARD), FAULT_RECORD=str(record)))
    assert run.code == 0, run.console[-3000:]
    events = record.read_text().splitlines()
    assert f'fault rank 1 backward {FAULT_BACKWARD}' in events                     # the fault did fire
    assert {'start rank 0 attempt 1', 'start rank 1 attempt 1'} <= set(events)     # and the group restarted
    assert 'injected fault' in run.console
    with open(os.path.join(run_folder(out, NAME), 'log_rank0.txt')) as f:
        log = f.read()
    assert 'auto resuming from' in log                                            # the restart resumed
    assert_same_tensors(final_checkpoint(out), uninterrupted)


def test_two_launchers_rendezvous_to_the_uninterrupted_weights(digits, uninterrupted, tmp_path):
    """Two torchrun launchers (``--nnodes 2 --nproc_per_node 1``, c10d rendezvous on 127.0.0.1) train as one
    2-process job: same final weights as one launcher with two processes."""
    out = str(tmp_path / 'out')
    launcher = ['--nnodes', '2', '--nproc_per_node', '1', '--rdzv-backend', 'c10d',
                '--rdzv-endpoint', f'127.0.0.1:{free_port()}', '--rdzv-id', uuid.uuid4().hex[:8],
                '--local-addr', '127.0.0.1']
    cmd = torchrun(*launcher, *main_cmd(main_argv(digits, out))[1:])
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for _ in range(2)]
    outputs: List[str] = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=LAUNCH_TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f'the two launchers did not finish within {LAUNCH_TIMEOUT} s')
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p)
    assert [p.returncode for p in procs] == [0, 0], '\n----\n'.join(o[-2000:] for o in outputs)
    with open(os.path.join(run_folder(out, NAME), 'log_rank0.txt')) as f:
        assert 'rank 0/2' in f.read()
    assert_same_tensors(final_checkpoint(out), uninterrupted)
