"""Fault injection against the real entry point (CPU, tiny FLatten-Swin at 32 px on a small digits split):
preemption (SIGTERM) and hard kills (kill -9) at seeded random steps must resume to bit-identical final
weights; truncated checkpoints, diverging training, unreadable images, bad configurations, hostile pickles,
a dead/stalled distributed rank and a full or read-only disk must each end with a clear error or a clean
recovery and never a broken checkpoint.

``python main.py`` runs as a separate process where the process is the point: the interrupted runs and
the ranks are forked by the harness's fork server (real processes, signalled and killed, without ~5 s of
interpreter start-up each), torchrun is started for real. Everything else calls ``main.main(argv)`` in
this process (``harness.run_main``: exit code and console as a user sees them). In-process runs of the
bit-identity checks use one intra-op thread, as the separate processes do (OMP_NUM_THREADS=1).

Every subprocess has a timeout, so nothing here can hang CI. A one-line summary of what was injected is
printed at the end of the session (output capture is bypassed for it) and recorded as the junit
testsuite property ``faults_summary``.
"""
from __future__ import annotations

import collections
import glob
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import pytest
import torch

import checkpoint as C
from harness import MULTI_RANK, Run, Watched, free_port, main_cmd, run_folder, run_main, train_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_NAME = 'tiny_faults'
EPOCHS, STEPS_PER_EPOCH = 3, 10          # 160 train images / batch 16
PREEMPTED, ERROR = 143, 2
RUN_TIMEOUT = 180
ONE_THREAD = 1                           # in-process runs are compared bit for bit with OMP_NUM_THREADS=1 processes

pytestmark = [pytest.mark.slow, pytest.mark.digits(train=16, val=5, drop_val=0),    # 160 train, 50 val images
              pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, 'main.py')), reason='engine not present')]

TINY_YAML = f"""
MODEL:
  TYPE: flatten_swin
  NAME: {MODEL_NAME}
  NUM_CLASSES: 10
  DROP_PATH_RATE: 0.1
  SWIN:
    EMBED_DIM: 16
    DEPTHS: [1, 1]
    NUM_HEADS: [1, 2]
    WINDOW_SIZE: 56
  LA:
    ATTN_TYPE: LL
DATA:
  IMG_SIZE: 32
  BATCH_SIZE: 16
  NUM_WORKERS: 0
TRAIN:
  EPOCHS: {EPOCHS}
  WARMUP_EPOCHS: 1
  BASE_LR: 1.0e-3
AUG:
  AUTO_AUGMENT: rand-m9-mstd0.5-inc1   # official; reaches posterize(0 bits) (see data.build._posterize)
  REPROB: 0.25
  MIXUP: 0.8
  CUTMIX: 1.0
PRINT_FREQ: 1
SAVE_FREQ: 1
"""

SUMMARY: Dict[str, int] = collections.Counter()


# ----------------------------------------------------------------------------- module fixtures
@pytest.fixture(scope='module', autouse=True)
def _fault_summary(request, record_testsuite_property):
    yield
    s = SUMMARY
    line = (f"fault summary: {s['trials']} interrupted trials ({s['sigterm']} SIGTERM, {s['kill9']} kill -9), "
            f"{s['faults']} faults injected, {s['resumed_match']}/{s['resumed']} resumed runs matched the "
            f"uninterrupted weights, {s['ckpts_checked']} checkpoints re-loaded ({s['ckpts_bad']} bad), "
            f"{s['bad_inputs']} bad inputs tried ({s['bad_inputs_clean']} handled cleanly)")
    clean = (s['resumed_match'] == s['resumed'] and s['ckpts_bad'] == 0
             and s['bad_inputs_clean'] == s['bad_inputs'])
    line += '; all clean' if clean else '; NOT all clean'
    record_testsuite_property('faults_summary', line)
    capture = request.config.pluginmanager.getplugin('capturemanager')
    if capture is not None:
        with capture.global_and_fixture_disabled():          # shown even without -s
            print('\n' + line)
    else:
        print(line)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp('faults')


def test_digits_folders_hold_the_counts_the_checks_assume(digits):
    from harness import count_images
    assert count_images(digits) == {'train': 160, 'val': 50}


@pytest.fixture(scope='module')
def cfg(workdir) -> str:
    path = workdir / 'tiny.yaml'
    path.write_text(TINY_YAML)
    return str(path)


def main_args(cfg: str, data: str, output: str, tag: str, *extra: str, opts: Tuple[str, ...] = ()) -> List[str]:
    """main.py's arguments (for ``run_main``; ``main_cmd`` makes them a ``python main.py`` command)."""
    return train_args(cfg, data, output, *extra, tag=tag, opts=opts)


def out_dir(output: str, tag: str) -> str:
    return run_folder(output, MODEL_NAME, tag)


def run(args: List[str]) -> Run:
    """The entry point in this process, one intra-op thread (as the separate processes it is compared with)."""
    return run_main(args, threads=ONE_THREAD)


# the live progress line of a watched process (the only signal of which step it is in)
_STEP = re.compile(r'Train: \[(\d+)/\d+\]\[(\d+)/\d+\]')


def global_step(line: str) -> Optional[int]:
    m = _STEP.search(line)
    return (int(m.group(1)) - 1) * STEPS_PER_EPOCH + int(m.group(2)) if m else None


def weights(path: str) -> Dict[str, torch.Tensor]:
    ckpt = C.load_checkpoint(path)
    out = {f'model.{k}': v for k, v in ckpt['model'].items()}
    for pid, state in ckpt['optimizer']['state'].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                out[f'opt.{pid}.{k}'] = v
    return out


def same_weights(a: str, b: str) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def check_all_checkpoints_load(folder: str) -> None:
    for path in glob.glob(os.path.join(folder, '*.pth')):
        SUMMARY['ckpts_checked'] += 1
        try:
            ckpt = C.load_checkpoint(path)
            assert all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())
        except Exception:
            SUMMARY['ckpts_bad'] += 1
            raise


@pytest.fixture(scope='module')
def baseline(cfg, digits, workdir) -> str:
    """The uninterrupted run: its final checkpoint is the reference for every resumed run."""
    output = str(workdir / 'runs')
    run(main_args(cfg, digits, output, 'baseline')).ok()
    final = os.path.join(out_dir(output, 'baseline'), f'ckpt_epoch_{EPOCHS}.pth')
    assert os.path.isfile(final)
    return final


# ----------------------------------------------------------------------------- preemption and kills
def _trials() -> List[Tuple[str, int]]:
    rng = random.Random(6)                  # seeded: the same steps on every CI run
    total = EPOCHS * STEPS_PER_EPOCH
    # 'sigterm-group': as a batch scheduler does, the whole process group (with 2 DataLoader workers)
    return ([(k, rng.randint(1, total - 1)) for k in ('sigterm', 'sigterm', 'sigterm-group')]
            + [('kill9', rng.randint(STEPS_PER_EPOCH + 1, total - 1)), ('kill9-during-save', rng.randint(1, EPOCHS - 1))])


@pytest.mark.parametrize('kind, at', _trials())
def test_interrupt_and_resume_gives_identical_weights(cfg, digits, workdir, baseline, fork_server, kind, at):
    output, tag = str(workdir / 'runs'), f'{kind}-{at}'
    folder = out_dir(output, tag)
    # workers do not change the result: augmentation is a function of (seed, epoch, index)
    args = main_args(cfg, digits, output, tag, opts=('DATA.NUM_WORKERS', '2') if kind == 'sigterm-group' else ())
    w = Watched.forked(fork_server, args)                 # a real process: it is signalled or killed
    if kind == 'kill9-during-save':                       # kill -9 right as ckpt_epoch_<at> is being written
        w.wait_for(lambda ln: f'ckpt_epoch_{at}.pth saving' in ln)
    else:
        w.wait_for(lambda ln: (global_step(ln) or 0) >= at)
    if kind.startswith('sigterm'):
        if kind == 'sigterm-group':
            os.killpg(w.proc.pid, signal.SIGTERM)
        else:
            w.proc.send_signal(signal.SIGTERM)
        rc = w.finish()
        assert rc == PREEMPTED, w.output[-3000:]
        assert re.search(r'preempted (at|after) .*: saved \S*preempt\.pth', w.output), w.output[-3000:]
        pre = C.load_checkpoint(os.path.join(folder, 'preempt.pth'))
        assert (pre['epoch'], pre['step']) >= divmod(at, STEPS_PER_EPOCH)
        SUMMARY['sigterm'] += 1
    else:
        w.proc.send_signal(signal.SIGKILL)
        assert w.finish() == -signal.SIGKILL
        SUMMARY['kill9'] += 1
    SUMMARY['trials'] += 1
    SUMMARY['faults'] += 1
    check_all_checkpoints_load(folder)

    r = run(args).ok()                                    # the same command again: auto-resume
    if kind.startswith('sigterm'):
        assert 'auto resuming from' in r.out and 'preempt.pth' in r.out
        assert not os.path.exists(os.path.join(folder, 'preempt.pth'))   # consumed by the next epoch end
    check_all_checkpoints_load(folder)
    assert not glob.glob(os.path.join(folder, '.*.tmp'))     # temp files of a killed save are cleaned up
    SUMMARY['resumed'] += 1
    assert same_weights(os.path.join(folder, f'ckpt_epoch_{EPOCHS}.pth'), baseline)
    SUMMARY['resumed_match'] += 1


def test_truncated_newest_checkpoint_is_set_aside(cfg, digits, workdir, baseline):
    output, tag = str(workdir / 'runs'), 'truncated'
    folder = out_dir(output, tag)
    os.makedirs(folder)
    src = os.path.dirname(baseline)
    shutil.copy(os.path.join(src, 'ckpt_epoch_1.pth'), folder)
    data = open(os.path.join(src, 'ckpt_epoch_2.pth'), 'rb').read()
    with open(os.path.join(folder, 'ckpt_epoch_2.pth'), 'wb') as f:
        f.write(data[: len(data) * 2 // 3])              # an interrupted copy
    SUMMARY['faults'] += 1
    r = run(main_args(cfg, digits, output, tag)).ok()
    assert re.search(r'ckpt_epoch_2\.pth cannot be loaded .*kept aside as .*ckpt_epoch_2\.pth\.corrupt', r.out)
    assert re.search(r'auto resuming from \S*ckpt_epoch_1\.pth', r.out)
    assert os.path.getsize(os.path.join(folder, 'ckpt_epoch_2.pth.corrupt')) == len(data) * 2 // 3
    check_all_checkpoints_load(folder)
    SUMMARY['resumed'] += 1
    assert same_weights(os.path.join(folder, f'ckpt_epoch_{EPOCHS}.pth'), baseline)
    SUMMARY['resumed_match'] += 1


# ----------------------------------------------------------------------------- numerical faults
def test_nonfinite_steps_are_skipped_then_the_run_stops(cfg, digits, workdir):
    """A step schedule multiplying the lr by 1e30 after epoch 1 makes epoch 2 diverge."""
    output, tag = str(workdir / 'runs'), 'nonfinite'
    folder = out_dir(output, tag)
    r = run(main_args(cfg, digits, output, tag, opts=(
        'TRAIN.LR_SCHEDULER.NAME', 'step', 'TRAIN.LR_SCHEDULER.DECAY_EPOCHS', '1',
        'TRAIN.LR_SCHEDULER.DECAY_RATE', '1e30', 'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.MAX_NONFINITE_STEPS', '3')))
    SUMMARY['faults'] += 1
    line = r.error_line()
    assert re.search(r'3 consecutive steps .* epoch 2 step \d+', line) and 'TRAIN.MAX_NONFINITE_STEPS' in line
    skipped = re.findall(r'epoch 2 step (\d+): non-finite loss .* update skipped \((\d) in a row\)', r.out)
    assert [int(n) for _, n in skipped] == [1, 2, 3]
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, '*.pth'))) == \
        ['ckpt_epoch_1.pth', 'max_acc.pth']             # nothing written after the divergence
    check_all_checkpoints_load(folder)
    assert C.load_checkpoint(os.path.join(folder, 'ckpt_epoch_1.pth'))['epoch'] == 1


# ----------------------------------------------------------------------------- bad input data
@pytest.fixture(scope='module')
def bad_digits(digits, workdir) -> Tuple[str, List[str]]:
    """A copy of the digits with a truncated JPEG and a text file named .jpg in both train and val."""
    path = str(workdir / 'bad_digits')
    shutil.copytree(digits, path)
    from PIL import Image
    bad = []
    for split, (trunc_cls, text_cls) in (('train', ('3', '1')), ('val', ('5', '2'))):
        jpg = os.path.join(path, split, trunc_cls, 'zz_truncated.jpg')
        Image.new('RGB', (32, 32), (200, 30, 30)).save(jpg, quality=95)
        blob = open(jpg, 'rb').read()
        open(jpg, 'wb').write(blob[: len(blob) // 2])
        txt = os.path.join(path, split, text_cls, 'zz_notes.jpg')
        open(txt, 'w').write('this is not an image\n')
        bad += [jpg, txt]
    return path, bad


def test_bad_images_fail_with_the_file_name(cfg, bad_digits, workdir):
    data, bad = bad_digits
    output = str(workdir / 'runs')
    for tag, extra, split in (('badimg-train', (), 'train'), ('badimg-eval', ('--eval',), 'val')):
        SUMMARY['bad_inputs'] += 1
        line = run(main_args(cfg, data, output, tag, *extra, opts=('TRAIN.EPOCHS', '1'))).error_line()
        named = [p for p in bad if p in line]
        # training may draw no bad file before validation (drop_last), so only --eval pins the split
        assert len(named) == 1 and (split == 'train' or '/val/' in named[0]), line
        assert 'DATA.SKIP_BAD_IMAGES' in line
        assert not glob.glob(os.path.join(out_dir(output, tag), '*.pth'))
        SUMMARY['bad_inputs_clean'] += 1


def test_bad_images_are_skipped_counted_and_logged(cfg, bad_digits, workdir):
    data, bad = bad_digits
    output, tag = str(workdir / 'runs'), 'badimg-skip'
    SUMMARY['bad_inputs'] += 1
    r = run(main_args(cfg, data, output, tag, opts=('TRAIN.EPOCHS', '1', 'DATA.SKIP_BAD_IMAGES', 'True'))).ok()
    for p in bad:
        split = 'training' if '/train/' in p else 'validation'
        assert f'skipped unreadable {split} image {p}' in r.out
    assert '2 unreadable validation images were skipped; accuracy is over the remaining 50 images' in r.out
    assert 'on the 50 test images' in r.out                    # exactly the 50 good val images
    # 162 train files, batch 16, drop_last: 10 steps; the skipped ones are counted when they were drawn
    n_train_skipped = sum(f'skipped unreadable training image {p}' in r.out for p in bad)
    if n_train_skipped:
        assert f'{n_train_skipped} unreadable training images skipped' in r.out
    check_all_checkpoints_load(out_dir(output, tag))
    SUMMARY['bad_inputs_clean'] += 1


# ----------------------------------------------------------------------------- bad configuration
def test_bad_configurations_exit_2_with_one_line(cfg, digits, workdir):
    """Each case is main.main(argv) in this process; each gets its own output root, which must hold no
    checkpoint afterwards."""
    root = workdir / 'badcfg'
    root.mkdir()
    blocker = root / 'a_file'
    blocker.write_text('not a folder')
    cswin = os.path.join(ROOT, 'cfgs', 'flatten_cswin_t.yaml')
    cases = [  # (name, cfg, data, extra args, opts, text the error line must contain)
        ('attn-length', cfg, digits, [], ['MODEL.LA.ATTN_TYPE', 'LLL'], 'MODEL.LA.ATTN_TYPE'),
        ('attn-letters', cfg, digits, [], ['MODEL.LA.ATTN_TYPE', 'LX'], 'MODEL.LA.ATTN_TYPE'),
        ('img-not-divisible', cfg, digits, [], ['DATA.IMG_SIZE', '30'], 'DATA.IMG_SIZE'),
        ('img-odd-map', cfg, digits, [], ['DATA.IMG_SIZE', '36'], 'DATA.IMG_SIZE'),
        ('split-format', cswin, digits, [], ['MODEL.NUM_CLASSES', '10', 'MODEL.LA.CSWIN_LA_SPLIT_SIZE', '8-4'],
         'MODEL.LA.CSWIN_LA_SPLIT_SIZE'),
        ('split-no-tile', cswin, digits, ['--batch-size', '16'], ['MODEL.NUM_CLASSES', '10', 'DATA.IMG_SIZE', '64',
                                                                 'DATA.NUM_WORKERS', '0',
                                              'MODEL.LA.CSWIN_LA_SPLIT_SIZE', '3-8-4-2'], 'SPLIT_SIZE'),
        ('batch-zero', cfg, digits, ['--batch-size', '0'], [], 'DATA.BATCH_SIZE'),
        ('batch-negative', cfg, digits, [], ['DATA.BATCH_SIZE', '-4'], 'DATA.BATCH_SIZE'),
        ('missing-data', cfg, str(root / 'no_such_dataset'), [], [], '--data-path'),
        ('output-not-writable', cfg, digits, [], [], '--output'),
        ('class-mismatch', cfg, digits, [], ['MODEL.NUM_CLASSES', '7'], 'MODEL.NUM_CLASSES'),
        ('unknown-key', cfg, digits, [], ['TRAIN.EPOCHZ', '3'], 'TRAIN.EPOCHZ'),
        ('missing-cfg', str(root / 'nope.yaml'), digits, [], [], '--cfg'),
    ]
    argvs = []
    for name, c, d, extra, opts, _ in cases:
        output = str(blocker / 'sub') if name == 'output-not-writable' else str(root / name)
        argv = ['--cfg', c, '--data-path', d, '--output', output, '--device', 'cpu', *extra]
        argvs.append(argv + (['--opts', *opts] if opts else []))
    SUMMARY['bad_inputs'] += len(cases)
    failures = []
    for (name, *_, expect), argv in zip(cases, argvs):
        res = run_main(argv)
        lines = [ln for ln in res.err.strip().splitlines() if ln.strip()]
        ok = (res.code == ERROR and len(lines) == 1 and lines[0].startswith('ERROR: ') and expect in lines[0])
        if not ok:
            failures.append(f"{name}: rc={res.code} stderr={res.err[-500:]!r}")
        else:
            SUMMARY['bad_inputs_clean'] += 1
    assert not failures, '\n'.join(failures)
    assert not glob.glob(str(root / '**' / '*.pth'), recursive=True)        # no work was done


def test_hostile_resume_file_is_refused(cfg, digits, workdir):
    marker = workdir / 'pwned-by-resume'

    class Touch:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))

    evil = str(workdir / 'evil.pth')
    torch.save({'model': {}, 'optimizer': {}, 'epoch': 0, 'payload': Touch()}, evil)
    output = str(workdir / 'runs')
    SUMMARY['bad_inputs'] += 2
    for tag, extra in (('evil-train', ()), ('evil-eval', ('--eval',))):
        line = run(main_args(cfg, digits, output, tag, '--resume', evil, *extra)).error_line()
        assert f'refusing to load {evil}' in line and 'system' in line, line
        assert not marker.exists()
        assert not glob.glob(os.path.join(out_dir(output, tag), '*.pth'))
        SUMMARY['bad_inputs_clean'] += 1


# ----------------------------------------------------------------------------- distributed
@MULTI_RANK
@pytest.mark.parametrize('fault', ['kill', 'stall'])
def test_dead_or_stalled_rank_does_not_hang_the_other(cfg, digits, workdir, fork_server, fault):
    """Two gloo ranks, launched with the environment torchrun gives its workers (RANK, WORLD_SIZE,
    MASTER_*; without torchrun's agent, which would otherwise tear the survivor down itself). Rank 1 is
    killed (kill -9) or stalled (SIGSTOP); rank 0 must fail on its own within DIST_TIMEOUT (+ slack)."""
    timeout_s = 10                      # the stall case waits this long; steps of this tiny model take < 1 s
    output = str(workdir / 'runs')
    port = free_port()
    args = main_args(cfg, digits, output, f'dist-{fault}', opts=('DIST_TIMEOUT', str(timeout_s)))
    ranks = [Watched.forked(fork_server, args, env={'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port), 'WORLD_SIZE': '2',
                                'RANK': str(r), 'LOCAL_RANK': str(r)}) for r in (0, 1)]
    try:
        ranks[0].wait_for(lambda ln: (global_step(ln) or 0) >= 2, timeout=RUN_TIMEOUT)
        if fault == 'kill':
            ranks[1].proc.send_signal(signal.SIGKILL)
        else:
            os.killpg(ranks[1].proc.pid, signal.SIGSTOP)
        SUMMARY['faults'] += 1
        start = time.time()
        rc = ranks[0].finish(timeout=timeout_s + 60)
        elapsed = time.time() - start
        assert rc not in (0, PREEMPTED), ranks[0].output[-3000:]
        assert elapsed < timeout_s + 60
        if fault == 'stall':            # only the timeout can end this one
            assert elapsed >= timeout_s * 0.5, elapsed
            assert re.search(r'[Tt]imed? ?out', ranks[0].output), ranks[0].output[-3000:]
    finally:
        if fault == 'stall' and ranks[1].proc.poll() is None:
            os.killpg(ranks[1].proc.pid, signal.SIGCONT)
        for w in ranks:
            w.kill()
    check_all_checkpoints_load(out_dir(output, f'dist-{fault}'))


def _children(pid: int) -> List[int]:
    out: List[int] = []
    for task in glob.glob(f'/proc/{pid}/task/*/children'):
        try:
            out += [int(c) for c in open(task).read().split()]
        except OSError:
            pass
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return open(f'/proc/{pid}/cmdline', 'rb').read()
    except OSError:
        return b''


@MULTI_RANK
@pytest.mark.skipif(not os.path.isdir('/proc/self/task'), reason='needs /proc to find the torchrun workers')
def test_torchrun_worker_killed_ends_the_job(cfg, digits, workdir):
    """The same through torchrun itself: one worker is killed -9; torchrun, the surviving worker and
    the job end (non-zero) within the bound, and the output folder holds no broken checkpoint."""
    timeout_s = 10                      # the stall case waits this long; steps of this tiny model take < 1 s
    output = str(workdir / 'runs')
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                '--max-restarts', '0', *main_cmd(main_args(cfg, digits, output, 'torchrun',
                                                           opts=('DIST_TIMEOUT', str(timeout_s))))[1:]]
    job = Watched(launcher)
    try:
        job.wait_for(lambda ln: (global_step(ln) or 0) >= 2)
        workers = [c for c in _children(job.proc.pid) if b'main.py' in _cmdline(c)]
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        SUMMARY['faults'] += 1
        start = time.time()
        rc = job.finish(timeout=timeout_s + 60)
        assert rc != 0 and time.time() - start < timeout_s + 60
        for w in workers:
            assert not os.path.exists(f'/proc/{w}') or open(f'/proc/{w}/stat').read().split()[2] == 'Z'
    finally:
        job.kill()
    check_all_checkpoints_load(out_dir(output, 'torchrun'))


# ----------------------------------------------------------------------------- full / read-only disk
def _assert_save_failure_is_clean(r: Run, folder: str) -> None:
    line = r.error_line()
    assert re.search(r'could not write checkpoint \S*ckpt_epoch_2\.pth: .*(No space left|Permission denied|'
                     r'Read-only)', line), line
    assert 'writable --output' in line
    assert not glob.glob(os.path.join(folder, '.*.tmp'))                   # no temp file left behind
    ckpt = C.load_checkpoint(os.path.join(folder, 'ckpt_epoch_1.pth'))      # the previous one is intact
    assert ckpt['epoch'] == 1
    check_all_checkpoints_load(folder)


def test_disk_full_while_saving_simulated(cfg, digits, workdir, monkeypatch):
    """Simulation (works for any user): os.replace raises ENOSPC for the epoch-2 checkpoint (the disk fills
    up at the second save), patched for the duration of the run."""
    import errno
    output, tag = str(workdir / 'runs'), 'enospc'
    real = os.replace

    def replace(src, dst, *a, **k):
        if os.path.basename(str(dst)) == 'ckpt_epoch_2.pth':
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        return real(src, dst, *a, **k)
    monkeypatch.setattr(os, 'replace', replace)
    SUMMARY['faults'] += 1
    r = run(main_args(cfg, digits, output, tag))
    monkeypatch.undo()
    _assert_save_failure_is_clean(r, out_dir(output, tag))


def _mount_tmpfs(path: str, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which('mount'):
        return False
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', path], capture_output=True)
    return r.returncode == 0


def test_disk_full_while_saving_real_tmpfs(cfg, digits, workdir, baseline):
    """A real ENOSPC: the output folder is a tiny tmpfs that holds two checkpoints (ckpt_epoch_1 and
    max_acc, ~0.3 MB each) and the logs, not a third. Needs root and a mountable tmpfs; skipped otherwise."""
    size = os.path.getsize(os.path.join(os.path.dirname(baseline), 'ckpt_epoch_1.pth'))
    limit = 2 * size + 100_000                 # room for two checkpoints and ~100 kB of logs, not three
    if limit >= 3 * size:
        pytest.skip(f'checkpoints of {size} bytes are too small for the tmpfs arithmetic')
    mnt = str(workdir / 'tmpfs')
    if not _mount_tmpfs(mnt, str(limit)):
        pytest.skip('cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN); the simulated test covers ENOSPC')
    try:
        SUMMARY['faults'] += 1
        r = run(main_args(cfg, digits, mnt, 'tmpfs'))
        _assert_save_failure_is_clean(r, out_dir(mnt, 'tmpfs'))
    finally:
        subprocess.run(['umount', mnt], capture_output=True)


def _bind_read_only(folder: str) -> bool:
    """Mount ``folder`` read-only over itself (root): new files there fail with EROFS, even for root."""
    r = subprocess.run(['mount', '--bind', folder, folder], capture_output=True)
    if r.returncode:
        return False
    r = subprocess.run(['mount', '-o', 'remount,bind,ro', folder], capture_output=True)
    if r.returncode:
        subprocess.run(['umount', folder], capture_output=True)
        return False
    return True


class _OnLogLine(logging.Handler):
    """Calls ``action`` (once, in the training thread, so the run waits for it) when a log line contains ``text``."""

    def __init__(self, text: str, action) -> None:
        super().__init__()
        self.text, self.action, self.done = text, action, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.done and self.text in record.getMessage():
            self.done = True
            self.action()


def test_read_only_output_while_saving(cfg, digits, workdir):
    """The output folder turns read-only right after the first checkpoint is saved (the run waits while it
    changes). Non-root: chmod 555 on the folder. Root (chmod does not stop root): a read-only bind mount of
    the folder over itself (EROFS stops root too; files already open, like the log, keep working); skipped
    when neither is possible."""
    output, tag = str(workdir / 'ro'), 'readonly'
    folder = out_dir(output, tag)
    root = os.geteuid() == 0
    state = {'mounted': False}

    def make_read_only():
        if root:
            state['mounted'] = _bind_read_only(folder)
        else:
            os.chmod(folder, 0o555)
    watcher = _OnLogLine('ckpt_epoch_1.pth saved', make_read_only)
    logging.getLogger().addHandler(watcher)
    try:
        r = run(main_args(cfg, digits, output, tag))
        assert watcher.done, r.console[-3000:]
        if root and not state['mounted']:
            pytest.skip('running as root (chmod cannot make a folder read-only) and bind mounts fail here')
        SUMMARY['faults'] += 1
        line = r.error_line()
        # the first save after the switch: max_acc.pth of epoch 1 or ckpt_epoch_2.pth
        assert re.search(r'could not write checkpoint \S*(max_acc|ckpt_epoch_2)\.pth: (Permission denied|Read-only file '
                         r'system); free space or choose a writable --output', line), line
        assert not glob.glob(os.path.join(folder, '.*.tmp'))
        assert C.load_checkpoint(os.path.join(folder, 'ckpt_epoch_1.pth'))['epoch'] == 1
        check_all_checkpoints_load(folder)
    finally:
        logging.getLogger().removeHandler(watcher)
        if state['mounted']:
            subprocess.run(['umount', folder], capture_output=True)
        if not root and os.path.isdir(folder):
            os.chmod(folder, 0o755)
