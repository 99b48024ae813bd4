"""Visformer v1/v2 (models/visformer.py): official layout, numerics, names, checkpoints, training.

Independent references: (key, shape, dtype) fixtures dumped once from the official ``visformer_tiny`` /
``swin_visformer_tiny_v2`` classes (danczs/Visformer @ 134d980); the pinned official parameter counts; timm's
own ``visformer_tiny`` (a separate implementation of v1, keys without ``.bn.``) for whole-model outputs in
float64; and ``tests/peer_reference.py`` (explicit loops) for attention with the qk-scale exponent, shifted
windows with relative position bias, and the grouped-conv MLP, with BatchNorm statistics that are not 0/1.
"""
from __future__ import annotations

import argparse
import glob
import os

import pytest
import timm
import torch

import main as entry
from checkpoint import extract_model_state, load_checkpoint, load_model_state
from config import ConfigError, get_config, load_config
from models import build_model
from models.visformer import Visformer, VisformerBlock, checkpoint_filter_fn
import peer_reference as ref
from test_l2vit import build_cheaply, layout, randomize, read_fixture, sd64

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# MODEL.TYPE (official name) -> (timm name, pinned official parameter count)
PINNED = {'visformer_tiny': ('official_visformer_tiny', 10_321_368),
          'visformer_small': ('official_visformer_small', 40_219_592),
          'swin_visformer_tiny_v2': ('swin_visformer_tiny_v2', 9_403_384),
          'swin_visformer_small_v2': ('swin_visformer_small_v2', 23_581_928),
          'swin_visformer_medium_v2': ('swin_visformer_medium_v2', 44_536_120)}
CONFIGS = {'visformer_tiny': 'visformer_tiny', 'visformer_small': 'visformer_small',
           'visformer_tiny_v2': 'swin_visformer_tiny_v2', 'visformer_small_v2': 'swin_visformer_small_v2',
           'visformer_medium_v2': 'swin_visformer_medium_v2'}
SMALL_V2 = dict(img_size=64, init_channels=8, embed_dim=32, depths=(1, 1, 3, 2), num_heads=(1, 1, 2, 4),
                window_sizes=(16, 8, 2, 2), num_classes=5)


def test_key_fixtures_and_pinned_parameter_counts():
    with torch.device('meta'):
        models = {t: timm.create_model(name) for t, (name, _) in PINNED.items()}
    assert layout(models['visformer_tiny']) == read_fixture('visformer_tiny_keys.txt')
    assert layout(models['swin_visformer_tiny_v2']) == read_fixture('swin_visformer_tiny_v2_keys.txt')
    for t, (_, count) in PINNED.items():
        assert sum(p.numel() for p in models[t].parameters()) == count, t
    assert all('.bn.' in k for k in models['visformer_tiny'].state_dict() if 'running' in k)


def test_names_coexist_with_timm_visformer():
    import timm.models.visformer as timm_visformer
    assert isinstance(timm.create_model('visformer_tiny', pretrained=False), timm_visformer.Visformer)
    assert isinstance(timm.create_model('official_visformer_tiny', img_size=64, embed_dim=32, num_heads=2,
                                        init_channels=8), Visformer)
    config = load_config(os.path.join(ROOT, 'cfgs', 'visformer_tiny.yaml'),
                         ['MODEL.VISFORMER.EMBED_DIM', '32', 'MODEL.VISFORMER.NUM_HEADS', '[2, 2, 2]'])
    assert isinstance(build_model(config), Visformer)      # MODEL.TYPE visformer_tiny is ours


@pytest.mark.parametrize('cfg', sorted(CONFIGS))
def test_every_config_builds_and_forwards(cfg):
    config = load_config(os.path.join(ROOT, 'cfgs', f'{cfg}.yaml'))
    assert config.MODEL.TYPE == CONFIGS[cfg] and config.DATA.IMG_SIZE == 224
    model = build_model(config).eval() if cfg == 'visformer_tiny_v2' else build_cheaply(config)
    assert sum(p.numel() for p in model.parameters()) == PINNED[config.MODEL.TYPE][1]
    exponent = config.MODEL.VISFORMER.QK_SCALE_EXPONENT
    assert exponent == (-0.5 if cfg.endswith('_v2') else -0.25)
    attn = model.stages[-1].blocks[0].attn
    assert attn.scale == pytest.approx((attn.dim // attn.num_heads) ** (2 * exponent))
    with torch.inference_mode():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- numerics (float64)
def test_timm_visformer_checkpoint_loads_and_matches_timm_in_float64():
    """timm's own visformer_tiny (keys without '.bn.') through checkpoint_filter_fn: identical outputs."""
    theirs = timm.create_model('visformer_tiny', img_size=96).double().eval()
    randomize(theirs, 7)
    ours = timm.create_model('official_visformer_tiny', img_size=96).double().eval()
    ours.load_state_dict(checkpoint_filter_fn(theirs.state_dict(), ours), strict=True)
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    with torch.no_grad():
        a, b = theirs(x), ours(x)
    assert ((a - b).norm() / a.norm()).item() < 1e-10


@pytest.mark.parametrize('exponent', [-0.25, -0.5])
def test_v1_attention_block_matches_reference(exponent):
    block = VisformerBlock(16, 2, (5, 5), None, 0, qk_scale_exponent=exponent).double().eval()
    randomize(block, 8)
    x = torch.randn(1, 16, 5, 5, dtype=torch.float64) * 2
    with torch.no_grad():
        out = block(x)
    torch.testing.assert_close(out[0], ref.visformer_block(x[0], sd64(block), 2, exponent), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('shift', [0, 2])
def test_v2_window_block_matches_reference(shift):
    block = VisformerBlock(16, 2, (8, 8), 4, shift, qk_scale_exponent=-0.5).double().eval()
    randomize(block, 9)
    x = torch.randn(1, 16, 8, 8, dtype=torch.float64) * 2
    with torch.no_grad():
        out = block(x)
    want = ref.visformer_block(x[0], sd64(block), 2, -0.5, window=4, shift=shift)
    torch.testing.assert_close(out[0], want, rtol=1e-9, atol=1e-9)


def test_conv_block_with_grouped_spatial_conv_matches_reference():
    block = VisformerBlock(16, 1, (6, 6), attn_disabled=True, spatial_conv=True).double().eval()
    randomize(block, 10)
    assert block.mlp.conv2.weight.shape == (32, 4, 3, 3)          # hidden 2C, groups 8
    x = torch.randn(1, 16, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        out = block(x)
    torch.testing.assert_close(out[0], ref.visformer_block(x[0], sd64(block), 1, -0.25), rtol=1e-9, atol=1e-9)


def test_shift_follows_the_network_wide_block_index():
    """Officially a v2 block is shifted when its index over ALL blocks is odd (stage 2 of tiny_v2 starts at 5)."""
    with torch.device('meta'):
        model = timm.create_model('swin_visformer_tiny_v2', img_size=448)
    assert [b.shift for b in model.stages[2].blocks] == [7, 0, 7, 0, 7, 0]
    assert [b.shift for b in model.stages[3].blocks] == [3, 0, 3]
    assert [k for k in model.state_dict() if k.endswith('attn_mask')][:2] == ['stage2.0.attn_mask', 'stage2.2.attn_mask']


def test_gradients_reach_every_parameter_and_features():
    torch.manual_seed(0)            # drop path may drop a branch for both samples: no gradient there
    model = timm.create_model('swin_visformer_tiny_v2', drop_path_rate=0.1, **SMALL_V2).train()
    assert any(b.shift for b in model.stages[2].blocks)
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    model.eval()
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)
        feats = timm.create_model('swin_visformer_tiny_v2', features_only=True, **SMALL_V2)(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape[1:]) for m in maps] == [(8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2)]
    assert [f.shape[1] for f in feats] == [i['num_chs'] for i in model.feature_info]
    with pytest.raises(ValueError, match='does not match the model'):
        model(torch.randn(1, 3, 96, 96))


# ----------------------------------------------------------------------------- checkpoints / config
def test_official_checkpoint_with_namespace_loads_strictly(tmp_path):
    model = timm.create_model('swin_visformer_tiny_v2', **SMALL_V2).eval()
    randomize(model, 11)
    args = argparse.Namespace(model='swin_visformer_tiny_v2', qk_scale_factor=-0.5, lr=5e-4, repeated_aug=True,
                              amp=True, output_dir='out')
    path = str(tmp_path / 'best.pth')
    torch.save({'model': model.state_dict(), 'optimizer': {}, 'lr_scheduler': {'last_epoch': 3}, 'epoch': 299,
                'scaler': {}, 'args': args}, path)
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt['args'], argparse.Namespace) and ckpt['args'].qk_scale_factor == -0.5
    fresh = timm.create_model('swin_visformer_tiny_v2', **SMALL_V2).eval()
    fresh.load_state_dict(checkpoint_filter_fn(ckpt, fresh), strict=True)
    load_model_state(fresh, extract_model_state(ckpt), path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_regrouped_stages_keep_official_keys_order_and_parameter_order():
    """Stages live in a list (one forward loop); the official keys hold under a parent's prefix (EMA, dense
    wrappers) and load back strictly, and the parameters run in the official key order of the fixture, so an
    optimizer state saved before the regrouping stays aligned with its tensors."""
    with torch.device('meta'):
        full = timm.create_model('swin_visformer_tiny_v2')
    buffers = ('running_mean', 'running_var', 'num_batches_tracked', 'attn_mask', 'relative_position_index')
    official = [shape for k, shape, _ in read_fixture('swin_visformer_tiny_v2_keys.txt') if not k.endswith(buffers)]
    assert [tuple(p.shape) for p in full.parameters()] == official
    model = timm.create_model('swin_visformer_tiny_v2', **SMALL_V2)
    randomize(model, 5)
    parent = torch.nn.ModuleDict({'backbone': model})
    sd = parent.state_dict()
    assert list(sd) == ['backbone.' + k for k in model.state_dict()]
    assert list(sd)[:5] == [f'backbone.pos_embed{i}' for i in range(4)] + ['backbone.stem.0.weight']
    fresh = torch.nn.ModuleDict({'backbone': timm.create_model('swin_visformer_tiny_v2', **SMALL_V2)})
    fresh.load_state_dict(sd, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), sd.values()))


def test_config_keys_reach_the_model_and_errors_name_them():
    cfg = os.path.join(ROOT, 'cfgs', 'visformer_tiny_v2.yaml')
    opts = ['MODEL.VISFORMER.EMBED_DIM', '32', 'MODEL.VISFORMER.INIT_CHANNELS', '8', 'DATA.IMG_SIZE', '64',
            'MODEL.VISFORMER.DEPTHS', '[1, 1, 1, 1]', 'MODEL.VISFORMER.NUM_HEADS', '[1, 1, 2, 2]',
            'MODEL.VISFORMER.QK_SCALE_EXPONENT', '-0.25']
    model = build_model(load_config(cfg, opts))
    assert model.stages[-2].blocks[0].attn.scale == pytest.approx(16 ** -0.5)
    with pytest.raises(ConfigError, match='MODEL.VISFORMER.NUM_HEADS'):
        build_model(load_config(cfg, opts[:-4] + ['MODEL.VISFORMER.NUM_HEADS', '[1, 1, 2]']))
    with pytest.raises(ConfigError, match='DATA.IMG_SIZE'):
        build_model(load_config(cfg, opts[:4] + ['DATA.IMG_SIZE', '100']))


def test_short_training_run_on_digits_through_main(make_digits, tmp_path):
    data = make_digits(32, train=8, val=3)
    out = str(tmp_path / 'out')
    argv = ['--cfg', os.path.join(ROOT, 'cfgs', 'demo', 'visformer_digits.yaml'), '--data-path', data,
            '--output', out, '--opts', 'DATA.IMG_SIZE', '32', 'MODEL.VISFORMER.EMBED_DIM', '32',
            'MODEL.VISFORMER.INIT_CHANNELS', '8', 'MODEL.VISFORMER.DEPTHS', '[1, 1, 1, 2]',
            'DATA.BATCH_SIZE', '20', 'DATA.NUM_WORKERS', '0', 'TRAIN.EPOCHS', '2', 'TRAIN.WARMUP_EPOCHS', '0',
            'PRINT_FREQ', '1', 'SAVE_FREQ', '1']
    assert entry.main(argv) == 0
    ckpts = glob.glob(os.path.join(out, 'visformer_digits', 'default', '*.pth'))
    assert ckpts
    model = build_model(get_config(entry.build_parser().parse_args(argv)))
    load_model_state(model, extract_model_state(load_checkpoint(sorted(ckpts)[-1])), 'trained')
