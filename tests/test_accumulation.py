"""Trainer options of the L2ViT / Visformer recipes: gradient accumulation, absolute vs
batch-scaled learning rate, SyncBatchNorm conversion, DeiT's repeated-augmentation sampler and the
ConvNeXt/L2ViT evaluation transform. CPU, tiny FLatten-Swin on the embedded digits data."""
from __future__ import annotations

import math
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import engine
import main as entry
import runner
from config import get_config, load_config
from data.samplers import RepeatedAugSampler
from utils import DistInfo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(ROOT, 'cfgs', 'demo', 'flatten_swin_digits.yaml')
TINY = ['DATA.IMG_SIZE', '32', 'MODEL.SWIN.PATCH_SIZE', '4', 'MODEL.SWIN.EMBED_DIM', '16',
        'MODEL.SWIN.DEPTHS', '[1, 1, 1, 1]', 'MODEL.SWIN.NUM_HEADS', '[1, 1, 2, 2]', 'DATA.NUM_WORKERS', '0',
        'TRAIN.EPOCHS', '2', 'TRAIN.WARMUP_EPOCHS', '1', 'TRAIN.BASE_LR', '0.032', 'TRAIN.MIN_LR', '0.0016',
        'PRINT_FREQ', '4', 'MODEL.DROP_PATH_RATE', '0.0', 'MODEL_EMA.ENABLE', 'True', 'MODEL_EMA.DECAY', '0.8']
CPU = DistInfo(device=torch.device('cpu'))


# the shared digits, 130 training images: 4 optimizer steps of 32 per epoch
pytestmark = pytest.mark.digits(train=13, val=2, drop_val=0)


def trainer(data: str, out: str, *opts: str) -> engine.Trainer:
    argv = ['--cfg', CFG, '--data-path', data, '--output', out, '--opts', *TINY, *opts]
    config = runner.setup_run(get_config(entry.build_parser().parse_args(argv)), CPU)
    return runner.build_trainer(config, CPU)


def state(t: engine.Trainer) -> dict:
    out = {f'model.{k}': v.clone() for k, v in t.model_without_ddp.state_dict().items()}
    out.update({f'ema.{k}': v.clone() for k, v in t.ema.module.state_dict().items()})
    for i, s in enumerate(t.optimizer.state.values()):
        out.update({f'opt.{i}.{k}': v.clone() for k, v in s.items() if torch.is_tensor(v)})
    return out


# ----------------------------------------------------------------------------- gradient accumulation
def test_accumulation_equals_the_large_batch(digits, tmp_path):
    """k=2 micro-batches of 16 == one batch of 32: same weights, EMA and optimizer state after an epoch
    (SGD with momentum: its update is proportional to the gradient, so only summation-order rounding
    differs), same learning rate at every step (schedule per optimizer step, lr scaled by the total
    batch 32 in both). The batch-16 run without accumulation differs (the check can fail)."""
    common = ('TRAIN.OPTIMIZER.NAME', 'sgd', 'MODEL.LABEL_SMOOTHING', '0.0')
    runs = {}
    for name, opts in (('k2', ('DATA.BATCH_SIZE', '16', 'TRAIN.ACCUMULATION_STEPS', '2')),
                       ('b32', ('DATA.BATCH_SIZE', '32', 'TRAIN.ACCUMULATION_STEPS', '1')),
                       ('b16', ('DATA.BATCH_SIZE', '16', 'TRAIN.ACCUMULATION_STEPS', '1'))):
        t = trainer(digits, str(tmp_path / name), *common, *opts)
        torch.manual_seed(0)
        t.model_without_ddp.load_state_dict(runs['k2'][2] if runs else t.model_without_ddp.state_dict())
        t.ema.set(t.model_without_ddp)
        init = {k: v.clone() for k, v in t.model_without_ddp.state_dict().items()}
        lrs = []
        real = t.lr_scheduler.step_update
        t.lr_scheduler.step_update = lambda n, *a, real=real, lrs=lrs, t=t: (real(n, *a), lrs.append(
            t.optimizer.param_groups[0]['lr']))
        stats = engine.train_one_epoch(t, 0)
        runs[name] = (t, lrs, init, stats)
    k2, b32, b16 = runs['k2'], runs['b32'], runs['b16']
    assert k2[0].steps_per_epoch == b32[0].steps_per_epoch == 4 and b16[0].steps_per_epoch == 8
    assert k2[0].config.TRAIN.BASE_LR == b32[0].config.TRAIN.BASE_LR == pytest.approx(0.032 * 32 / 512)
    assert k2[1] == b32[1] and len(k2[1]) == 4
    sa, sb, sc = state(k2[0]), state(b32[0]), state(b16[0])
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.allclose(sa[key], sb[key], rtol=1e-4, atol=1e-6), key
    assert k2[3].loss == pytest.approx(b32[3].loss, rel=1e-5)
    floats = [k for k in sa if k.startswith('model.') and sa[k].is_floating_point()]
    same = max((sa[k] - sb[k]).abs().max().item() for k in floats)
    other = max((sc[k] - sb[k]).abs().max().item() for k in floats)
    assert other > 1e-4 and other > 100 * same, (same, other)


def test_accumulation_preempted_mid_epoch_resumes_bit_identical(digits, tmp_path):
    """k=2: SIGTERM during optimizer step 2 of epoch 1 -> preempt.pth at step 2; a new trainer resumes it
    (auto-resume) and ends epoch 1 with exactly the uninterrupted weights, EMA and optimizer state."""
    opts = ('DATA.BATCH_SIZE', '16', 'TRAIN.ACCUMULATION_STEPS', '2', 'MODEL.DROP_PATH_RATE', '0.1')
    ref = trainer(digits, str(tmp_path / 'ref'), *opts)
    engine.train_one_epoch(ref, 0)
    out = str(tmp_path / 'cut')
    t = trainer(digits, out, *opts)
    forwards = {'n': 0}

    def hook(module, inputs):
        forwards['n'] += module.training
        if forwards['n'] == 3:                   # the 2nd optimizer step is micro-batches 3 and 4
            t.preempt.signum = signal.SIGTERM
    t.model_without_ddp.register_forward_pre_hook(hook)
    with pytest.raises(engine.Preempted):
        engine.train_one_epoch(t, 0)
    resumed = trainer(digits, out, *opts)
    assert (resumed.epoch, resumed.step) == (0, 2)
    engine.train_one_epoch(resumed, resumed.epoch, resumed.step)
    a, b = state(ref), state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- learning rate scaling
def test_lr_scaling_linear_and_absolute():
    config = load_config(CFG, ['DATA.BATCH_SIZE', '64', 'TRAIN.ACCUMULATION_STEPS', '4', 'TRAIN.BASE_LR', '5e-4',
                               'TRAIN.WARMUP_LR', '5e-7', 'TRAIN.MIN_LR', '5e-6'])
    scaled = runner.scale_lr(config, 8)                            # 64 x 8 x 4 = 2048 = 4 x 512
    assert (scaled.TRAIN.BASE_LR, scaled.TRAIN.WARMUP_LR, scaled.TRAIN.MIN_LR) == pytest.approx((2e-3, 2e-6, 2e-5))
    config = load_config(CFG, ['DATA.BATCH_SIZE', '128', 'TRAIN.ACCUMULATION_STEPS', '4', 'TRAIN.BASE_LR', '4e-3',
                               'TRAIN.LR_SCALING', 'none'])
    assert runner.scale_lr(config, 8).TRAIN.BASE_LR == 4e-3        # L2ViT: lr 4e-3 at 8 x 128 x 4 = 4096
    config = load_config(CFG, ['DATA.BATCH_SIZE', '64', 'TRAIN.LR_SCALE_BATCH', '1024'])
    assert runner.scale_lr(config, 4).TRAIN.BASE_LR == pytest.approx(config.TRAIN.BASE_LR * 256 / 1024)


# ----------------------------------------------------------------------------- SyncBatchNorm
def test_sync_batchnorm_conversion_under_ddp_only():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4)))
    weight = model[1].weight
    config = load_config(CFG, ['TRAIN.SYNC_BN', 'True'])
    assert runner.convert_sync_batchnorm(model, config, CPU) is model                  # one process
    ddp_gpu = DistInfo(device=torch.device('cuda', 0), rank=0, world_size=2)
    converted = runner.convert_sync_batchnorm(model, config, ddp_gpu)
    kinds = [type(m) for m in converted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert kinds == [torch.nn.SyncBatchNorm] * 2 and converted[1].weight is weight
    off = load_config(CFG, [])
    assert runner.convert_sync_batchnorm(model, off, ddp_gpu) is model
    with pytest.raises(runner.ConfigError, match='TRAIN.SYNC_BN'):
        runner.convert_sync_batchnorm(model, config, DistInfo(device=torch.device('cpu'), world_size=2))


# ----------------------------------------------------------------------------- repeated augmentation
def deit_ra_reference(n: int, rank: int, world: int, epoch_seed: int, repeats: int = 3) -> list:
    """DeiT's RASampler order, written from its definition: shuffle, repeat each index ``repeats`` times
    in a row, pad with the head to a multiple of the world size, take every world-th from ``rank``, keep
    floor(n // 256 * 256 / world)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed)).tolist()
    rep = []
    for i in perm:
        rep += [i] * repeats
    total = int(math.ceil(n * repeats / world)) * world
    rep += rep[: total - len(rep)]
    mine = rep[rank:total:world]
    return mine[: int(math.floor(n // 256 * 256 / world))]


def test_repeated_aug_sampler_matches_deit():
    n, world, seed = 700, 3, 5
    samplers = [RepeatedAugSampler(n, r, world, seed=seed, repeats=3) for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    got = [list(s) for s in samplers]
    for r in range(world):
        assert [i for i, _ in got[r]] == deit_ra_reference(n, r, world, seed + 2)
        assert len(samplers[r]) == len(got[r]) == 512 // 3 == 170
    # with world == repeats the three copies of an image go to three ranks, each with its own seed
    first = got[0][0][0]
    holders = [[(i, sd) for i, sd in g if i == first] for g in got]
    assert all(len(h) == 1 for h in holders)
    assert len({h[0][1] for h in holders}) == 3
    # resumable: set_start skips exactly the first samples
    samplers[1].set_start(37)
    assert list(samplers[1]) == got[1][37:]
    # another epoch, another order
    samplers[0].set_epoch(3)
    samplers[0].set_start(0)
    assert [i for i, _ in samplers[0]] != [i for i, _ in got[0]]


def test_repeated_aug_sampler_in_the_loader(make_digits):
    from data import build_train_loader
    config = load_config(CFG, [*TINY, 'AUG.REPEATED_AUG', 'True', 'DATA.BATCH_SIZE', '32', 'DATA.DATA_PATH',
                               make_digits(32, train=26, val=1)])
    _, loader, sampler = build_train_loader(config)
    assert isinstance(sampler, RepeatedAugSampler) and loader.sampler is sampler
    assert len(loader) == 256 // 32                            # 260 images -> DeiT keeps 256 per epoch
    indices = [i for i, _ in sampler]                          # one rank: each index 3 times in a row
    assert len(indices) == 256 and len(set(indices)) == 86
    assert all(indices[j] == indices[j + 1] == indices[j + 2] for j in range(0, 255, 3))


# ----------------------------------------------------------------------------- evaluation transform
def _pil_reference(img: Image.Image, resize_to, crop: int = 0) -> torch.Tensor:
    """Resize with PIL's bicubic filter (``resize_to`` = (w, h)), centre crop ``crop`` (torchvision's
    rounding), scale to [0, 1], normalise with the ImageNet mean/std; (3, H, W) float32."""
    out = img.resize(resize_to, Image.BICUBIC)
    if crop:
        w, h = out.size
        top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
        out = out.crop((left, top, left + crop, top + crop))
    x = np.asarray(out, dtype=np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)


@pytest.mark.parametrize('size, opts, resize_to, crop', [
    (224, [], (256, 256), 224),                                                  # official FLatten/Swin
    (224, ['TEST.RESIZE_SHORT_SIDE', 'True'], (384, 256), 224),                  # DeiT / ConvNeXt < 384
    (384, ['TEST.RESIZE_SHORT_SIDE', 'True', 'TEST.NO_CROP_MIN_SIZE', '384'], (384, 384), 0),   # L2ViT 384
    (256, ['TEST.RESIZE_SHORT_SIDE', 'True', 'TEST.NO_CROP_MIN_SIZE', '384', 'TEST.CROP_PCT', '0.95'],
     (403, 269), 256),                                                           # crop_pct: int(256 / 0.95)
    (384, [], (438, 438), 384),                                                  # no rule: crop at 384 too
])
def test_eval_transform(size, opts, resize_to, crop):
    from data import build_transform
    # the transform only: the demo model's windows need not tile these sizes (model checks are skipped)
    config = load_config(CFG, ['DATA.IMG_SIZE', str(size), 'DATA.INTERPOLATION', 'bicubic', *opts], validate=False)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 450, 3), dtype=np.uint8))     # 450 wide, 300 high
    got = build_transform(False, config)(img)
    want = _pil_reference(img, resize_to, crop)
    assert got.shape == want.shape == (3, size, size)
    assert torch.allclose(got, want, atol=1e-5)
