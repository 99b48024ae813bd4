"""Which weights a run starts from and what it says about them (resume.py, engine's preemption message):
``--eval --pretrained`` is never replaced by auto-resume; the preemption message uses the log's numbering;
``--pretrained X --ema`` says which weights of X it took. In-process runs of main.main on the shared digits,
a tiny FLatten-Swin at 32 px."""
from __future__ import annotations

import os
import signal

import torch

import main as entry
import runner
from config import get_config, load_config
from harness import read_records, run_main
from models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(ROOT, 'cfgs', 'demo', 'flatten_swin_digits.yaml')
TINY = ['DATA.IMG_SIZE', '32', 'MODEL.SWIN.PATCH_SIZE', '4', 'MODEL.SWIN.EMBED_DIM', '16',
        'MODEL.SWIN.DEPTHS', '[1, 1, 1, 1]', 'MODEL.SWIN.NUM_HEADS', '[1, 1, 2, 2]', 'DATA.BATCH_SIZE', '32',
        'DATA.NUM_WORKERS', '0', 'TRAIN.EPOCHS', '2', 'TRAIN.WARMUP_EPOCHS', '0', 'PRINT_FREQ', '1',
        'MODEL_EMA.ENABLE', 'False', 'MODEL.DROP_PATH_RATE', '0.0']


def argv(data: str, out: str, *flags: str) -> list:
    return ['--cfg', CFG, '--data-path', data, '--output', out, '--tag', 'T', '--device', 'cpu', *flags,
            '--opts', *TINY]


def random_weights(seed: int) -> dict:
    """A state dict of the tiny model with every float tensor drawn from ``seed`` (distinct per seed)."""
    g = torch.Generator().manual_seed(seed)
    sd = build_model(load_config(CFG, TINY)).state_dict()
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in sd.items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_pretrained_is_not_replaced_by_auto_resume(digits, tmp_path):
    """--eval --pretrained X with the --output/--tag of a run that has a resumable checkpoint evaluates X
    (weights and the metrics record); --eval without weights still evaluates that run's checkpoint."""
    out = str(tmp_path)
    folder = get_config(entry.build_parser().parse_args(argv(digits, out))).OUTPUT
    os.makedirs(folder)
    trained, pretrained = random_weights(1), random_weights(2)
    torch.save({'model': trained, 'epoch': 1, 'step': 0}, os.path.join(folder, 'max_acc.pth'))
    x = str(tmp_path / 'x.pth')
    torch.save({'model': pretrained}, x)

    ev = run_main(argv(digits, out, '--eval', '--pretrained', x)).ok()
    assert same(ev.result.model.state_dict(), pretrained)
    assert read_records(os.path.join(folder, 'eval'), 'eval')[-1]['checkpoint'] == x

    ev = run_main(argv(digits, out, '--eval')).ok()                      # nothing named: the run's checkpoint
    assert same(ev.result.model.state_dict(), trained)


def test_preemption_message_uses_the_log_numbering(digits, tmp_path, monkeypatch):
    """SIGTERM during the 4th training step of epoch 1 of 2: the step finishes, is logged as
    ``Train: [1/2][4/9]``, and the preemption message names the same place, ``[1/2][4/9]`` (1-based epoch,
    steps done), which is also what the saved checkpoint records (0-based epoch 0, 4 steps done)."""
    real_build, calls = runner.build_model, {'n': 0}

    def build_with_sigterm(config):
        model = real_build(config)

        def hook(module, inputs):
            if module.training:
                calls['n'] += 1
                if calls['n'] == 4:
                    os.kill(os.getpid(), signal.SIGTERM)
        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(runner, 'build_model', build_with_sigterm)
    run = run_main(argv(digits, str(tmp_path)))
    assert run.code == 143, run.console[-3000:]
    saved = torch.load(run.path('preempt.pth'), weights_only=True)
    assert (saved['epoch'], saved['step']) == (0, 4)
    place = f"[{saved['epoch'] + 1}/2][{saved['step']}/9]"            # the checkpoint's place, numbered as the log
    assert place == '[1/2][4/9]'
    train_lines = [ln for ln in run.console.splitlines() if 'Train: [' in ln]
    assert f'Train: {place}' in train_lines[-1], train_lines[-3:]      # the last step logged is that step
    preempted = [ln for ln in run.console.splitlines() if 'preempted' in ln]
    assert len(preempted) == 1 and place in preempted[0] and 'preempt.pth' in preempted[0], preempted


def test_pretrained_with_ema_flag_says_which_weights(digits, tmp_path):
    """--pretrained X --ema where X holds no EMA weights: X's 'model' weights are loaded and one log line
    says so (the README: the log says which entry was used)."""
    weights = random_weights(3)
    x = str(tmp_path / 'plain.pth')
    torch.save({'model': weights}, x)
    ev = run_main(argv(digits, str(tmp_path / 'out'), '--eval', '--pretrained', x, '--ema')).ok()
    assert same(ev.result.model.state_dict(), weights)
    said = [ln for ln in ev.console.splitlines() if x in ln and 'model weights' in ln]
    assert len(said) == 1 and 'no EMA' in said[0], ev.console[-3000:]
