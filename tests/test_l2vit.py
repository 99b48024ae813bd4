"""L2ViT (models/l2vit.py): official layout, numerics against float64 naive references, checkpoints, training.

References are independent of the model code: the (key, shape, dtype) fixture was dumped once from the
official ``L2ViT_Tiny`` class (ChuanyangZheng/L2ViT @ fad0341); parameter counts are the pinned official ones;
block numerics are compared with ``tests/peer_reference.py`` (explicit loops, float64) with BatchNorm running
statistics that are not 0/1 and inputs on both sides of the denominator clamp at 100.
"""
from __future__ import annotations

import argparse
import glob
import logging
import math
import os

import pytest
import timm
import torch

import main as entry
from checkpoint import CheckpointError, extract_model_state, load_checkpoint, load_model_state
from config import ConfigError, get_config, load_config
from models import build_model
from models.l2vit import LCM, LGABlock, LinearAttention, LWABlock, checkpoint_filter_fn
from models.layers import relative_position_index
import peer_reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
PINNED = {'L2ViT_Tiny': 28_596_781, 'L2ViT_Small': 50_199_157, 'L2ViT_Base': 88_577_188,
          'L2ViT_Base_384': 88_577_188}
# config -> (MODEL.TYPE, DATA.IMG_SIZE, forward size): the model is size-agnostic, so the big variants are run
# at a small resolution (every layer still runs; small maps are padded to one window) to keep the suite fast.
CONFIGS = {'l2vit_tiny': ('L2ViT_Tiny', 224, 224), 'l2vit_small': ('L2ViT_Small', 224, 32),
           'l2vit_base': ('L2ViT_Base', 224, 32), 'l2vit_base_384': ('L2ViT_Base_384', 384, 48)}
SMALL = dict(depths=(2, 2, 2, 2), dims=(16, 32, 32, 64), num_heads=(2, 2, 4, 4), num_classes=7)


def read_fixture(name: str) -> list:
    with open(os.path.join(FIXTURES, name)) as f:
        rows = [line.split() for line in f if line.strip() and not line.startswith('#')]
    return [(k, () if s == '-' else tuple(int(v) for v in s.split('x')), dtype) for k, s, dtype in rows]


def layout(model: torch.nn.Module) -> list:
    return [(k, tuple(v.shape), str(v.dtype).replace('torch.', '')) for k, v in model.state_dict().items()]


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere, BatchNorm running statistics far from 0/1, temperatures per head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.dtype.is_floating_point or name.endswith('attn_mask'):     # masks are structure, not weights
                continue
            if name.endswith('running_var'):
                t.copy_(torch.rand(t.shape, generator=g) * 2 + 0.3)
            elif name.endswith('running_mean'):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif name.endswith('temperature'):
                t.copy_(torch.rand(t.shape, generator=g) + 0.2)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.2 + (1.0 if name.endswith('weight') and t.dim() == 1
                                                                     else 0.0))


def build_cheaply(config) -> torch.nn.Module:
    """``build_model(config)`` on the meta device, then materialised on the CPU with cheap weights (normal 0.02,
    unit norms, BatchNorm statistics 0/1, relative position indices rebuilt): the config -> model path and the
    exact architecture without the slow official initialisation of the big variants (that init is covered by
    the small-model tests)."""
    with torch.device('meta'):
        model = build_model(config)
    model = model.to_empty(device='cpu')
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith('relative_position_index'):
                t.copy_(relative_position_index(round(math.sqrt(t.shape[0]))))
            elif not t.dtype.is_floating_point:
                t.zero_()
            elif name.endswith('attn_mask'):
                raise AssertionError('build_cheaply cannot rebuild shifted-window masks')
            elif name.endswith(('running_var', 'weight')) and t.dim() == 1:
                t.fill_(1.0)
            elif name.endswith(('running_mean', 'bias')) or t.dim() == 1:
                t.zero_()
            else:
                t.normal_(0, 0.02)
    return model.eval()


def sd64(module: torch.nn.Module) -> dict:
    return {k: v.double() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- layout
def test_key_fixture_and_pinned_parameter_counts():
    with torch.device('meta'):
        models = {name: timm.create_model(name) for name in PINNED}
    assert layout(models['L2ViT_Tiny']) == read_fixture('l2vit_tiny_keys.txt')
    assert [n for n, _ in models['L2ViT_Tiny'].named_parameters()] == \
        [k for k, _, dtype in read_fixture('l2vit_tiny_keys.txt') if dtype == 'float32' and 'running' not in k]
    for name, count in PINNED.items():
        assert sum(p.numel() for p in models[name].parameters()) == count, name
    base, base384 = layout(models['L2ViT_Base']), layout(models['L2ViT_Base_384'])
    assert base == base384                        # 224 weights load into the 384 model as they are
    assert not any('gamma' in k or 'relative_position' in k for k, _, _ in base)


def test_registry_names_and_timm_interface():
    assert {'L2ViT_Tiny', 'L2ViT_Small', 'L2ViT_Base', 'L2ViT_Base_384'} <= set(timm.list_models('L2ViT*'))
    cfg = timm.create_model('L2ViT_Base_384', pretrained=False, **SMALL).pretrained_cfg
    assert cfg['input_size'] == (3, 384, 384) and cfg['first_conv'] == 'downsample_layers.0.proj.proj.0'
    model = timm.create_model('L2ViT_Tiny', **SMALL).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert [tuple(m.shape) for m in maps] == [(1, 16, 16, 16), (1, 32, 8, 8), (1, 32, 4, 4), (1, 64, 2, 2)]
        assert torch.allclose(model.forward_head(final), model(x), atol=1e-6)
        assert model.forward_head(final, pre_logits=True).shape == (1, 64)
        feats = timm.create_model('L2ViT_Tiny', features_only=True, **SMALL)(x)
    assert [f.shape[1] for f in feats] == [i['num_chs'] for i in model.feature_info]
    assert [64 // f.shape[-1] for f in feats] == [i['reduction'] for i in model.feature_info]
    model.reset_classifier(0)
    assert model(x).shape == (1, 64)
    assert model.no_weight_decay() == set()      # officially: only 1-D tensors and biases (temperature decays)


@pytest.mark.parametrize('cfg', sorted(CONFIGS))
def test_every_config_builds_and_forwards(cfg):
    config = load_config(os.path.join(ROOT, 'cfgs', f'{cfg}.yaml'))
    name, size, run = CONFIGS[cfg]
    assert config.MODEL.TYPE == name and config.DATA.IMG_SIZE == size
    model = build_model(config).eval() if name == 'L2ViT_Tiny' else build_cheaply(config)
    assert sum(p.numel() for p in model.parameters()) == PINNED[name]
    assert model.stages[0][0].window_size == (12 if name.endswith('384') else 7)
    with torch.inference_mode():
        out = model(torch.randn(1, 3, run, run))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- numerics (float64)
def test_linear_attention_matches_reference_on_both_sides_of_the_clamp():
    torch.manual_seed(0)
    attn = LinearAttention(24, 3).double()
    randomize(attn)
    x = torch.randn(2, 30, 24, dtype=torch.float64)
    x[1] *= 6.0                                   # second image: large activations -> denominators above 100
    sd = sd64(attn)
    dens = [ref.l2vit_denominators(x[b], sd['qkv.weight'], sd['qkv.bias'], 3) for b in range(2)]
    assert (dens[0] < 100).float().mean() > 0.5 and (dens[1] > 100).float().mean() > 0.5
    with torch.no_grad():
        out = attn(x)
    for b in range(2):
        want = ref.l2vit_linear_attention(x[b], sd['qkv.weight'], sd['qkv.bias'], sd['temperature'],
                                          sd['proj.weight'], sd['proj.bias'], 3)
        torch.testing.assert_close(out[b], want, rtol=1e-10, atol=1e-10)
    unclamped = ref.l2vit_linear_attention(x[0], sd['qkv.weight'], sd['qkv.bias'], sd['temperature'],
                                           sd['proj.weight'], sd['proj.bias'], 3, clamp=None)
    # the clamp changes the result (the unclamped form is 0/0 where a query is all zero after the ReLU)
    assert (out[0] - unclamped).abs().nan_to_num(0.0).max() > 1e-3


def test_lcm_matches_reference_with_running_statistics():
    lcm = LCM(8).double().eval()
    randomize(lcm, 1)
    H, W = 5, 6
    x = torch.randn(1, H * W, 8, dtype=torch.float64)
    with torch.no_grad():
        out = lcm(x, (H, W))
    torch.testing.assert_close(out[0], ref.lcm(x[0], H, W, sd64(lcm), ''), rtol=1e-10, atol=1e-10)


def test_lga_block_matches_reference():
    block = LGABlock(16, 2).double().eval()
    randomize(block, 2)
    H, W = 4, 5
    x = torch.randn(1, H * W, 16, dtype=torch.float64) * 3
    with torch.no_grad():
        out = block(x, (H, W))
    torch.testing.assert_close(out[0], ref.l2vit_lga_block(x[0], H, W, sd64(block), 2), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('hw', [(8, 8), (5, 7)])
def test_lwa_block_matches_reference_including_padding(hw):
    block = LWABlock(16, 2, window_size=4).double().eval()
    randomize(block, 3)
    H, W = hw
    x = torch.randn(1, H * W, 16, dtype=torch.float64)
    with torch.no_grad():
        out = block(x, (H, W))
    torch.testing.assert_close(out[0], ref.l2vit_lwa_block(x[0], H, W, sd64(block), 2, 4), rtol=1e-9, atol=1e-9)


def test_gradients_reach_every_parameter():
    # seeded: drop path (0.1) may drop a residual branch for both samples (p = 0.01 a block), which then
    # gets no gradient; the outcome used to depend on which tests ran before in the process
    torch.manual_seed(0)
    model = timm.create_model('L2ViT_Tiny', drop_path_rate=0.1, **SMALL).train()
    model(torch.randn(2, 3, 36, 44)).logsumexp(-1).sum().backward()      # odd maps: padding in every stage
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


# ----------------------------------------------------------------------------- checkpoints
def _official_file(path: str, model: torch.nn.Module, ema: torch.nn.Module, extra_args=None) -> None:
    """The layout of ConvNeXt/L2ViT's utils.save_model (DDP 'module.' prefixes are not used there)."""
    args = argparse.Namespace(model='L2ViT_Tiny', lr=4e-3, update_freq=4, drop_path=0.3, input_size=224,
                              model_ema=True, data_set='IMNET', betas=None, **(extra_args or {}))
    torch.save({'model': model.state_dict(), 'optimizer': {'state': {}, 'param_groups': [{'lr': 4e-3}]},
                'epoch': 'best-ema', 'scaler': {}, 'args': args, 'model_ema': ema.state_dict()}, path)


def test_official_checkpoint_with_namespace_loads_and_picks_ema(tmp_path, caplog):
    model = timm.create_model('L2ViT_Tiny', **SMALL).eval()
    ema = timm.create_model('L2ViT_Tiny', **SMALL).eval()
    randomize(ema, 5)
    path = str(tmp_path / 'L2ViT-Tiny-checkpoint-best-ema.pth')
    _official_file(path, model, ema)
    ckpt = load_checkpoint(path)                   # weights_only=True with the scoped allow-list
    assert isinstance(ckpt['args'], argparse.Namespace) and ckpt['args'].update_freq == 4
    fresh = timm.create_model('L2ViT_Tiny', **SMALL).eval()
    with caplog.at_level(logging.INFO, logger='models.l2vit'):
        fresh.load_state_dict(checkpoint_filter_fn(ckpt, fresh, use_ema=True), strict=True)
    assert "'model_ema'" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), ema.state_dict().values()))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='models.l2vit'):
        fresh.load_state_dict(checkpoint_filter_fn(ckpt, fresh), strict=True)
    assert "'model'" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    load_model_state(fresh, extract_model_state(ckpt, prefer_ema=True), path)      # the engine's path too
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), ema.state_dict().values()))


class _Hostile:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def test_hostile_namespace_checkpoint_is_refused(tmp_path):
    model = timm.create_model('L2ViT_Tiny', **SMALL)
    marker = str(tmp_path / 'pwned')
    path = str(tmp_path / 'hostile.pth')
    _official_file(path, model, model, extra_args={'payload': _Hostile(marker)})
    with pytest.raises(CheckpointError, match='refusing to load'):
        load_checkpoint(path)
    assert not os.path.exists(marker)


# ----------------------------------------------------------------------------- config / training
def test_config_errors_name_the_key():
    cfg = os.path.join(ROOT, 'cfgs', 'l2vit_tiny.yaml')
    with pytest.raises(ConfigError, match='MODEL.L2VIT.DIMS'):
        build_model(load_config(cfg, ['MODEL.L2VIT.DIMS', '[16, 32]']))
    with pytest.raises(ConfigError, match='MODEL.L2VIT.NUM_HEADS'):
        build_model(load_config(cfg, ['MODEL.L2VIT.DIMS', '[16, 32, 64, 128]', 'MODEL.L2VIT.NUM_HEADS', '[3, 3, 3, 3]']))


def test_short_training_run_on_digits_through_main(make_digits, tmp_path):
    data = make_digits(32, train=8, val=3)
    out = str(tmp_path / 'out')
    argv = ['--cfg', os.path.join(ROOT, 'cfgs', 'demo', 'l2vit_digits.yaml'), '--data-path', data, '--output', out,
            '--opts', 'DATA.IMG_SIZE', '32', 'MODEL.L2VIT.DIMS', '[8, 16, 16, 32]', 'MODEL.L2VIT.NUM_HEADS',
            '[1, 2, 2, 4]', 'MODEL.L2VIT.DEPTHS', '[2, 2, 2, 1]', 'MODEL.L2VIT.WINDOW_SIZE', '2',
            'DATA.BATCH_SIZE', '20', 'DATA.NUM_WORKERS', '0', 'TRAIN.EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '0',
            'TRAIN.ACCUMULATION_STEPS', '2', 'PRINT_FREQ', '1', 'MODEL_EMA.ENABLE', 'True', 'MODEL_EMA.DECAY', '0.5',
            'SAVE_FREQ', '1']
    assert entry.main(argv) == 0
    ckpts = glob.glob(os.path.join(out, 'l2vit_digits', 'default', '*.pth'))
    assert ckpts
    ckpt = load_checkpoint(sorted(ckpts)[-1])
    model = build_model(get_config(entry.build_parser().parse_args(argv)))
    load_model_state(model, extract_model_state(ckpt), 'trained')      # official layout, strict
    assert isinstance(ckpt.get('model_ema'), dict)
