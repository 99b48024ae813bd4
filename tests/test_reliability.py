"""Reliability of the entry points under inputs and failures that used to hang a run, crash it or mislead
its user (each ``row`` test is one such failure mode), driven as a user would: ``main.main(argv)`` in this
process (``harness.run_main``: exit code, console, run folder), and ``main.py`` / ``main_ema.py`` in
subprocesses only where the process is the point (a process that must exit while its DataLoader workers
live; 2-rank torchrun for the rows about ranks). CPU, a tiny FLatten-Swin at 32 px on the shared digits.
Every subprocess has a wall-clock limit far below DIST_TIMEOUT (600 s), so a hang is a failure, never a
stuck CI job.

Failures are injected without touching the code under test: a small launcher (written by the fixture
``launcher``) patches ``torch.utils.data.default_collate`` (an unexpected error in a DataLoader worker,
re-raised in the main process while the workers live) or wraps
``timm.utils.ModelEmaV3`` (to record each rank's EMA checksum at exit) and then runs the entry point.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from typing import List, Tuple

import numpy as np
import pytest
from PIL import Image

from harness import MULTI_RANK, Run, count_images, launch, read_records, run_folder, run_main, run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_NAME = 'tiny_rel'
ERROR = 2
N_TRAIN, N_VAL = 40, 20                 # 4 train + 2 val images per digit class
RUN_TIMEOUT = 120                       # one tiny single-process run takes ~10 s (start-up included)
HANG_LIMIT = 60                         # far below DIST_TIMEOUT (600 s)

pytestmark = [pytest.mark.slow, pytest.mark.digits(train=4, val=2, drop_val=0)]   # N_TRAIN, N_VAL images

TINY_YAML = f"""
MODEL:
  TYPE: flatten_swin
  NAME: {MODEL_NAME}
  NUM_CLASSES: 10
  SWIN:
    EMBED_DIM: 16
    DEPTHS: [1, 1]
    NUM_HEADS: [1, 2]
    WINDOW_SIZE: 56
  LA:
    ATTN_TYPE: LL
DATA:
  IMG_SIZE: 32
  BATCH_SIZE: 8
  NUM_WORKERS: 0
TRAIN:
  EPOCHS: 1
  WARMUP_EPOCHS: 0
AUG:
  AUTO_AUGMENT: none
  REPROB: 0.0
  MIXUP: 0.0
  CUTMIX: 0.0
PRINT_FREQ: 1
"""

LAUNCHER = r'''
import hashlib, os, runpy, sys
entry = sys.argv.pop(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(entry)))
mode, rank = os.environ.get('REL_INJECT', ''), os.environ.get('RANK', '0')
if mode == 'fail':                       # an unexpected error in a DataLoader worker of one rank
    import torch.utils.data
    original, calls = torch.utils.data.default_collate, [0]
    def collate(batch):
        calls[0] += 1                        # counted per process: each forked worker has its own count
        if calls[0] == 2 and rank == os.environ.get('REL_FAIL_RANK', '0'):
            raise RuntimeError('injected failure in a DataLoader worker')
        return original(batch)
    torch.utils.data.default_collate = collate
elif mode == 'ema':                      # at exit, record each rank's EMA weights (sha1 of the state)
    import atexit
    from timm.utils import ModelEmaV3
    made, original = [], ModelEmaV3.__init__
    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)
    ModelEmaV3.__init__ = init
    def record():
        with open(os.path.join(os.environ['REL_EMA_OUT'], f'ema_rank{rank}.txt'), 'w') as f:
            for ema in made:
                h = hashlib.sha1()
                for k, v in sorted(ema.module.state_dict().items()):
                    h.update(k.encode()); h.update(v.detach().cpu().contiguous().numpy().tobytes())
                f.write(h.hexdigest() + '\n')
    atexit.register(record)
sys.argv[0] = entry
runpy.run_path(entry, run_name='__main__')
'''


# ----------------------------------------------------------------------------- helpers and fixtures
def main_args(cfg: str, data: str, output: str, tag: str, *extra: str, opts: Tuple[str, ...] = (),
              entry: str = 'main.py') -> List[str]:
    """``<repo>/ENTRY --cfg ... --device cpu EXTRA [--opts OPTS]`` (for a subprocess: ``run_python``)."""
    args = [os.path.join(ROOT, entry), '--cfg', cfg, '--data-path', data, '--output', output, '--tag', tag,
            '--device', 'cpu', *extra]
    return args + (['--opts', *opts] if opts else [])


def run_python(*args: str, timeout: float = RUN_TIMEOUT, **kw) -> Run:
    """``python ARGS...`` in a subprocess (own session; the process tree is killed on timeout: a hang fails)."""
    return launch([sys.executable, *args], timeout=timeout, **kw)


def torchrun(*args: str, **kw) -> Run:
    return run_python('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', *args, **kw)


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith('ERROR: '), f'expected one ERROR line, got:\n{stderr[-3000:]}'
    return lines[0]


def run_dir(output: str, tag: str) -> str:
    return run_folder(output, MODEL_NAME, tag)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp('reliability')


@pytest.fixture(scope='module')
def cfg(workdir) -> str:
    path = workdir / 'tiny.yaml'
    path.write_text(TINY_YAML)
    return str(path)


@pytest.fixture(scope='module')
def launcher(workdir) -> str:
    path = workdir / 'launch.py'
    path.write_text(LAUNCHER)
    return str(path)


def test_digits_folders_hold_the_counts_the_checks_assume(digits):
    assert count_images(digits) == {'train': N_TRAIN, 'val': N_VAL}


def copy_digits(digits: str, dst: str) -> str:
    shutil.copytree(digits, dst)
    return dst


def run_cases(cases: List[Tuple[List[str], str]]) -> List[dict]:
    """``cases``: (argv for main.main, the run folder to check), each run in this process; per case: exit
    code (or 'crash: ...' for an unexpected exception, so one bad case does not hide the others), stdout,
    stderr, and whether the run folder exists afterwards."""
    results = []
    for argv, folder in cases:
        try:
            r = run_main(argv)
            rc, out, err = r.code, r.out, r.err
        except Exception as e:                          # a crash is a result too
            rc, out, err = 'crash: ' + repr(e)[:300], '', ''
        results.append({'rc': rc, 'stdout': out, 'stderr': err, 'folder': os.path.exists(folder)})
    return results


# ----------------------------------------------------------------------------- no hang
def test_unexpected_error_with_live_workers_exits_promptly(cfg, digits, workdir, launcher):
    """An unexpected exception in a DataLoader worker (re-raised in the main process, whose traceback keeps
    the loader's iterator and its 2 workers alive): the process ends (non-zero, with the exception shown)
    within seconds, instead of waiting forever for workers that ignore SIGTERM."""
    output = str(workdir / 'runs')
    start = time.time()
    r = run_python(launcher, *main_args(cfg, digits, output, 'live-workers', opts=('DATA.NUM_WORKERS', '2')),
                   timeout=HANG_LIMIT, env={'REL_INJECT': 'fail'})
    assert r.code not in (0, 143), r.console[-4000:]
    assert 'injected failure in a DataLoader worker' in r.err
    assert time.time() - start < HANG_LIMIT


@MULTI_RANK
def test_unexpected_error_on_one_rank_ends_the_torchrun_job(cfg, digits, workdir, launcher):
    """The same on rank 1 of a 2-rank torchrun job (DIST_TIMEOUT left at its 600 s default): torchrun and
    both ranks end well within HANG_LIMIT, the job reports the failure."""
    output = str(workdir / 'runs')
    start = time.time()
    r = torchrun(launcher, *main_args(cfg, digits, output, 'rank-error', opts=('DATA.NUM_WORKERS', '1')),
                 timeout=HANG_LIMIT + 30, env={'REL_INJECT': 'fail', 'REL_FAIL_RANK': '1'})
    elapsed = time.time() - start
    assert r.code != 0, r.console[-4000:]
    assert 'injected failure in a DataLoader worker' in r.console
    assert elapsed < HANG_LIMIT + 30, elapsed


# ----------------------------------------------------------------------------- rows 2, 11 and 13: one 2-rank run
# A tiny PVT-v1 (its official final norm is unused in the forward, so DDP needs find_unused_parameters)
TINY_PVT_YAML = f"""
BASE: ['{os.path.join(ROOT, 'cfgs', 'pvt_t.yaml')}']
MODEL:
  NAME: {MODEL_NAME}
  NUM_CLASSES: 10
  PVT:
    DEPTHS: [1, 1, 1, 1]
    EMBED_DIMS: [8, 16, 16, 16]
    NUM_HEADS: [1, 1, 1, 1]
    MLP_RATIOS: [1, 1, 1, 1]
DATA:
  IMG_SIZE: 32
  BATCH_SIZE: 10
  NUM_WORKERS: 0
TRAIN:
  EPOCHS: 1
  WARMUP_EPOCHS: 0
  COOLDOWN_EPOCHS: 0
AUG:
  AUTO_AUGMENT: none
  REPROB: 0.0
  MIXUP: 0.0
  CUTMIX: 0.0
PRINT_FREQ: 1
DIST_TIMEOUT: 60
"""


@pytest.fixture(scope='module')
def ema_2rank(digits, workdir, launcher, fork_server):
    """main_ema.py on 2 gloo ranks (forked by the harness with torchrun's environment: the launcher is not
    the point here) with a tiny PVT-v1 and no --find-unused-params: 1 epoch, 2 steps per rank (40 images /
    2 ranks / batch 10), each rank's EMA checksum recorded at exit. Returns (the job as one Run: exit code 0
    only if both ranks exited 0, their outputs), the run folder, the record folder."""
    output, tag = str(workdir / 'runs'), 'ema-2rank'
    record = workdir / 'ema_record'
    record.mkdir()
    cfg = workdir / 'tiny_pvt.yaml'
    cfg.write_text(TINY_PVT_YAML)
    ranks = run_ranks(fork_server, command=[launcher, *main_args(str(cfg), digits, output, tag, '--model-ema-decay',
                                                                 '0.5', entry='main_ema.py')],
                      timeout=240, env={'REL_INJECT': 'ema', 'REL_EMA_OUT': str(record)})
    job = Run(code=next((r.code for r in ranks if r.code), 0), out='\n----\n'.join(r.out for r in ranks))
    return job, run_dir(output, tag), str(record)


@MULTI_RANK
def test_model_with_unused_parameters_trains_under_ddp(ema_2rank):
    """PVT-v1 declares its unused parameters; DDP is set up for them without --find-unused-params."""
    r, folder, _ = ema_2rank
    r.ok()
    assert os.path.isfile(os.path.join(folder, 'ckpt_epoch_1.pth'))


@MULTI_RANK
def test_one_ema_on_all_ranks(ema_2rank):
    """After the run (2 steps per rank, EMA decay 0.5, so the EMA's starting point still weighs 1/4) the
    EMA weights of rank 0 and rank 1 are bit-identical (sha1 of the state), and the EMA saved in the last
    checkpoint is that EMA."""
    r, folder, record = ema_2rank
    r.ok()
    sums = [open(os.path.join(record, f'ema_rank{k}.txt')).read().split() for k in (0, 1)]
    assert len(sums[0]) == len(sums[1]) == 1                  # one EMA per rank
    assert sums[0] == sums[1], 'the ranks hold different EMA weights'
    import hashlib
    import checkpoint as C
    ema = C.load_checkpoint(os.path.join(folder, 'ckpt_epoch_1.pth'))['model_ema']
    h = hashlib.sha1()
    for k, v in sorted(ema.items()):
        h.update(k.encode())
        h.update(v.cpu().contiguous().numpy().tobytes())
    assert h.hexdigest() == sums[1][-1]


@MULTI_RANK
def test_console_is_quiet_on_two_ranks(ema_2rank):
    """Each distinct warning is printed once per run (by rank 0), the model appears on the console as a
    parameter/FLOPs summary, and its full repr only in the log file."""
    r, folder, _ = ema_2rank
    r.ok()
    console = r.console
    warnings = [re.sub(r'^(\[rank\d\]:)?\[[^]]*\] \([^)]*\): ', '', ln) for ln in console.splitlines()
                if 'Warning' in ln or 'WARNING' in ln]
    repeated = {w for w in warnings if warnings.count(w) > 1}
    assert not repeated, f'warnings printed more than once: {sorted(repeated)[:3]}'
    tree = re.compile(r'^\s+\(\w+\): \w+\(', re.M)          # a line of a module tree: "  (norm1): LayerNorm("
    assert len(tree.findall(console)) == 0, 'the full model repr is on the console'
    log = open(os.path.join(folder, 'log_rank0.txt')).read()
    assert len(tree.findall(log)) > 20
    assert re.search(r'total +[\d,]+', console) and re.search(r'FLOPs +[\d.]+ [MG]', console)


# ----------------------------------------------------------------------------- rows 3, 4, 7, 12: up-front errors
@pytest.fixture(scope='module')
def upfront(cfg, digits, workdir) -> dict:
    """Bad inputs that must each end with exit 2, one ERROR line naming the problem and the fix, and no
    run folder (the check ran before datasets, model or output folder). Each case runs in this process
    (``run_cases``); returns {case: (texts the line must contain, result)}."""
    root = workdir / 'upfront'
    root.mkdir()
    renamed = copy_digits(digits, str(root / 'renamed'))           # val/9 renamed to val/nine
    os.rename(os.path.join(renamed, 'val', '9'), os.path.join(renamed, 'val', 'nine'))
    missing = copy_digits(digits, str(root / 'missing'))           # val lacks class 7
    shutil.rmtree(os.path.join(missing, 'val', '7'))
    bad_yaml = root / 'bad.yaml'                                   # a syntax error on one line
    bad_yaml.write_text(TINY_YAML.replace('  BATCH_SIZE: 8', '  BATCH_SIZE: 8: 16'))
    line_no = TINY_YAML.split('\n').index('  BATCH_SIZE: 8') + 1
    no_base = root / 'child.yaml'                                  # BASE file missing
    no_base.write_text("BASE: ['parent_missing.yaml']\nDATA:\n  BATCH_SIZE: 8\n")
    cases = [  # name, cfg, data, extra, opts, texts the error line must contain
        ('class-renamed', cfg, renamed, [], [], ["'9'", "'nine'", 'train', 'val']),
        ('class-missing', cfg, missing, [], [], ["'7'", 'only in train']),
        ('class-count', cfg, digits, [], ['MODEL.NUM_CLASSES', '7'], ['MODEL.NUM_CLASSES 10']),
        ('mixup-batch-1', cfg, digits, ['--batch-size', '1'], ['AUG.MIXUP', '0.8'], ['DATA.BATCH_SIZE', 'AUG.MIXUP']),
        ('mixup-odd', cfg, digits, ['--batch-size', '7'], ['AUG.CUTMIX', '1.0'], ['DATA.BATCH_SIZE', 'even']),
        ('yaml-syntax', str(bad_yaml), digits, [], [], [str(bad_yaml), f'line {line_no}']),
        ('base-missing', str(no_base), digits, [], [], ['parent_missing.yaml', str(no_base), 'BASE']),
        ('resume-missing', cfg, digits, ['--resume', str(root / 'no_such.pth')], [], ['--resume', 'no_such.pth']),
        ('swin-key-on-pvt', os.path.join(ROOT, 'cfgs', 'pvt_t.yaml'), digits, [],
         ['MODEL.NUM_CLASSES', '10', 'MODEL.SWIN.DEPTHS', '[1, 1, 1, 1]'], ['MODEL.SWIN.DEPTHS', 'MODEL.TYPE']),
    ]
    argvs = []
    for name, c, d, extra, opts, _ in cases:
        argv = ['--cfg', c, '--data-path', d, '--output', str(root / 'out'), '--tag', name, '--device', 'cpu', *extra]
        argvs.append((argv + (['--opts', *opts] if opts else []), run_dir(str(root / 'out'), name)))
    results = run_cases(argvs)
    for (argv, _), res in zip(argvs, results):
        res['argv'] = argv
    return {name: (expect, res) for (name, *_, expect), res in zip(cases, results)}


def check_upfront(upfront: dict, *names: str) -> List[str]:
    """The error lines of ``names``, after checking each case's exit code, line, texts and folder."""
    lines = []
    for name in names:
        expect, res = upfront[name]
        got = [ln for ln in res['stderr'].strip().splitlines() if ln.strip()]
        assert res['rc'] == ERROR and len(got) == 1 and got[0].startswith('ERROR: '), \
            f"{name}: rc={res['rc']} stderr={res['stderr'][-800:]}"
        assert all(e in got[0] for e in expect), f'{name}: {got[0]} lacks one of {expect}'
        assert not res['folder'], f'{name}: the run folder was created before the error'
        lines.append(got[0])
    return lines


def test_train_and_val_class_lists_are_compared(upfront):
    """A renamed or missing val class folder: an error naming the differing classes, no silent shift."""
    check_upfront(upfront, 'class-renamed', 'class-missing')


def test_mixup_with_an_odd_batch_is_a_config_error(upfront):
    """Batch 1 (crashed inside Mixup) and batch 7 (silently dropped an image per step) with Mixup/CutMix."""
    check_upfront(upfront, 'mixup-batch-1', 'mixup-odd')


def test_swin_keys_with_a_pvt_type_are_an_error(upfront):
    """MODEL.SWIN.DEPTHS set with a PVT MODEL.TYPE (was silently ignored): named in the error."""
    check_upfront(upfront, 'swin-key-on-pvt')


def test_yaml_base_and_resume_errors(upfront):
    """The YAML line number is kept; a missing BASE names the BASE entry and its YAML, not --cfg; a
    missing --resume file is reported before any dataset, model or output folder is made."""
    line = check_upfront(upfront, 'yaml-syntax', 'base-missing', 'resume-missing')[1]
    assert '--cfg' not in line, line


def test_class_count_advice_is_not_circular(cfg, upfront):
    """Train has 10 classes, val 9 (case 'class-missing', MODEL.NUM_CLASSES 10): following the error's
    advice on MODEL.NUM_CLASSES must never lead back to a value the run already rejected (it was 'use 9'
    for val, then 'use 10' for train). With consistent splits the advice is the real class count."""
    line = check_upfront(upfront, 'class-count')[0]
    assert re.findall(r'--opts MODEL\.NUM_CLASSES (\d+)', line) == ['10']
    _, res = upfront['class-missing']
    data = res['argv'][res['argv'].index('--data-path') + 1]
    tried = ['10']
    for _ in range(3):
        assert res['rc'] == ERROR, res
        line = one_error_line(res['stderr'])
        advice = re.findall(r'--opts MODEL\.NUM_CLASSES (\d+)', line)
        if not advice:
            assert "'7'" in line, line          # names the class folder val/ lacks
            return
        assert advice[0] not in tried, f'circular advice after trying {tried}: {line}'
        tried.append(advice[0])
        output = os.path.join(os.path.dirname(data), 'class-count')
        argv = ['--cfg', cfg, '--data-path', data, '--output', output, '--device', 'cpu',
                '--opts', 'MODEL.NUM_CLASSES', tried[-1]]
        res = run_cases([(argv, output)])[0]
    pytest.fail(f'advice kept changing: {tried}')


# ----------------------------------------------------------------------------- rows 5, 8, 10: data that ran wrong
@pytest.fixture(scope='module')
def data_runs(cfg, digits, workdir) -> dict:
    """Four runs in this process (``run_cases``), each on its own copy of the digits:
    'mixed': train 1 epoch at IMG_SIZE 32 with 40, 24 and 48 px images added to train and val;
    'loops': --eval with val/3/again -> . , val/5/up -> .. and a text file in val/6;
    'deep': --eval on a val split saved as 16-bit PNGs (8-bit values x 257);
    'short': Mixup, batch 10, SKIP_BAD_IMAGES, 10 train images of which 9 are unreadable."""
    mixed = copy_digits(digits, str(workdir / 'mixed'))
    rng = np.random.RandomState(0)
    for split in ('train', 'val'):
        for cls, side in (('1', 40), ('2', 24), ('3', 48)):
            pixels = rng.randint(0, 256, (side, side, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(mixed, split, cls, f'odd_{side}.png'))
    loops = copy_digits(digits, str(workdir / 'loops'))
    os.symlink('.', os.path.join(loops, 'val', '3', 'again'))
    os.symlink('..', os.path.join(loops, 'val', '5', 'up'))
    open(os.path.join(loops, 'val', '6', 'notes.txt'), 'w').write('not an image')
    deep = copy_digits(digits, str(workdir / 'deep'))
    for root, _, files in os.walk(os.path.join(deep, 'val')):
        for f in files:
            gray = np.asarray(Image.open(os.path.join(root, f)).convert('L'), dtype=np.uint16) * 257
            Image.fromarray(gray).save(os.path.join(root, f))
    short = str(workdir / 'short')            # one train image per class, 9 of the 10 unreadable
    shutil.copytree(os.path.join(digits, 'val'), os.path.join(short, 'val'))
    for cls in range(10):
        os.makedirs(os.path.join(short, 'train', str(cls)))
        target = os.path.join(short, 'train', str(cls), 'only.png')
        if cls == 0:
            shutil.copy(os.path.join(digits, 'val', '0', sorted(os.listdir(os.path.join(digits, 'val', '0')))[0]), target)
        else:
            open(target, 'w').write('not an image')
    output = str(workdir / 'runs')
    cases = {'mixed': (mixed, []), 'loops': (loops, ['--eval']), 'deep': (deep, ['--eval']),
             'short': (short, ['--batch-size', '10', '--opts', 'DATA.SKIP_BAD_IMAGES', 'True', 'AUG.MIXUP', '0.8'])}
    argvs = [(['--cfg', cfg, '--data-path', d, '--output', output, '--tag', f'data-{n}', '--device', 'cpu', *extra],
              run_dir(output, f'data-{n}')) for n, (d, extra) in cases.items()]
    return {n: (cases[n][0], res) for n, res in zip(cases, run_cases(argvs))}


def test_small_image_path_resizes_mixed_sizes(data_runs):
    """IMG_SIZE 32 (the small-image path) on folders that also hold 40, 24 and 48 px images: the run
    trains and validates all 23 val images."""
    _, res = data_runs['mixed']
    assert res['rc'] == 0, res['stdout'][-3000:] + res['stderr'][-3000:]
    assert re.search(r'on the 23 test images', res['stdout']), res['stdout'][-2000:]


def test_batch_shortened_by_skipped_images_with_mixup(data_runs):
    """The one batch of the epoch keeps 1 of its 10 images (9 unreadable, skipped): with Mixup on, the run
    neither crashes nor trains on an empty batch, and the shortening is logged."""
    _, res = data_runs['short']
    assert res['rc'] == 0, res['stdout'][-3000:] + res['stderr'][-3000:]
    assert 'batch shortened to 1 of 10 images (9 unreadable skipped)' in res['stdout']


def test_symlink_loop_is_followed_once(data_runs):
    """val/3 holds a link to itself and val/5 a link to its parent: every image is listed once, and
    the scan says what it skipped (and shows its progress)."""
    data, res = data_runs['loops']
    out = res['stdout']
    assert res['rc'] == 0, out[-3000:] + res['stderr'][-3000:]
    assert re.search(rf'on the {N_VAL} test images', out), out[-2000:]
    val_dir = os.path.join(data, 'val')
    report = re.search(rf'{re.escape(val_dir)}: (\d+) images in 10 classes \(skipped (.*)\)', out)
    assert report and int(report.group(1)) == N_VAL, out[-2000:]
    assert '1 non-image files' in report.group(2) and '2 directories' in report.group(2), report.group(2)
    assert re.search(rf'scanning {re.escape(val_dir)}: 5/10 classes', out)   # scan progress


def test_16bit_and_float_images_are_scaled_not_clipped(data_runs, workdir):
    """16-bit PNGs and float TIFFs load with the right 8-bit scaling (compared with numpy), and a run on
    a folder of 16-bit images warns once; a float image outside [0, 1] is refused naming the file."""
    from data.cached_image_folder import load_image
    from errors import DataError
    ramp16 = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)       # 0 .. 65520
    ramp_f = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    p16, pf, pbad = (str(workdir / n) for n in ('ramp16.png', 'rampf.tif', 'bad_float.tif'))
    Image.fromarray(ramp16).save(p16)
    Image.fromarray(ramp_f).save(pf)
    Image.fromarray(ramp_f * 3).save(pbad)
    for path, ref in ((p16, ramp16.astype(np.float64) * 255 / 65535), (pf, ramp_f.astype(np.float64) * 255)):
        got = np.asarray(load_image(path))
        assert got.shape == (64, 64, 3) and (got == got[..., :1]).all()
        assert np.abs(got[..., 0] - ref).max() <= 0.5 + 1e-6, path
    with pytest.raises(DataError, match='bad_float.tif'):
        load_image(pbad)
    _, res = data_runs['deep']
    assert res['rc'] == 0, res['stdout'][-3000:] + res['stderr'][-3000:]
    assert (res['stdout'] + res['stderr']).count('more than 8 bits per channel') == 1


# ----------------------------------------------------------------------------- rows 9 and 12 on a finished run
@pytest.fixture(scope='module')
def finished_run(cfg, digits, workdir) -> Tuple[Run, str]:
    """A finished 1-epoch training run (tag 'finished'), in this process."""
    output = str(workdir / 'runs')
    r = run_main(main_args(cfg, digits, output, 'finished')[1:]).ok()
    return r, run_dir(output, 'finished')


@pytest.fixture(scope='module')
def after_run(finished_run, cfg, digits, workdir) -> dict:
    """On copies of the finished run: 'eval' = --eval --resume its checkpoint with its --output/--tag;
    'changed' = training again into it with another model size (auto-resume finds the old checkpoint).
    Returns {case: (folder, files before, result)}."""
    output = str(workdir / 'after')
    cases, folders = {}, {}
    for name, extra, opts in (('eval', ['--eval', '--resume', None], []),
                              ('changed', [], ['--opts', 'MODEL.SWIN.EMBED_DIM', '24'])):
        folder = run_dir(output, name)
        shutil.copytree(finished_run[1], folder)
        extra = [x if x is not None else os.path.join(folder, 'ckpt_epoch_1.pth') for x in extra]
        before = {f: open(os.path.join(folder, f), 'rb').read() for f in sorted(os.listdir(folder))}
        cases[name] = ['--cfg', cfg, '--data-path', digits, '--output', output, '--tag', name, '--device', 'cpu',
                       *extra, *opts]
        folders[name] = (folder, before)
    results = run_cases([(argv, folders[n][0]) for n, argv in cases.items()])
    return {n: (*folders[n], res) for n, res in zip(cases, results)}


def test_eval_leaves_the_training_run_files_alone(after_run):
    """--eval --resume <run>/ckpt with the run's own --output/--tag: the run's config.yaml, log, metrics and
    checkpoints are byte-identical afterwards; the evaluation's files are in the eval/ sub-folder."""
    folder, before, res = after_run['eval']
    assert res['rc'] == 0, res['stdout'][-2000:] + res['stderr'][-2000:]
    changed = [f for f, data in before.items() if open(os.path.join(folder, f), 'rb').read() != data]
    assert not changed, f'evaluation modified the training run files {changed}'
    assert os.path.isfile(os.path.join(folder, 'eval', 'config.yaml'))
    assert 'Accuracy of the network' in open(os.path.join(folder, 'eval', 'log_rank0.txt')).read()


def test_auto_resume_into_another_models_run_says_so(after_run):
    """Auto-resume finds a checkpoint of another model size in the output folder: the error says that the
    folder holds another run and how to start this one (own --output/--tag or TRAIN.AUTO_RESUME False)."""
    folder, before, res = after_run['changed']
    assert res['rc'] == ERROR, res['stdout'][-2000:] + res['stderr'][-2000:]
    line = one_error_line(res['stderr'])
    assert folder in line and 'TRAIN.AUTO_RESUME' in line and '--tag' in line, line
    assert all(open(os.path.join(folder, f), 'rb').read() == d for f, d in before.items() if f.endswith('.pth'))


def test_end_of_run_summary_is_printed_and_written(finished_run):
    """The summary (best Acc@1 and its epoch, checkpoints) on the console and in summary.json, checked
    against the epoch records of metrics.jsonl and the files in the folder."""
    r, folder = finished_run
    assert 'run summary' in r.out
    recs = read_records(folder)
    summary = json.load(open(os.path.join(folder, 'summary.json')))
    assert [rec['epoch'] for rec in recs] == [1] and summary['epochs'] == 1
    assert summary['best'] == {'acc1': recs[0]['val_acc1'], 'epoch': 1}
    assert f"{recs[0]['val_acc1']:.2f}%" in open(os.path.join(folder, 'summary.txt')).read()
    assert summary['checkpoints'] == sorted(f for f in os.listdir(folder) if f.endswith('.pth'))
    assert summary['skipped_steps'] == 0 and summary['skipped_images'] == 0
    assert summary['images_per_s'] > 0
    assert open(os.path.join(folder, 'summary.txt')).read().startswith('run summary')
