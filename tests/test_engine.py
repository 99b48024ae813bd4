"""End-to-end tests of the training/evaluation engine on the embedded digits data (CPU, gloo).

A tiny FLatten-Swin (32 px, one block per stage) is trained for a few epochs on a stratified subset of
scikit-learn's digits (300 train, 99 val images: an odd count, so two ranks get unequal shards).
References are independent of the engine: a hand-written evaluation loop over the PNG files, exact
equality of weights against an uninterrupted run, and chance level (10%).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import traceback

import numpy as np
import pytest
import torch
from PIL import Image

import engine
import main as entry
import runner
from config import get_config, load_config
from models import build_model
from harness import MULTI_RANK, count_images, free_port, read_records, run_main, run_ranks
from utils import PREEMPTED_EXIT_CODE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(ROOT, 'cfgs', 'demo', 'flatten_swin_digits.yaml')
NAME = 'flatten_swin_digits'
TINY = ['DATA.IMG_SIZE', '32', 'MODEL.SWIN.PATCH_SIZE', '4', 'MODEL.SWIN.EMBED_DIM', '16',
        'MODEL.SWIN.DEPTHS', '[1, 1, 1, 1]', 'MODEL.SWIN.NUM_HEADS', '[1, 1, 2, 2]',
        'DATA.BATCH_SIZE', '32', 'DATA.NUM_WORKERS', '0', 'TRAIN.EPOCHS', '3', 'TRAIN.WARMUP_EPOCHS', '0',
        'TRAIN.BASE_LR', '0.032', 'TRAIN.MIN_LR', '0.0016', 'TRAIN.KEEP_CHECKPOINTS', '2', 'SAVE_FREQ', '1',
        'PRINT_FREQ', '4', 'MODEL_EMA.ENABLE', 'True', 'MODEL_EMA.DECAY', '0.8', 'MODEL.DROP_PATH_RATE', '0.1']
N_VAL = 99


def args(data: str, out: str, *flags: str, opts: tuple = ()) -> list:
    return ['--cfg', CFG, '--data-path', data, '--output', out, *flags, '--opts', *TINY, *opts]


def run_engine(argv: list) -> engine.RunResult:
    """main.main(argv) in this process (harness.run_main); the trainer's RunResult of the finished run."""
    return run_main(argv).ok().result


def run_dir(out: str, tag: str = 'default') -> str:
    return os.path.join(out, NAME, tag)


def metrics(folder: str) -> list:
    """The per-epoch records of a run's metrics.jsonl, read without our reader."""
    return read_records(folder, 'epoch')


def acc_text(rec: dict, prefix: str = 'val') -> tuple:
    """A record's (Acc@1, Acc@5) as the log prints them (3 decimals)."""
    return f"{rec[prefix + '_acc1']:.3f}", f"{rec[prefix + '_acc5']:.3f}"


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def logged(path: str, pattern: str) -> list:
    with open(path) as f:
        return re.findall(pattern, f.read())


@pytest.fixture(scope='module')
def baseline(digits, tmp_path_factory):
    """An uninterrupted 3-epoch run with EMA (the reference for resume tests) on the shared digits."""
    assert count_images(digits) == {'train': 300, 'val': N_VAL}
    out = str(tmp_path_factory.mktemp('baseline'))
    result = run_engine(args(digits, out))
    return out, result


def naive_eval(model: torch.nn.Module, val_dir: str) -> tuple:
    """(top-1 %, top-5 %) over the val PNGs with a hand-written pipeline (32 px: no resize)."""
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    files = sorted(glob.glob(os.path.join(val_dir, '*', '*.png')))
    x = np.stack([(np.asarray(Image.open(f).convert('RGB'), np.float64) / 255 - mean) / std for f in files])
    labels = torch.tensor([int(os.path.basename(os.path.dirname(f))) for f in files])
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x).permute(0, 3, 1, 2).float())
    top5 = logits.topk(5, dim=1).indices
    return (100.0 * (top5[:, 0] == labels).sum().item() / len(files),
            100.0 * (top5 == labels[:, None]).any(1).sum().item() / len(files))


# ----------------------------------------------------------------------------- training and outputs
def test_train_single_process(baseline, digits):
    out, result = baseline
    run = run_dir(out)
    assert result.epochs_done == 3 and result.skipped_steps == 0
    assert result.eval.count == N_VAL
    assert result.eval.acc1 > 50.0, 'far above chance (10%)'
    assert os.path.isfile(os.path.join(run, 'config.yaml'))
    # checkpoints: the last TRAIN.KEEP_CHECKPOINTS epochs, the best model and the best EMA
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(run, '*.pth')))
    assert names == ['ckpt_epoch_2.pth', 'ckpt_epoch_3.pth', 'max_acc.pth', 'max_ema_acc.pth']
    ckpt = torch.load(os.path.join(run, 'ckpt_epoch_3.pth'), weights_only=True)
    assert {'model', 'optimizer', 'lr_scheduler', 'scaler', 'model_ema', 'epoch', 'max_accuracy',
            'max_ema_accuracy', 'config'} <= set(ckpt)
    assert ckpt['epoch'] == 3 and isinstance(ckpt['config'], str) and 'flatten_swin' in ckpt['config']
    assert states_equal(ckpt['model'], result.model.state_dict())
    assert states_equal(ckpt['model_ema'], result.ema_model.state_dict())
    assert not states_equal(ckpt['model_ema'], ckpt['model'])
    # metrics.jsonl: one record per epoch (the model's and the EMA's accuracies, the last step's lr)
    recs = metrics(run)
    assert [r['epoch'] for r in recs] == [1, 2, 3] and [r['step'] for r in recs] == [9, 18, 27]
    for r in recs:
        assert r['skipped_steps'] == 0 and r['bad_images'] == 0
        assert all(r[k] > 0 for k in ('lr', 'train_loss', 'grad_norm', 'val_loss', 'images_per_s', 'epoch_time_s',
                                      'peak_mem_mb'))
        assert 0 <= r['val_acc1'] <= r['val_acc5'] <= 100 and 0 <= r['ema_acc1'] <= r['ema_acc5'] <= 100
    assert recs[-1]['val_acc1'] == pytest.approx(result.eval.acc1) and recs[0]['train_loss'] > recs[-1]['train_loss']
    assert (recs[-1]['val_acc1'], recs[-1]['ema_acc1']) == (result.eval.acc1, result.ema_eval.acc1)
    assert recs[0]['lr'] > recs[1]['lr'] > recs[2]['lr'] > 0                  # cosine decay, no warm-up
    # summary.json: the run's totals, from the same records
    summary = json.load(open(os.path.join(run, 'summary.json')))
    assert summary['epochs'] == 3 and summary['final_acc1'] == recs[-1]['val_acc1']
    best = max(recs, key=lambda r: (r['val_acc1'], r['epoch']))              # the latest of equals
    assert summary['best']['acc1'] == best['val_acc1'] and summary['best']['epoch'] == best['epoch']
    assert summary['checkpoints'] == names and summary['skipped_steps'] == 0
    # the official console lines (users' scripts parse them) print those numbers
    log = open(os.path.join(run, 'log_rank0.txt')).read()
    for r in recs:
        for prefix in ('val', 'ema'):
            assert ' * Acc@1 {} Acc@5 {}'.format(*acc_text(r, prefix)) in log, (r, prefix)
        assert f"Train: [{r['epoch']}/3][9/9]\teta " in log and f" lr {r['lr']:.6f}\ttime " in log, r
    assert f'Accuracy of the network on the {N_VAL} test images: {result.eval.acc1:.1f}%' in log


def test_eval_reproduces_logged_accuracy(baseline, digits, tmp_path):
    out, result = baseline
    ckpt = os.path.join(run_dir(out), 'ckpt_epoch_3.pth')
    ev = run_engine(args(digits, str(tmp_path), '--eval', '--resume', ckpt))
    last = metrics(run_dir(out))[-1]                  # its figures equal the log lines (test_train_single_process)
    assert (f'{ev.eval.acc1:.3f}', f'{ev.eval.acc5:.3f}') == acc_text(last)
    assert ev.eval.count == N_VAL
    ref1, ref5 = naive_eval(ev.model, os.path.join(digits, 'val'))
    assert ev.eval.acc1 == pytest.approx(ref1, abs=1e-9) and ev.eval.acc5 == pytest.approx(ref5, abs=1e-9)
    # the EMA weights evaluate as the EMA's logged accuracy
    assert f'{ev.ema_eval.acc1:.3f}' == acc_text(last, 'ema')[0]
    # the evaluation's record, in the evaluation's own folder
    recs = [json.loads(x) for x in open(os.path.join(eval_files_dir(digits, tmp_path, ckpt), 'metrics.jsonl'))]
    assert [(r['kind'], r['checkpoint']) for r in recs] == [('eval', ckpt)]
    assert (recs[0]['val_acc1'], recs[0]['ema_acc1']) == (ev.eval.acc1, ev.ema_eval.acc1)


def test_eval_resume_not_replaced_by_auto_resume(baseline, digits, tmp_path):
    out = str(tmp_path / 'out')
    shutil.copytree(baseline[0], out)
    older = os.path.join(run_dir(out), 'ckpt_epoch_2.pth')
    ev = run_engine(args(digits, out, '--eval', '--resume', older))      # OUTPUT also holds epoch 3
    ref1, _ = naive_eval(_load(older), os.path.join(digits, 'val'))
    assert ev.eval.acc1 == pytest.approx(ref1, abs=1e-9)
    assert states_equal(ev.model.state_dict(), torch.load(older, weights_only=True)['model'])


def eval_files_dir(data: str, out, ckpt: str) -> str:
    """Where an --eval run with these arguments writes its config, log and metrics."""
    return runner.files_dir(get_config(entry.build_parser().parse_args(args(data, str(out), '--eval', '--resume', ckpt))))


def _load(path: str, opts: tuple = ()) -> torch.nn.Module:
    model = build_model(load_config(CFG, TINY + list(opts)))
    model.load_state_dict(torch.load(path, weights_only=True)['model'])
    return model


# ----------------------------------------------------------------------------- resume
def _copy_until(out: str, tmp: str, epoch: int) -> str:
    """A copy of the baseline run folder as if it had stopped after ``epoch``."""
    dst = os.path.join(tmp, 'out')
    shutil.copytree(out, dst)
    for p in glob.glob(os.path.join(run_dir(dst), '*.pth')):
        if os.path.basename(p) != f'ckpt_epoch_{epoch}.pth':
            os.remove(p)
    return dst


def test_auto_resume_matches_uninterrupted(baseline, digits, tmp_path):
    out, ref = baseline
    dst = _copy_until(out, str(tmp_path), 2)
    assert [r['epoch'] for r in metrics(run_dir(dst))] == [1, 2, 3]      # epoch 3 written, its checkpoint lost
    result = run_engine(args(digits, dst))
    assert result.epochs_done == 1
    assert states_equal(result.model.state_dict(), ref.model.state_dict())
    assert states_equal(result.ema_model.state_dict(), ref.ema_model.state_dict())
    assert result.max_accuracy == ref.max_accuracy
    # epoch 3 replayed: recorded once, with the uninterrupted run's figures
    recs, base = metrics(run_dir(dst)), metrics(run_dir(out))
    assert [r['epoch'] for r in recs] == [1, 2, 3]
    assert [(r['val_acc1'], r['ema_acc1'], r['train_loss']) for r in recs] == \
        [(r['val_acc1'], r['ema_acc1'], r['train_loss']) for r in base]


def test_preemption_mid_epoch_then_resume(baseline, digits, tmp_path, monkeypatch):
    out, ref = baseline
    dst = _copy_until(out, str(tmp_path), 2)
    calls = {'n': 0}
    real_build = runner.build_model

    def build_with_sigterm(config):
        model = real_build(config)

        def hook(module, inputs):
            if module.training:
                calls['n'] += 1
                if calls['n'] == 4:                 # during step index 3 of epoch 3
                    os.kill(os.getpid(), signal.SIGTERM)
        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(runner, 'build_model', build_with_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    code = entry.main(args(digits, dst))
    assert code == PREEMPTED_EXIT_CODE == 143
    preempt = os.path.join(run_dir(dst), engine.PREEMPT_CHECKPOINT)
    saved = torch.load(preempt, weights_only=True)
    assert (saved['epoch'], saved['step']) == (2, 4)
    assert signal.getsignal(signal.SIGTERM) == before                # handler restored
    monkeypatch.setattr(runner, 'build_model', real_build)
    result = run_engine(args(digits, dst))                          # auto-resumes mid-epoch
    assert states_equal(result.model.state_dict(), ref.model.state_dict())
    assert states_equal(result.ema_model.state_dict(), ref.ema_model.state_dict())
    assert not os.path.exists(preempt)
    recs = metrics(run_dir(dst))
    assert [r['epoch'] for r in recs] == [1, 2, 3]                           # each epoch exactly once
    assert recs[-1]['val_acc1'] == metrics(run_dir(out))[-1]['val_acc1']


# ----------------------------------------------------------------------------- distributed
@MULTI_RANK
def test_two_ranks_train_and_exact_validation(digits, tmp_path, fork_server):
    """2-process gloo training (two ``python main.py`` processes with torchrun's environment, forked by the
    harness: torchrun itself is tested in test_elastic.py / test_reliability.py); its final 2-rank validation
    (shards of 50 and 49 images) equals the single-process evaluation of the saved weights and the
    hand-written reference."""
    out = str(tmp_path / 'ddp')
    ranks = run_ranks(fork_server, args(digits, out, opts=('TRAIN.EPOCHS', '2', 'MODEL_EMA.ENABLE', 'False',
                                                           'DATA.BATCH_SIZE', '16', 'DIST_TIMEOUT', '120')),
                      timeout=400)
    assert [r.code for r in ranks] == [0, 0], '\n----\n'.join(r.out[-3000:] for r in ranks)
    log = open(os.path.join(run_dir(out), 'log_rank0.txt')).read()
    assert 'rank 0/2 on cpu' in log
    assert f'Accuracy of the network on the {N_VAL} test images' in log      # both shards, all 99
    recs = metrics(run_dir(out))                                             # rank 0 alone writes it
    assert [r['epoch'] for r in recs] == [1, 2]
    acc = acc_text(recs[-1])
    assert float(acc[0]) > 40.0
    ckpt = os.path.join(run_dir(out), 'ckpt_epoch_2.pth')
    single = run_engine(args(digits, str(tmp_path / 'eval'), '--eval', '--resume', ckpt,
                             opts=('MODEL_EMA.ENABLE', 'False')))
    assert (f'{single.eval.acc1:.3f}', f'{single.eval.acc5:.3f}') == acc
    ref1, ref5 = naive_eval(_load(ckpt), os.path.join(digits, 'val'))
    assert single.eval.acc1 == pytest.approx(ref1, abs=1e-9) and single.eval.acc5 == pytest.approx(ref5, abs=1e-9)


@pytest.mark.parametrize('compiled', [False, True])
def test_ddp_reducer_released_before_the_group_is_destroyed(compiled):
    """runner.run frees the DDP reducer (and the DDP logger that holds it) before destroy_process_group: under
    torch 2.11 a reducer outliving its group deadlocked gloo at exit (2-rank runs hung after their last
    checkpoint). After the release no attribute of the wrapper holds a reducer or logger any more."""
    import torch.distributed as dist

    from utils import release_ddp_reducer
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
        ddp(torch.randn(3, 4)).sum().backward()
        held = (dist.Reducer, dist.Logger)
        assert any(isinstance(v, held) for v in vars(ddp).values())        # what the release must remove
        wrapper = torch.compile(ddp) if compiled else ddp
        release_ddp_reducer(wrapper)
        assert not any(isinstance(v, held) for v in vars(ddp).values())
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_torchrun_nccl(digits, tmp_path):
    n = min(2, torch.cuda.device_count())
    out = str(tmp_path / 'nccl')
    cmd = ['torchrun', f'--nproc_per_node={n}', f'--master_port={free_port()}', os.path.join(ROOT, 'main.py'),
           *args(digits, out, '--device', 'cuda', opts=('TRAIN.EPOCHS', '2'))]
    # a short limit: on the GPU machine this runs inside a 10-minute call (the run itself takes ~30 s)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert logged(os.path.join(run_dir(out), 'log_rank0.txt'), rf'rank 0/{n} on cuda')


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_float16_gradscaler_checkpointed(digits, tmp_path):
    result = run_engine(args(digits, str(tmp_path), '--amp', '--amp-dtype', 'float16', '--device', 'cuda',
                             opts=('TRAIN.EPOCHS', '2')))
    assert result.eval.acc1 > 30.0
    ckpt = torch.load(os.path.join(run_dir(str(tmp_path)), 'ckpt_epoch_2.pth'), weights_only=True)
    assert isinstance(ckpt['scaler'], dict) and ckpt['scaler']['scale'] > 0


# ----------------------------------------------------------------------------- precision, errors, options
def test_amp_bfloat16_on_cpu(digits, tmp_path):
    result = run_engine(args(digits, str(tmp_path), '--amp', '--amp-dtype', 'bfloat16',
                             opts=('TRAIN.EPOCHS', '2', 'MODEL_EMA.ENABLE', 'False')))
    assert result.skipped_steps == 0
    assert result.eval.acc1 > 30.0
    ckpt = torch.load(os.path.join(run_dir(str(tmp_path)), 'ckpt_epoch_2.pth'), weights_only=True)
    assert ckpt['scaler'] is None                                   # bfloat16 needs no loss scaling


def _error_of(capsys, argv: list) -> str:
    code = entry.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith('ERROR: '), err
    return err[0]


def test_mismatched_checkpoint_is_a_clear_error(digits, tmp_path, capsys):
    other = build_model(load_config(CFG, TINY + ['MODEL.SWIN.EMBED_DIM', '24', 'MODEL.NUM_CLASSES', '7']))
    path = str(tmp_path / 'other.pth')
    torch.save({'model': other.state_dict()}, path)
    msg = _error_of(capsys, args(digits, str(tmp_path), '--eval', '--resume', path))
    assert 'other.pth' in msg and 'shape' in msg and '--cfg' in msg


def test_class_count_mismatch_fails_at_start(digits, tmp_path, capsys):
    msg = _error_of(capsys, args(digits, str(tmp_path), opts=('MODEL.NUM_CLASSES', '7')))
    assert 'has 10 classes' in msg and '--opts MODEL.NUM_CLASSES 10' in msg
    assert not glob.glob(os.path.join(run_dir(str(tmp_path)), '*.pth'))


def test_missing_data_path_fails_at_start(tmp_path, capsys):
    msg = _error_of(capsys, args(str(tmp_path / 'nowhere'), str(tmp_path)))
    assert '--data-path' in msg and 'nowhere' in msg


def test_nonfinite_steps_stop_the_run(digits, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner, 'build_criterion',
                        lambda config, mixup: (lambda out, tgt: out.sum() * float('nan')))
    msg = _error_of(capsys, args(digits, str(tmp_path), opts=('TRAIN.MAX_NONFINITE_STEPS', '3')))
    assert 'non-finite' in msg and 'epoch 1 step 3' in msg
    assert not glob.glob(os.path.join(run_dir(str(tmp_path)), '*.pth'))


def test_pretrained_resizes_64_to_96(digits, tmp_path):
    src = build_model(load_config(CFG, TINY + ['DATA.IMG_SIZE', '64']))
    path = str(tmp_path / 'pre64.pth')
    torch.save({'model': src.state_dict()}, path)
    result = run_engine(args(digits, str(tmp_path), '--eval', '--pretrained', path,
                             opts=('DATA.IMG_SIZE', '96', 'MODEL_EMA.ENABLE', 'False')))
    dst = result.model.state_dict()
    key = 'layers.0.blocks.0.attn.positional_encoding'
    assert src.state_dict()[key].shape[1] == 16 * 16 and dst[key].shape[1] == 24 * 24
    grid = src.state_dict()[key].reshape(1, 16, 16, -1).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(24, 24), mode='bicubic').permute(0, 2, 3, 1).reshape(1, 576, -1)
    assert torch.allclose(dst[key], want, atol=1e-6)
    assert torch.equal(dst['head.weight'], src.state_dict()['head.weight'])
    assert result.eval.count == N_VAL


def test_throughput_mode(digits, tmp_path):
    result = run_engine(args(digits, str(tmp_path), '--throughput', opts=('MODEL_EMA.ENABLE', 'False')))
    assert result.throughput is not None and result.throughput > 0


def test_zip_mode_matches_folder_mode(baseline, digits, tmp_path):
    import zipfile
    out, _ = baseline
    zroot = tmp_path / 'zipdata'
    zroot.mkdir()
    for split in ('train', 'val'):
        files = sorted(glob.glob(os.path.join(digits, split, '*', '*.png')))
        with zipfile.ZipFile(zroot / f'{split}.zip', 'w') as z, open(zroot / f'{split}_map.txt', 'w') as m:
            for f in files:
                member = os.path.relpath(f, os.path.join(digits, split))
                z.write(f, member)
                m.write(f'{member}\t{int(os.path.dirname(member))}\n')
    ckpt = os.path.join(run_dir(out), 'ckpt_epoch_3.pth')
    ev = run_engine(args(str(zroot), str(tmp_path), '--zip', '--eval', '--resume', ckpt,
                         opts=('MODEL_EMA.ENABLE', 'False', 'DATA.CACHE_MODE', 'full')))
    ref1, ref5 = naive_eval(ev.model, os.path.join(digits, 'val'))
    assert ev.eval.count == N_VAL and ev.eval.acc1 == pytest.approx(ref1, abs=1e-9)


# ----------------------------------------------------------------------------- optimizer and schedule
def test_lr_schedules_per_iteration_with_warmup():
    import math as m
    from lr_scheduler import build_scheduler
    steps, base, warm, low = 10, 1e-3, 1e-6, 1e-5

    def lrs(name, extra=()):
        config = load_config(CFG, ['TRAIN.EPOCHS', '4', 'TRAIN.WARMUP_EPOCHS', '1', 'TRAIN.BASE_LR', str(base),
                                   'TRAIN.WARMUP_LR', str(warm), 'TRAIN.MIN_LR', str(low),
                                   'TRAIN.LR_SCHEDULER.NAME', name, *extra])
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
        sched = build_scheduler(config, opt, steps)
        out = []
        for t in range(45):                                  # 40 steps + 5 cooldown steps
            sched.step_update(t)
            out.append(opt.param_groups[0]['lr'])
        return out
    cos, lin = lrs('cosine'), lrs('linear')
    step = lrs('step', ('TRAIN.LR_SCHEDULER.DECAY_EPOCHS', '2', 'TRAIN.LR_SCHEDULER.DECAY_RATE', '0.1'))
    for t in (0, 5):                                          # linear warmup from WARMUP_LR
        for sched in (cos, lin, step):
            assert sched[t] == pytest.approx(warm + t * (base - warm) / 10)
    for t in (10, 25, 39):
        assert cos[t] == pytest.approx(low + 0.5 * (base - low) * (1 + m.cos(m.pi * t / 40)))
        assert lin[t] == pytest.approx(base - (base - 0.01 * base) * (t - 10) / 30)
    assert cos[42] == pytest.approx(low) and lin[42] == pytest.approx(0.01 * base)   # cooldown at the minimum
    assert step[19] == pytest.approx(base) and step[20] == pytest.approx(0.1 * base)


def test_float16_gradscaler_on_cpu_is_checkpointed_and_resumed(digits, tmp_path):
    """The float16 path (autocast + GradScaler) also runs on CPU: its scaler state goes into every
    checkpoint, and a resumed run continues from the saved scale (one scaler per run, not per epoch)."""
    out = str(tmp_path)
    first = run_engine(args(digits, out, '--amp', '--amp-dtype', 'float16',
                            opts=('TRAIN.EPOCHS', '2', 'MODEL_EMA.ENABLE', 'False')))
    assert first.eval.acc1 > 30.0
    path = os.path.join(run_dir(out), 'ckpt_epoch_2.pth')
    ckpt = torch.load(path, weights_only=True)
    assert isinstance(ckpt['scaler'], dict) and ckpt['scaler']['scale'] > 0
    # plant a distinctive scale: a resumed run must carry it on (a fresh scaler would start at 65536 and
    # only grows after 2000 clean steps; an overflow halves it)
    ckpt['scaler']['scale'] = 1024.0
    torch.save(ckpt, path)
    run_engine(args(digits, out, '--amp', '--amp-dtype', 'float16',
                    opts=('TRAIN.EPOCHS', '3', 'MODEL_EMA.ENABLE', 'False')))
    final = torch.load(os.path.join(run_dir(out), 'ckpt_epoch_3.pth'), weights_only=True)
    assert final['epoch'] == 3
    assert final['scaler']['scale'] in (1024.0, 512.0, 256.0)


def test_best_model_is_saved_even_between_save_freq_epochs(digits, tmp_path):
    """SAVE_FREQ larger than the run: only the final epoch checkpoint is periodic, yet max_acc.pth must
    hold the best epoch's weights. Checked independently by re-evaluating the file with --eval."""
    out = str(tmp_path / 'train')
    result = run_engine(args(digits, out, opts=('TRAIN.EPOCHS', '3', 'SAVE_FREQ', '10', 'MODEL_EMA.ENABLE', 'False')))
    run = run_dir(out)
    best = os.path.join(run, 'max_acc.pth')
    assert os.path.isfile(best)
    accs = [r['val_acc1'] for r in metrics(run)]
    assert len(accs) == 3 and result.max_accuracy == pytest.approx(max(accs), abs=1e-9)
    best_epoch = max(range(3), key=lambda i: (accs[i], i)) + 1      # ties: the later epoch is saved
    assert torch.load(best, weights_only=True)['epoch'] == best_epoch
    # epoch 1 is always a new best: it must be written right then, before epoch 2 trains
    with open(os.path.join(run, 'log_rank0.txt')) as f:
        log = f.read()
    assert 'max_acc.pth saved' in log[:log.index('Train: [2/3]')]
    again = run_engine(args(digits, str(tmp_path / 'eval'), '--eval', '--resume', best,
                            opts=('MODEL_EMA.ENABLE', 'False')))
    assert f'{again.eval.acc1:.3f}' == f'{max(accs):.3f}'


# ----------------------------------------------------------------------------- the step: no host synchronisation
def make_trainer(data: str, out: str, opts: tuple = ()) -> engine.Trainer:
    """A Trainer built as ``run`` builds it (single CPU process), without running it."""
    from utils import DistInfo
    config = get_config(entry.build_parser().parse_args(args(data, out, opts=opts)))
    info = DistInfo(device=torch.device('cpu'))
    return runner.build_trainer(runner.setup_run(config, info), info)


SYNC_METHODS = ('item', 'tolist', '__bool__', '__float__', '__int__', '__index__', 'cpu', 'numpy')


@pytest.mark.parametrize('precision', ['float32', 'float16'])
def test_training_step_reads_back_only_at_print_steps(digits, tmp_path, monkeypatch, precision):
    """Every way Python code can pull a tensor value to the host (``.item()``, ``.tolist()``, ``bool()``,
    ``float()``, ``.cpu()``, ``torch.cuda.synchronize`` ...) is counted, attributed to the training step
    whose forward ran last. Data loading is excluded (it works on host tensors). Only the PRINT_FREQ
    steps (4, 8) and the epoch's last step (9) may read back; with Mixup, EMA, clipping, and in
    float16 the GradScaler, all active."""
    opts = ('PRINT_FREQ', '4', 'TRAIN.EPOCHS', '1', 'AUG.MIXUP', '0.8', 'AUG.CUTMIX', '1.0')
    if precision == 'float16':
        opts += ('AMP', 'True', 'AMP_DTYPE', 'float16')
    t = make_trainer(digits, str(tmp_path), opts)
    assert t.steps_per_epoch == 9
    step = {'n': 0}
    t.model_without_ddp.register_forward_pre_hook(lambda m, i: step.__setitem__('n', step['n'] + m.training))
    calls: dict = {}

    def counting(name, original):
        def wrapper(*a, **k):
            if not any(os.sep + os.path.join('torch', 'utils', 'data') in f.filename
                       for f in traceback.extract_stack()[:-1]):
                calls.setdefault(step['n'], []).append(name)
            return original(*a, **k)
        return wrapper
    for name in SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, 'synchronize', counting('cuda.synchronize', torch.cuda.synchronize))
    stats = engine.train_one_epoch(t, 0)
    monkeypatch.undo()
    assert stats.loss_count == 9 * 32 and stats.skipped_steps == 0
    between = {s: c for s, c in calls.items() if s not in (4, 8, 9)}
    assert not between, f'host synchronisation between print steps: {between}'
    assert calls.get(4) and calls.get(8), 'the counting is live: the read-backs at print steps are seen'


def test_nonfinite_step_is_skipped_on_the_device(digits, tmp_path, monkeypatch):
    """A NaN loss at step 2 only (PRINT_FREQ 4): that update is skipped without a read-back -- the weights,
    optimizer state and EMA after step 2 equal those after step 1 -- and the run goes on."""
    t = make_trainer(digits, str(tmp_path), ('PRINT_FREQ', '4', 'TRAIN.EPOCHS', '1'))
    real = t.criterion
    n = {'calls': 0}

    def criterion(out, tgt):
        n['calls'] += 1
        loss = real(out, tgt)
        return loss * float('nan') if n['calls'] == 2 else loss
    t.criterion = criterion
    snaps = []
    real_step = engine.optimizer_step

    def step_and_snapshot(tr):
        row = real_step(tr)
        snaps.append(({k: v.clone() for k, v in tr.model_without_ddp.state_dict().items()},
                      {k: v.clone() for k, v in tr.ema.module.state_dict().items()},
                      [s['step'].clone() for s in tr.optimizer.state.values()]))
        return row
    monkeypatch.setattr(engine, 'optimizer_step', step_and_snapshot)
    stats = engine.train_one_epoch(t, 0)
    assert stats.skipped_steps == 1 and t.skipped_steps == 1 and t.nonfinite_run == 0
    for a, b in zip(snaps[0][:2], snaps[1][:2]):
        assert states_equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(snaps[0][2], snaps[1][2]))       # Adam step count too
    assert not states_equal(snaps[1][0], snaps[2][0])                               # step 3 updates again
    assert all(torch.isfinite(v).all() for v in t.model_without_ddp.state_dict().values() if v.is_floating_point())


def test_compile_trains_like_eager(digits, tmp_path, monkeypatch):
    """TRAIN.COMPILE: three steps of the torch.compile'd model from the same weights and batches end at
    the eager run's weights (float tolerance; SGD, whose update is proportional to the gradient, so
    rounding differences stay small); the saved state keeps the plain keys. The graph is captured by
    dynamo and differentiated by AOTAutograd as in a real run, but executed by the 'aot_eager' backend:
    inductor's C++ code generation takes minutes on a 2-core CI machine (the engine's default backend is
    inductor; the same comparison with it was run by hand)."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda model, **kw: real_compile(model, backend='aot_eager', **kw))
    initial, results = None, []
    for compile_ in ('False', 'True'):
        t = make_trainer(digits, str(tmp_path / compile_), ('TRAIN.EPOCHS', '1', 'TRAIN.COMPILE', compile_,
                                                            'TRAIN.OPTIMIZER.NAME', 'sgd', 'TRAIN.CLIP_GRAD', '0.0',
                                                            'MODEL.DROP_PATH_RATE', '0.0', 'MODEL_EMA.ENABLE', 'False'))
        assert (compile_ == 'True') == (t.model is not t.model_without_ddp)
        if initial is None:
            initial = {k: v.clone() for k, v in t.model_without_ddp.state_dict().items()}
        t.model_without_ddp.load_state_dict(initial)
        loader = iter(t.loader)
        for _ in range(3):
            images, targets, _ = next(loader)
            engine.forward_backward(t, images, targets)
            engine.optimizer_step(t)
        results.append(t.model_without_ddp.state_dict())
    eager, compiled = results
    assert eager.keys() == compiled.keys() == initial.keys()
    assert not states_equal(eager, initial)                                         # it trained
    for k in eager:
        assert torch.allclose(eager[k], compiled[k], rtol=1e-4, atol=1e-6), k


# ----------------------------------------------------------------------------- entry point behaviour
def test_dead_peer_is_one_error_line(digits, tmp_path, capsys, monkeypatch):
    """The RuntimeError the gloo backend raises when a peer dies (message as torch 2.x prints it) ends a
    multi-process run with exit code 2 and one ERROR line naming the cause; the backend's full message
    goes into the log file. An unrelated RuntimeError still propagates (a bug keeps its traceback)."""
    gloo = ('[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer '
            '[127.0.0.1]:15237. This is typically caused by a remote worker crashing.')
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setattr(runner, 'init_distributed', lambda *a, **k: engine.DistInfo(device=torch.device('cpu')))

    def dies(t, loader_val=None):
        raise RuntimeError(gloo)
    monkeypatch.setattr(runner, 'train', dies)
    msg = _error_of(capsys, args(digits, str(tmp_path)))
    assert 'distributed peer failed' in msg and 'Connection closed by peer' in msg and 'rerun' in msg
    assert 'Connection closed by peer' in open(os.path.join(run_dir(str(tmp_path)), 'log_rank0.txt')).read()

    def bug(t, loader_val=None):
        raise RuntimeError('shape mismatch in my new layer')
    monkeypatch.setattr(runner, 'train', bug)
    with pytest.raises(RuntimeError, match='shape mismatch'):
        entry.main(args(digits, str(tmp_path / 'b')))


def test_randaugment_posterize_patch_is_explicit(startup_server):
    """Importing the data package leaves timm's op table alone; ``patch_randaugment_posterize`` (called
    by runner.run) makes RandAugment 'inc1' at its top magnitude (0 bits of posterize, which Pillow >= 12
    rejects) give a black image, as older Pillow did."""
    code = ("import data, timm.data.auto_augment as aa;"
            "print(aa.NAME_TO_OP['PosterizeIncreasing'] is aa.posterize);"
            "print(data.patch_randaugment_posterize(), data.patch_randaugment_posterize());"
            "from PIL import Image; import numpy as np;"
            "op = aa.AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10);"
            "img = Image.new('RGB', (8, 8), (200, 120, 40)); out = op(img);"
            "print(int(np.asarray(out).max()), out.size)")
    proc = startup_server.run(['-c', code], cwd=ROOT)          # a fresh import of data (timm already loaded)
    assert proc.code == 0, proc.err[-2000:]
    assert proc.out.split('\n')[:3] == ['True', 'True False', '0 (8, 8)']


def test_default_model_type_is_registered_and_dead_keys_are_gone():
    from config import default_config
    from models.config_adapter import model_types
    c = default_config()
    assert c.MODEL.TYPE in model_types()
    for key in ('KA', 'DIM_REDUCTION', 'STAGES', 'STAGES_NUM', 'RPB', 'PADDING_MODE', 'SHARE_DWC_KERNEL',
                'SHARE_QKV', 'LR_FACTOR', 'DEPTHS_LR', 'FUSION_TYPE', 'STAGE_CFG'):
        assert key not in c.MODEL.SWIN
    assert not {'SWIN_HR', 'SWIN_LRVIT', 'PVD'} & set(c.MODEL) and 'LOCAL_RANK' not in c


def test_data_path_and_class_count_are_validated_once(digits, tmp_path, monkeypatch):
    """setup_run checks DATA.* once; building the datasets does not repeat it (one count per split)."""
    import data.build as db
    counted = []
    real = db._check_class_count
    monkeypatch.setattr(db, '_check_class_count', lambda found, config, split: (counted.append(split),
                                                                               real(found, config, split)))
    make_trainer(digits, str(tmp_path), ('TRAIN.EPOCHS', '1'))
    assert sorted(counted) == ['train', 'val']


def test_channels_last_model_and_images():
    from utils import DistInfo
    config = load_config(CFG, TINY + ['TRAIN.CHANNELS_LAST', 'True'])
    model = runner.create_model(config, DistInfo(device=torch.device('cpu')))
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    images = engine.to_device(torch.randn(2, 3, 32, 32), torch.device('cpu'), channels_last=True)
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    model.eval()
    assert torch.allclose(model(images), model(images.contiguous()), atol=1e-5)


@MULTI_RANK
@pytest.mark.slow
def test_dead_peer_real_two_ranks(digits, tmp_path, fork_server):
    """Two gloo ranks started with torchrun's environment (no agent; ``python main.py`` processes forked
    by the harness); rank 1 is killed -9 during training: rank 0 ends within seconds with exit code 2 and
    exactly one ERROR line on stderr that carries the backend's message."""
    import time
    from harness import Watched
    env = dict(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()), WORLD_SIZE='2')
    argv = args(digits, str(tmp_path), '--device', 'cpu', opts=(
        'DATA.BATCH_SIZE', '8', 'PRINT_FREQ', '1', 'DIST_TIMEOUT', '60', 'MODEL_EMA.ENABLE', 'False'))
    rank1 = Watched.forked(fork_server, argv, env=dict(env, RANK='1', LOCAL_RANK='1'))
    rank0 = Watched.forked(fork_server, argv, env=dict(env, RANK='0', LOCAL_RANK='0'), separate_stderr=True)
    try:
        rank0.wait_for(lambda line: re.search(r'Train: \[1/3\]\[2/', line))     # training is under way
        rank1.proc.kill()
        start = time.time()
        code = rank0.finish(timeout=50)
        assert time.time() - start < 50
        err = rank0.err
        assert code == 2, err[-3000:]
        errors = [ln for ln in err.splitlines() if ln.startswith('ERROR: ')]
        assert len(errors) == 1 and 'distributed peer failed' in errors[0], err[-3000:]
        assert re.search(r'Connection (closed|reset) by peer|Timed out', errors[0]), errors[0]
    finally:
        rank0.kill()
        rank1.kill()
