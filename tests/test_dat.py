"""DAT++ (models/dat.py, models/neighborhood_attention.py): compatibility with the official models and
correctness against independent float64 references (tests/dat_reference.py).

References: pinned parameter counts and fvcore FLOPs of the official models (shared/notes/dat-facts.md),
the (key, shape) fixture derived from the official module structure, explicit-loop neighbourhood and
deformable attention, a written-out bicubic resampler, chance level on digits.
"""
from __future__ import annotations

import math
import os
import warnings

import pytest
import timm
import torch
import yaml

import models  # noqa: F401  (registration)
from config import ConfigError, load_config
from models import build_model
from models.config_adapter import model_spec
from models.dat import DAT, checkpoint_filter_fn
from models.dat_attention import DeformableAttention, NeighborhoodAttention, reference_points
from models.neighborhood_attention import (natten_flops, neighborhood_attention, neighborhood_attention_naive,
                                           neighborhood_probs)

from dat_reference import (bicubic_resize, deformable_reference, neighborhood_module_reference,
                           neighborhood_reference, official_keys, read_key_fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFGS = {name: os.path.join(ROOT, 'cfgs', f'{name}.yaml') for name in ('dat_tiny', 'dat_small', 'dat_base',
                                                                     'dat_base_384')}
PARAMS = {'dat_tiny': 23_962_876, 'dat_small': 53_127_366, 'dat_base': 93_690_640, 'dat_base_384': 93_690_640}


SMALL = dict(img_size=64, patch_size=4, num_classes=7, expansion=2, dim_stem=16, dims=(16, 32, 64, 128),
             depths=(2, 2, 2, 2), heads=(1, 2, 2, 4), groups=(1, 1, 2, 2),
             stage_spec=(('N', 'D'), ('L', 'S'), ('N', 'D'), ('D', 'D')), window_sizes=(7, 4, 7, 7),
             use_pes=(True,) * 4, strides=(8, 4, 2, 1), offset_range_factor=(-1,) * 4, use_dwc_mlps=(True,) * 4,
             use_lpus=(True,) * 4, use_conv_patches=True, ksizes=(9, 7, 5, 3), nat_ksizes=(5, 7, 3, 3),
             drop_path_rate=0.1)


def small_dat(**overrides) -> DAT:
    """All four implemented letters on a 64 px input (maps 16, 8, 4, 2), through the registered entry point
    (every architecture argument given, so only pretrained_cfg comes from dat_tiny)."""
    return timm.create_model('dat_tiny', **dict(SMALL, **overrides))


# ----------------------------------------------------------------------------- compatibility
def test_registered_names_do_not_shadow_timm():
    # our names exist, and timm's own registry (its modules) has no model of these names besides ours
    for name in PARAMS:
        assert name in timm.list_models()
        assert timm.models.get_pretrained_cfg(name) is not None
        assert timm.models._registry._model_to_module[name] == 'dat'


@pytest.mark.parametrize('name', list(PARAMS))
def test_param_count_pinned(name):
    with torch.device('meta'):
        model = build_model(load_config(CFGS[name]))
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert not list(model.buffers())                         # the official models have no buffers
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())


def test_state_dict_matches_official_layout():
    """dat_tiny: exact keys, order and shapes from the fixture; small/base from the same derivation."""
    fixture = read_key_fixture(os.path.join(ROOT, 'tests', 'fixtures', 'dat_tiny_keys.txt'))
    with torch.device('meta'):
        tiny = timm.create_model('dat_tiny')
    assert [(k, tuple(v.shape)) for k, v in tiny.state_dict().items()] == fixture
    assert len(fixture) == 589
    for name in ('dat_small', 'dat_base'):
        cfg = yaml.safe_load(open(CFGS[name]))['MODEL']['DAT']
        with torch.device('meta'):
            model = timm.create_model(name)
        assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == official_keys(cfg)


# The GFLOPs of every DAT++ config with plain fvcore (tiny, small, base, base-384 in the normal suite):
# tests/test_flops.py::test_plain_fvcore_gives_official_count.


def test_plain_fvcore_prices_neighborhood_attention_by_natten_rule():
    B, h, H, W, d, k = 2, 3, 9, 8, 4, 5
    assert natten_flops(B, h, H, W, d, k) == B * h * H * W * k * k * (d + 1) + B * h * H * W * k * k * d
    module = NeighborhoodAttention(h * d, k, h).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore')
        from fvcore.nn import FlopCountAnalysis
        analysis = FlopCountAnalysis(module, torch.zeros(B, h * d, H, W))
        analysis.unsupported_ops_warnings(False).tracer_warnings('none')
        by_op = analysis.by_operator()
    assert by_op['matmul'] == natten_flops(B, h, H, W, d, k)


# ----------------------------------------------------------------------------- neighbourhood attention
@pytest.mark.parametrize('H,W,k,tile', [(7, 7, 7, 8), (9, 13, 7, 8), (14, 14, 7, 8), (12, 5, 5, 3),
                                        (10, 10, 3, 4), (8, 11, 7, 2)])
def test_neighborhood_fast_matches_loop_reference(H, W, k, tile):
    g = torch.Generator().manual_seed(H * 100 + W)
    q, key, v = (torch.randn(2, 3, H, W, 4, generator=g, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(3, 2 * k - 1, 2 * k - 1, generator=g, dtype=torch.float64)
    ref = neighborhood_reference(q, key, v, rpb, k)
    torch.testing.assert_close(neighborhood_attention(q, key, v, rpb, k, tile=tile), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(neighborhood_attention_naive(q, key, v, rpb, k), ref, rtol=1e-10, atol=1e-12)


def test_neighborhood_training_after_inference_mode():
    """Index plans cached during an inference_mode evaluation must not break the next training step (an
    inference tensor cannot be saved for backward)."""
    H, W, k = 17, 19, 5                                  # a size no other test uses: the plan is built here
    q, key, v = (torch.randn(1, 2, H, W, 4) for _ in range(3))
    rpb = torch.randn(2, 2 * k - 1, 2 * k - 1)
    with torch.inference_mode():
        neighborhood_attention(q, key, v, rpb, k)
    q.requires_grad_(True)
    neighborhood_attention(q, key, v, rpb, k).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_neighborhood_probs_layout_and_gradients():
    """natten's layout: entry t = t_row * k + t_col of query (0, 8) on an 8 x 9 map, k = 5, is key
    (t_row, 4 + t_col) (the window is shifted inside the map) with bias rpb[:, 4 + t_row, t_col]. Gradients
    of the fused op (recomputing backward) equal those of the loop reference."""
    g = torch.Generator().manual_seed(1)
    q, key, v = (torch.randn(1, 2, 8, 9, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 9, 9, generator=g, dtype=torch.float64, requires_grad=True)
    probs = neighborhood_probs(q, key, rpb, 5)
    logits = (q[0, :, 0, 8, None, None, :] * key[0, :, 0:5, 4:9]).sum(-1) + rpb[:, 4:9, 0:5]
    torch.testing.assert_close(probs[0, :, 0, 8], logits.reshape(2, 25).softmax(-1))
    inputs = [t[..., :6, :7, :] if t.dim() == 5 else t[:, 2:7, 2:7] for t in (q, key, v, rpb)]
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    weight = torch.randn(1, 2, 6, 7, 3, generator=g, dtype=torch.float64)
    fast = torch.autograd.grad((neighborhood_attention(*inputs, 3, tile=4) * weight).sum(), inputs)
    ref = torch.autograd.grad((neighborhood_reference(*inputs, 3) * weight).sum(), inputs)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize('H,W', [(14, 14), (5, 9), (3, 3), (9, 6)])
def test_neighborhood_module_matches_reference(H, W):
    """The whole 'N' block, including zero padding of maps smaller than the kernel (before qkv)."""
    torch.manual_seed(H + W)
    module = NeighborhoodAttention(16, 7, 2).double().eval()
    x = torch.randn(2, 16, H, W, dtype=torch.float64)
    torch.testing.assert_close(module(x), neighborhood_module_reference(module, x), rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------- deformable attention
def test_reference_points_half_cell_quirk():
    ref = reference_points(7, 4, torch.float64, 'cpu')
    assert ref[0, 0].tolist() == pytest.approx([1 / 6 - 1, 1 / 3 - 1])
    assert ref[-1, -1].tolist() == pytest.approx([13 / 6 - 1, 7 / 3 - 1])        # outside [-1, 1]


@pytest.mark.parametrize('q_size,H,W,offset_gain', [((6, 6), 6, 6, 1.0), ((6, 6), 8, 5, 1.0), ((5, 5), 5, 5, 40.)])
def test_deformable_matches_reference(q_size, H, W, offset_gain):
    """Explicit per-query sampling with a hand-written bilinear interpolation; ``offset_gain`` 40 drives most
    positions into the clamp at the border; (8, 5) runs a 6x6-built table on another map size (as at 384)."""
    torch.manual_seed(3)
    module = DeformableAttention(16, 4, 2, q_size, stride=2, ksize=3).double().eval()
    with torch.no_grad():
        module.conv_offset[3].weight.mul_(offset_gain)
        module.rpe_table.normal_()
    x = torch.randn(2, 16, H, W, dtype=torch.float64)
    seen = []
    handle = module.tap.register_forward_hook(lambda m, inp, out: seen.append(inp))
    out = module(x)
    handle.remove()
    ref, pos = deformable_reference(module, x)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(seen[0][0], pos)
    if offset_gain > 1:
        assert ((pos.abs() == 1).any(-1)).float().mean() > 0.3        # the clamp was exercised


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = small_dat()
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_grad_checkpointing_matches():
    torch.manual_seed(0)
    model = small_dat(drop_path_rate=0., depths=(1, 1, 1, 1), stage_spec=(('N',), ('S',), ('D',), ('D',)))
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for a, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- configs and timm interface
def test_shipped_configs_build_and_run():
    """Every shipped DAT config loads unchanged and selects its registered variant (the 384 placeholder
    MODEL.PRETRAINED reads as unset); dat_tiny runs at 224 (batch 1). small/base/base_384 differ only in
    widths (layouts checked on 'meta' above); running 224-built tables on another map size, as dat_base_384
    does at 384, is covered by test_deformable_matches_reference. (A base_384 forward costs ~50 GFLOPs.)"""
    for name, path in CFGS.items():
        config = load_config(path)
        assert model_spec(config).name == name
        assert config.MODEL.PRETRAINED == ''
    model = build_model(load_config(CFGS['dat_tiny'])).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
        assert out.shape == (1, 1000) and torch.isfinite(out).all()
        with pytest.raises(ValueError, match='at least 2x2'):          # 32 px: a 1x1 last stage
            model(torch.randn(1, 3, 32, 32))


def test_config_contradictions_are_errors():
    with pytest.raises(ConfigError, match='MODEL.DAT.drop_path_rate'):
        load_config(CFGS['dat_tiny'], ['MODEL.DROP_PATH_RATE', '0.3'])
    with pytest.raises(ConfigError, match='MODEL.DAT.num_classes'):
        load_config(CFGS['dat_tiny'], ['MODEL.NUM_CLASSES', '10'])
    config = load_config(CFGS['dat_tiny'], ['MODEL.DAT.num_classes', '10', 'MODEL.DAT.drop_path_rate', '0.3'])
    assert (config.MODEL.NUM_CLASSES, config.MODEL.DROP_PATH_RATE) == (10, 0.3)
    with pytest.raises(ConfigError, match='MODEL.DAT.dims'):
        with torch.device('meta'):
            build_model(load_config(CFGS['dat_tiny'], ['MODEL.DAT.dims', '[64, 128]']))
    with pytest.raises(ConfigError, match='stage_spec'):
        with torch.device('meta'):
            build_model(load_config(CFGS['dat_tiny'], ['MODEL.DAT.depths', '[2, 4, 18, 3]']))


def test_timm_interface_and_features():
    torch.manual_seed(0)
    model = small_dat().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert [m.shape[1:] for m in maps] == [(16, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2)]
        torch.testing.assert_close(model.forward_head(final), model(x))
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 128)
        assert [i['reduction'] for i in model.feature_info] == [4, 8, 16, 32]
        model.reset_classifier(3)
        assert model(x).shape == (2, 3)
    no_shift = (('N', 'D'), ('L', 'L'), ('N', 'D'), ('D', 'D'))     # an 'S' mask fixes the map size
    features = timm.create_model('dat_tiny', features_only=True, **dict(SMALL, stage_spec=no_shift))
    with torch.no_grad():
        outs = features(torch.randn(1, 3, 64, 96))
    assert [o.shape[1] for o in outs] == features.feature_info.channels() == [16, 32, 64, 128]
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    names = {n for n, _ in model.named_parameters()}
    assert model.no_weight_decay_keywords() == {'relative_position_bias_table', 'rpe_table'}
    assert any('rpe_table' in n for n in names) and any(n.endswith('.rpb') for n in names)


# ----------------------------------------------------------------------------- fine-tuning
def test_pretrained_224_to_384_resize_and_official_window_names():
    """img_size 32 -> 48 tables: rpe_table resized bicubically (against the written-out resampler), the
    window bias tables too, official 'L'/'S' names mapped; a head of another class count passes unchanged
    (timm drops it; --pretrained keeps the fresh head or maps 22k -> 1k: test_checkpoint)."""
    torch.manual_seed(0)
    small = dict(img_size=64, stage_spec=(('N', 'D'), ('L', 'L'), ('N', 'D'), ('D', 'D')), window_sizes=(7, 4, 7, 7))
    src = small_dat(num_classes=11, **small)
    official = {}
    for key, value in src.state_dict().items():     # the official names of the window projections
        key = key.replace('.attns.0.qkv.', '.attns.0.proj_qkv.').replace('.attns.0.proj.', '.attns.0.proj_out.') \
            if '.stages.1.' in f'.{key}' else key
        official['module.' + key] = value
    dst = small_dat(num_classes=5, **dict(small, img_size=96, window_sizes=(7, 8, 7, 7)))
    sd = checkpoint_filter_fn({'model': official}, dst)
    assert sd['cls_head.weight'] is official['module.cls_head.weight']
    dst.load_state_dict({k: v for k, v in sd.items() if not k.startswith('cls_head.')}, strict=False)
    table = official['module.stages.0.attns.1.rpe_table']
    assert table.shape[-1] == 31 and dst.stages[0].attns[1].rpe_table.shape[-1] == 47
    torch.testing.assert_close(dst.stages[0].attns[1].rpe_table.double(), bicubic_resize(table, (47, 47)),
                               rtol=1e-5, atol=1e-6)
    bias = official['module.stages.1.attns.1.relative_position_bias_table']            # (7*7, heads)
    want = bicubic_resize(bias.T.reshape(-1, 7, 7), (15, 15)).reshape(-1, 225).T
    torch.testing.assert_close(dst.stages[1].attns[1].relative_position_bias_table.double(), want,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dst.stages[1].attns[0].qkv.weight, official['module.stages.1.attns.0.proj_qkv.weight'])
    assert set(sd) - {'cls_head.weight', 'cls_head.bias'} == set(dst.state_dict()) - {'cls_head.weight', 'cls_head.bias'}


def test_pretrained_flag_path_resizes_tables_and_resets_head(tmp_path):
    """``--pretrained`` (resume.load_finetune_weights -> our filter): an
    official-style file (under 'model', 'module.' prefixes) of a 64-table model into a 96-table model with
    another class count: tables resized bicubically, head kept fresh, everything else copied."""
    from resume import load_finetune_weights
    torch.manual_seed(0)
    src = small_dat(num_classes=11)
    path = str(tmp_path / 'src.pth')
    torch.save({'model': {'module.' + k: v for k, v in src.state_dict().items()}, 'epoch': 3}, path)
    dst = small_dat(num_classes=5, img_size=96)          # also another 'S' mask (a re-creatable buffer)
    fresh_head = dst.cls_head.weight.detach().clone()
    load_finetune_weights(dst, path)
    table = src.stages[3].attns[0].rpe_table.detach()
    torch.testing.assert_close(dst.stages[3].attns[0].rpe_table.double(), bicubic_resize(table, (5, 5)),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dst.stages[0].attns[0].rpb, src.stages[0].attns[0].rpb)
    torch.testing.assert_close(dst.cls_head.weight, fresh_head)


def test_pretrained_loads_strictly_into_dat_base_384_shapes():
    """dat_base weights fit dat_base_384 unchanged (both keep 224 tables), so --pretrained needs no resizing."""
    with torch.device('meta'):
        base, big = timm.create_model('dat_base'), timm.create_model('dat_base_384')
    assert {k: v.shape for k, v in base.state_dict().items()} == {k: v.shape for k, v in big.state_dict().items()}


# ----------------------------------------------------------------------------- training and visualisation
@pytest.mark.slow
def test_digits_training_through_main(make_digits, tmp_path):
    """3 epochs of the demo DAT++ (N and D blocks) on 300 digits through main.py's engine: 18 steps of
    about 1 s each on an idle 2-core machine; 400 images reached 51/66/77% in a trial run."""
    from harness import run_main

    data = make_digits(64, train=30, val=10)
    argv = ['--cfg', os.path.join(ROOT, 'cfgs', 'demo', 'dat_digits.yaml'), '--data-path', data,
            '--output', str(tmp_path / 'out'), '--device', 'cpu',
            '--opts', 'DATA.NUM_WORKERS', '0', 'TRAIN.EPOCHS', '3', 'TRAIN.WARMUP_EPOCHS', '0', 'DATA.BATCH_SIZE',
            '50', 'TRAIN.BASE_LR', '1.2e-2', 'TRAIN.MIN_LR', '1e-4', 'PRINT_FREQ', '100', 'SAVE_FREQ', '3']
    run = run_main(argv).ok()
    assert run.result.max_accuracy >= 40.0                # chance is 10%
    assert run.summary['best']['acc1'] == pytest.approx(run.result.max_accuracy) and run.checkpoints


def test_deformable_visualisation_renders(tmp_path):
    from visualize.deformable import render_deformable
    torch.manual_seed(0)
    model = small_dat().eval()
    path = str(tmp_path / 'dat.png')
    info = render_deformable(model, path, image='china', stage=0, block=1, query=(0.5, 0.5), size=64)
    assert os.path.getsize(path) > 1000
    assert info['points'].shape[-1] == 2 and math.isclose(float(info['weights'].sum()), 1.0, rel_tol=1e-4)


def test_neighborhood_visualisation_draws_the_clamped_window(tmp_path):
    """An 'N' block drawn for a corner query: the k x k keys are the window shifted inward (explicit clamp
    here), and the weights equal a float64 recomputation from the block's input (qkv, bias at the true
    offset, softmax, mean over heads)."""
    from visualize.deformable import render_deformable
    torch.manual_seed(0)
    model = small_dat().eval()
    block = model.stages[0].attns[0]
    assert isinstance(block, NeighborhoodAttention) and block.kernel_size == 5
    seen = []
    handle = block.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].detach().double()))
    path = str(tmp_path / 'nat.png')
    info = render_deformable(model, path, image='china', stage=0, block=0, query=(0, 15), size=64, out_size=320)
    handle.remove()
    assert os.path.getsize(path) > 1000 and info['grid'] == (16, 16) and info['query'] == (0, 15)
    k, H, W = 5, 16, 16
    rows, cols = range(0, k), range(W - k, W)                    # clamp(0 - 2, 0, 11) = 0, clamp(13, 0, 11) = 11
    want_xy = [((c + 0.5) * 320 / W, (r + 0.5) * 320 / H) for r in rows for c in cols]
    torch.testing.assert_close(info['points'].double(), torch.tensor(want_xy, dtype=torch.float64), rtol=1e-6, atol=1e-4)
    x = seen[0][0].permute(1, 2, 0)                              # (H, W, C) of image 0
    C, heads = x.shape[-1], block.num_heads
    d = C // heads
    qkv = x @ block.qkv.weight.double().T + block.qkv.bias.double()
    weights = torch.zeros(k * k, dtype=torch.float64)
    for h in range(heads):
        q = qkv[0, 15, h * d:(h + 1) * d] * d ** -0.5
        logits = torch.stack([q @ qkv[r, c, C + h * d:C + (h + 1) * d]
                              + block.rpb[h, r - 0 + k - 1, c - 15 + k - 1].double() for r in rows for c in cols])
        weights += logits.softmax(0) / heads
    torch.testing.assert_close(info['weights'].double(), weights, rtol=1e-5, atol=1e-6)


def test_visualize_cli_draws_neighborhood_and_deformable_blocks(tmp_path):
    """``python -m visualize`` on the demo DAT++: an 'N' block (stage 0) and a 'D' block (stage 1) each write
    one PNG per query, named by the block kind; a query outside the grid is a one-line error (exit 2)."""
    from PIL import Image
    from sklearn.datasets import load_sample_image
    from visualize.cli import main as visualize_main
    photo = str(tmp_path / 'china.jpg')
    Image.fromarray(load_sample_image('china.jpg')).save(photo)
    cfg = os.path.join(ROOT, 'cfgs', 'demo', 'dat_digits.yaml')
    out = tmp_path / 'vis'
    for stage, kind in ((0, 'neighborhood'), (1, 'deformable')):
        assert visualize_main(['--cfg', cfg, '--image', photo, '--stage', str(stage), '--block', '0',
                               '--queries', '0,0', '3,5', '--output', str(out)]) == 0
        for r, c in ((0, 0), (3, 5)):
            assert os.path.getsize(out / f'stages.{stage}.attns.0_{kind}_r{r}_c{c}.png') > 1000
    assert visualize_main(['--cfg', cfg, '--image', photo, '--stage', '0', '--block', '0', '--queries', '99,0',
                           '--output', str(out)]) == 2


# ----------------------------------------------------------------------------- against the official code
NATTEN_STUB = '''
"""Stand-in for natten 0.14.6's two functions (the official nat.py imports them), from tests/dat_reference.py
semantics via our gather path (itself checked against the explicit loop reference above)."""
import torch
from models.neighborhood_attention import _window_bias, _window_index, neighborhood_av


class NATTEN2DQKRPBFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, rpb, kernel_size, dilation):
        B, h, H, W, d = q.shape
        flat = _window_index(H, W, kernel_size, q.device)[2]
        logits = torch.einsum('bhnd,bhnkd->bhnk', q.reshape(B, h, H * W, d), k.reshape(B, h, H * W, d)[:, :, flat])
        return logits.reshape(B, h, H, W, -1) + _window_bias(rpb, H, W, kernel_size)


class NATTEN2DAVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attn, v, kernel_size, dilation):
        return neighborhood_av(attn, v, kernel_size)
'''


@pytest.mark.skipif(not os.environ.get('DAT_OFFICIAL'), reason='set DAT_OFFICIAL=<checkout of LeapLabTHU/DAT>')
def test_matches_official_code(tmp_path):
    """The official DAT model (a user's checkout, imported from there, never copied; natten replaced by a
    stub of its two functions) and ours from the same YAML: identical state-dict keys, order, shapes and
    dtypes; the official random weights load strictly into ours; eval outputs agree to < 1e-5 (float32)."""
    import importlib.util
    import sys
    import types
    (tmp_path / 'natten').mkdir()
    (tmp_path / 'natten' / '__init__.py').write_text('')
    (tmp_path / 'natten' / 'functional.py').write_text(NATTEN_STUB)
    sys.path.append(str(tmp_path))
    root = os.path.join(os.environ['DAT_OFFICIAL'], 'models')
    package = types.ModuleType('dat_official')
    package.__path__ = [root]
    sys.modules['dat_official'] = package
    for name in ('dat_blocks', 'nat', 'slide', 'qna', 'dat'):
        spec = importlib.util.spec_from_file_location(f'dat_official.{name}', os.path.join(root, f'{name}.py'))
        module = importlib.util.module_from_spec(spec)
        sys.modules[f'dat_official.{name}'] = module
        spec.loader.exec_module(module)
    cfg = yaml.safe_load(open(CFGS['dat_tiny']))['MODEL']['DAT']
    torch.manual_seed(0)
    official = sys.modules['dat_official.dat'].DAT(**cfg).eval()
    ours = timm.create_model('dat_tiny').eval()
    theirs = official.state_dict()
    assert [(k, v.shape, v.dtype) for k, v in theirs.items()] == \
        [(k, v.shape, v.dtype) for k, v in ours.state_dict().items()]
    ours.load_state_dict(theirs, strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want, got = official(x)[0], ours(x)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
