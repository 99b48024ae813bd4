"""Focused linear attention in any timm ViT (``models.convert_attention``, ``MODEL.ATTENTION``) and FLatten-DeiT-T.

References are independent of the code under test: a float64 recomputation of the definition written here
(quadratic form, explicit per-head DWC with F.conv2d), the official module of ``models/flatten_pvt.py``
(sr_ratio 1) given the same weights, F.interpolate for resampled encodings, the paper's printed figures
(6.1M / 1.1G, truncated) for FLatten-DeiT-T. Models are tiny ViTs (embed 32-48, depth 2, 32-64 px).
"""
import copy
import logging
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention

import models  # noqa: F401  (registration)
from models import convert_attention
from models.attention_convert import FocusedLinearViTAttention
from models.flatten_pvt import FocusedLinearSRAttention
from models.focused_attention import attention_impl

from harness import run_main
from test_any_timm_model import eval_resume, recipe, train

TINY_VIT = ['MODEL.KWARGS', '{patch_size: 8, embed_dim: 48, depth: 2, num_heads: 3}']


def randomize(attn: FocusedLinearViTAttention, seed: int = 0) -> FocusedLinearViTAttention:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() != 2 else p.shape[1] ** -0.5))
    return attn


def definition(attn: FocusedLinearViTAttention, x: torch.Tensor, grid, prefix: int, p: float,
               focused: bool = True, dwc: bool = True) -> torch.Tensor:
    """Focused linear attention from its definition, in float64: phi(t) = f_p(relu(t) + 1e-6) / softplus(scale)
    with f_p(t) = t^p ||t|| / ||t^p|| (full channel norms), K + positional encoding, per head
    out_i = sum_j (q_i . k_j) v_j / (sum_j q_i . k_j + N 1e-6), plus a depth-wise conv (one kernel for all
    heads) of the patch tokens' V on their grid; prefix tokens get no conv term. Then the projection."""
    d64 = lambda t: t.detach().double()
    x = d64(x)
    B, N, C = x.shape
    h = attn.num_heads
    q, k, v = (x @ d64(attn.qkv.weight).T + d64(attn.qkv.bias)).split(C, dim=-1)
    k = k + d64(attn.positional_encoding)

    def phi(t):
        t = F.relu(t) + 1e-6
        if not focused:
            return t
        t = t / F.softplus(d64(attn.scale))
        return t ** p * t.norm(dim=-1, keepdim=True) / (t ** p).norm(dim=-1, keepdim=True)

    q, k = phi(q), phi(k)
    out = torch.zeros(B, N, C, dtype=torch.float64)
    d = C // h
    for head in range(h):
        sl = slice(head * d, (head + 1) * d)
        a = q[..., sl] @ k[..., sl].transpose(1, 2)                              # (B, N, N)
        out[..., sl] = (a @ v[..., sl]) / (a.sum(-1, keepdim=True) + N * 1e-6)
        if dwc:
            H, W = grid
            img = v[:, prefix:, sl].transpose(1, 2).reshape(B, d, H, W)
            conv = F.conv2d(img, d64(attn.dwc.weight), d64(attn.dwc.bias), padding=attn.dwc.padding, groups=d)
            out[:, prefix:, sl] += conv.reshape(B, d, H * W).transpose(1, 2)
    return out @ d64(attn.proj.weight).T + d64(attn.proj.bias)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def converted(dim: int, heads: int, grid, prefix: int, p: float = 3, seed: int = 0, **options):
    torch.manual_seed(seed)
    attn = Attention(dim, heads, qkv_bias=True)
    return randomize(FocusedLinearViTAttention(attn, grid, prefix, p, **options), seed).eval()


# ----------------------------------------------------------------------------- exactness
SIZES = [(32, 1, (4, 4), 3), (48, 3, (3, 5), 2), (64, 4, (6, 6), 4)]


@pytest.mark.parametrize('impl', ['reference', 'fast'])
@pytest.mark.parametrize('dim,heads,grid,p', SIZES)
def test_no_prefix_block_equals_the_official_module_and_the_definition(dim, heads, grid, p, impl):
    attn = converted(dim, heads, grid, 0, p)
    official = FocusedLinearSRAttention(dim, grid, heads, qkv_bias=True, sr_ratio=1, focusing_factor=p).eval()
    with torch.no_grad():     # q = the first third of qkv, kv = the rest; the added parameters as they are
        official.q.weight.copy_(attn.qkv.weight[:dim]), official.q.bias.copy_(attn.qkv.bias[:dim])
        official.kv.weight.copy_(attn.qkv.weight[dim:]), official.kv.bias.copy_(attn.qkv.bias[dim:])
        for name in ('proj.weight', 'proj.bias', 'dwc.weight', 'dwc.bias', 'scale', 'positional_encoding'):
            official.get_parameter(name).copy_(attn.get_parameter(name))
    x = torch.randn(2, grid[0] * grid[1], dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), attention_impl(impl):
        out = attn(x)
        assert rel_err(out, official(x, grid)) < 1e-5
    assert rel_err(out, definition(attn, x, grid, 0, p)) < 1e-5


@pytest.mark.parametrize('prefix', [1, 5])
def test_prefix_tokens_attend_and_are_attended_but_have_no_dwc(prefix):
    attn = converted(48, 3, (3, 4), prefix, 3)
    x = torch.randn(2, prefix + 12, 48, generator=torch.Generator().manual_seed(2))
    for impl in ('reference', 'fast'):
        with torch.no_grad(), attention_impl(impl):
            assert rel_err(attn(x), definition(attn, x, (3, 4), prefix, 3)) < 1e-5, impl


@pytest.mark.parametrize('focused,dwc', [(False, False), (True, False)])
def test_table4_settings_equal_their_definitions(focused, dwc):
    """Table 4: vanilla linear attention (ReLU kernel, no scale, no power, no DWC) and + focused function."""
    attn = converted(32, 2, (4, 4), 1, 3, focused=focused, dwc=dwc)
    names = {n for n, _ in attn.named_parameters()}
    assert ('scale' in names) == focused and not any(n.startswith('dwc') for n in names)
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(3))
    for impl in ('reference', 'fast'):
        with torch.no_grad(), attention_impl(impl):
            assert rel_err(attn(x), definition(attn, x, (4, 4), 1, 3, focused, dwc)) < 1e-5, impl


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_is_finite_and_close(dtype):
    """Large activations (|x| ~ 30 makes x^3 overflow float16): the kernel and product run in float32, as the
    official 2024-05-28 fix made them; the model in half precision and under autocast stays close to float32."""
    attn = converted(32, 2, (4, 4), 1, 3)
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(4)) * 30
    with torch.no_grad():
        ref = definition(attn, x, (4, 4), 1, 3)
        half = copy.deepcopy(attn).to(dtype)(x.to(dtype))
        with torch.autocast('cpu', dtype=dtype):
            auto = attn(x)
    for out in (half, auto):
        assert torch.isfinite(out).all() and rel_err(out, ref) < 3e-2


# ----------------------------------------------------------------------------- the switch on stock timm models
def tiny_vit(name: str = 'vit_tiny_patch16_224', **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4)
    return timm.create_model(name, **dict(args, **kw)).eval()


def test_convert_keeps_qkv_proj_and_adds_official_names():
    model = tiny_vit(reg_tokens=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert convert_attention(model, 'focused_linear', blocks=[1], kernel_size=3) is model
    assert type(model.blocks[0].attn) is Attention
    attn = model.blocks[1].attn
    assert isinstance(attn, FocusedLinearViTAttention) and attn.num_prefix_tokens == 3 and attn.grid == (4, 4)
    sd = model.state_dict()
    added = sorted(set(sd) - set(before))
    assert added == sorted(f'blocks.1.attn.{n}' for n in ('scale', 'positional_encoding', 'dwc.weight', 'dwc.bias'))
    assert sd['blocks.1.attn.positional_encoding'].shape == (1, 3 + 16, 32)
    assert sd['blocks.1.attn.scale'].shape == (1, 1, 32) and sd['blocks.1.attn.dwc.weight'].shape == (16, 1, 3, 3)
    assert all(torch.equal(sd[k], v) for k, v in before.items())
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unsupported_models_and_settings_are_one_line():
    with pytest.raises(ValueError, match=r"resnet18 .*not a timm ViT-style model") as err:
        convert_attention(timm.create_model('resnet18'))
    assert '\n' not in str(err.value)
    with pytest.raises(ValueError, match=r"flatten_deit_t block 0 has FocusedLinearViTAttention"):
        convert_attention(timm.create_model('flatten_deit_t', img_size=32, embed_dim=32, depth=1, num_heads=2))
    with pytest.raises(ValueError, match=r'blocks \[5\] out of range'):
        convert_attention(tiny_vit(), blocks=[5])
    with pytest.raises(ValueError, match='attention kind'):
        convert_attention(tiny_vit(), 'softmax')


def test_config_switch_and_its_errors(tmp_path):
    from config import ConfigError, load_config
    from models import build_model
    cfg = recipe(tmp_path, 'cfg')
    opts = ['MODEL.TYPE', 'vit_tiny_patch16_224', *TINY_VIT, 'MODEL.ATTENTION', 'focused_linear']
    model = build_model(load_config(cfg, opts + ['MODEL.LA.BLOCKS', '[1]', 'MODEL.LA.FOCUSING_FACTOR', '2']))
    assert type(model.blocks[0].attn) is Attention and model.blocks[1].attn.focusing_factor == 2.0
    model = build_model(load_config(cfg, opts + ['MODEL.LA.DWC', 'False', 'MODEL.LA.FOCUSED', 'False']))
    assert all(not b.attn.use_dwc and not b.attn.focused for b in model.blocks)
    with pytest.raises(ConfigError, match=r"MODEL.ATTENTION 'focused_linear': resnet18 .*not a timm ViT"):
        build_model(load_config(cfg, ['MODEL.TYPE', 'resnet18', 'MODEL.ATTENTION', 'focused_linear']))
    with pytest.raises(ConfigError, match=r"MODEL.ATTENTION must be"):
        load_config(cfg, ['MODEL.ATTENTION', 'linear'])


def test_dynamic_size_grid_follows_the_input_and_copies(tmp_path):
    """A converted stock ViT built with dynamic_img_size runs a non-square input on its grid (equal to the model
    built at that size with the encodings resampled), also in a deep copy (EMA) of it."""
    from models.attention_convert import fill_converted_state
    from timm.models.vision_transformer import checkpoint_filter_fn
    dyn = convert_attention(tiny_vit(dynamic_img_size=True))
    for b in dyn.blocks:
        randomize(b.attn, 5)
    ema = copy.deepcopy(dyn)
    x = torch.randn(1, 3, 48, 32, generator=torch.Generator().manual_seed(6))
    big = convert_attention(tiny_vit(img_size=(48, 32)))
    sd, added = fill_converted_state(checkpoint_filter_fn(dyn.state_dict(), big), big)
    assert not added
    big.load_state_dict(sd)
    with torch.no_grad():
        ref = big(x)
        assert rel_err(dyn(x), ref) < 1e-5 and rel_err(ema(x), ref) < 1e-5
    assert ema.blocks[0].attn.dynamic_grid == (6, 4)


# ----------------------------------------------------------------------------- checkpoints
def test_softmax_checkpoint_loads_with_new_parameters_reported(tmp_path, caplog):
    from resume import load_finetune_weights
    softmax = tiny_vit()
    path = str(tmp_path / 'softmax.pth')
    torch.save({'model': softmax.state_dict()}, path)
    model = convert_attention(tiny_vit())
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO):
        load_finetune_weights(model, path)
    assert 'focused-linear tensors not in the file, left at their initialisation' in caplog.text
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in softmax.state_dict().items())
    assert all(torch.equal(sd[k], init[k]) for k in sd if k not in softmax.state_dict())


def test_finetune_at_another_size_resamples_the_positional_encoding(tmp_path):
    from resume import load_finetune_weights
    small = convert_attention(tiny_vit())
    for b in small.blocks:
        randomize(b.attn, 7)
    path = str(tmp_path / 'small.pth')
    torch.save({'model': small.state_dict()}, path)
    big = convert_attention(tiny_vit(img_size=48))
    load_finetune_weights(big, path)
    old = small.blocks[0].attn.positional_encoding.detach()
    grid = old[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 6), mode='bicubic', align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, 32)
    got = big.blocks[0].attn.positional_encoding.detach()
    assert torch.equal(got[:, :1], old[:, :1]) and rel_err(got[:, 1:], want) < 1e-6


# ----------------------------------------------------------------------------- FLatten-DeiT-T
def test_flatten_deit_t_params_and_flops_match_the_paper_rounding():
    """Paper: 6.1M / 1.1G (DeiT-T 5.7M / 1.2G, truncated figures): plain fvcore at 224 in [1.1, 1.2)G."""
    from fvcore.nn import FlopCountAnalysis
    model = timm.create_model('flatten_deit_t').eval()
    params = sum(p.numel() for p in model.parameters())
    assert 6.1e6 <= params < 6.2e6, params
    deit = timm.create_model('deit_tiny_patch16_224')
    assert params - sum(p.numel() for p in deit.parameters()) == 12 * (197 * 192 + 192 + 64 * 25 + 64)

    def gflops(depth: int) -> float:
        # FLOPs are affine in the depth (identical blocks): two shallow counts give the 12-block total cheaply
        with torch.no_grad():
            count = FlopCountAnalysis(timm.create_model('flatten_deit_t', depth=depth).eval(),
                                      torch.randn(1, 3, 224, 224))
            count.unsupported_ops_warnings(False), count.uncalled_modules_warnings(False)
            return count.total() / 1e9
    one, two = gflops(1), gflops(2)
    total = one + 11 * (two - one)
    assert 1.1 <= total < 1.2, total
    assert abs(total - 1.149) < 1e-3          # the full model's count (README), measured once


def test_flatten_deit_t_features_and_dynamic_size():
    kw = dict(img_size=64, embed_dim=32, depth=2, num_heads=2)
    feat = timm.create_model('flatten_deit_t', features_only=True, out_indices=(0, 1), dynamic_img_size=True, **kw)
    with torch.no_grad():
        maps = feat.eval()(torch.randn(1, 3, 96, 48))
    assert [tuple(m.shape) for m in maps] == [(1, 32, 6, 3)] * 2 and feat.feature_info.reduction() == [16, 16]
    fixed = timm.create_model('flatten_deit_t', **kw).eval()
    with pytest.raises(AssertionError, match='dynamic_img_size'):
        fixed(torch.randn(1, 3, 96, 64))


@pytest.mark.parametrize('setting', [dict(focused=False, dwc=False), dict(dwc=False)])
def test_flatten_deit_t_table4_settings_are_keyword_arguments(setting):
    model = timm.create_model('flatten_deit_t', img_size=32, embed_dim=32, depth=1, num_heads=2, **setting)
    attn = model.blocks[0].attn
    assert attn.focused == setting.get('focused', True) and not attn.use_dwc
    # the shipped ablation YAMLs select the same settings through MODEL.LA
    from config import load_config
    from models import build_model
    name = 'no_dwc' if setting.get('focused', True) else 'vanilla'
    config = load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'cfgs', f'flatten_deit_t_{name}.yaml'),
                         ['MODEL.KWARGS', '{embed_dim: 32, depth: 1, num_heads: 2}', 'DATA.IMG_SIZE', '32'])
    attn = build_model(config).blocks[0].attn
    assert attn.focused == setting.get('focused', True) and not attn.use_dwc


# ----------------------------------------------------------------------------- through main.py
@pytest.mark.slow
def test_converted_stock_vit_trains_reevaluates_and_takes_a_softmax_checkpoint(digits, tmp_path, caplog):
    cfg = recipe(tmp_path, 'vitla', epochs=4)
    # a ViT from scratch on 300 digits: a lower learning rate than the recipe's (softmax and linear alike)
    opts = ['MODEL.TYPE', 'deit_tiny_patch16_224', *TINY_VIT, 'MODEL.ATTENTION', 'focused_linear',
            'TRAIN.BASE_LR', '5e-4']
    run = train(cfg, digits, str(tmp_path / 'out'), *opts)
    model = run.result.model
    assert all(isinstance(b.attn, FocusedLinearViTAttention) for b in model.blocks)
    best = run.summary['best']['acc1']
    assert best >= 20.0, f'best val Acc@1 {best}% (chance is 10%; 20% of 99 images: p < 1e-3)'
    again = eval_resume(cfg, digits, str(tmp_path / 'out'), run.path('max_acc.pth'), *opts)
    assert again.result.eval.acc1 == best
    # a softmax checkpoint of the same model: --pretrained loads it, the new parameters named in the log
    softmax = timm.create_model('deit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=48, depth=2,
                                num_heads=3, num_classes=10)
    path = str(tmp_path / 'softmax.pth')
    torch.save({'model': softmax.state_dict()}, path)
    caplog.clear()
    run_main(['--cfg', cfg, '--data-path', digits, '--output', str(tmp_path / 'out'), '--tag', 'pre',
              '--device', 'cpu', '--eval', '--pretrained', path, '--opts', *opts]).ok()
    assert '8 focused-linear tensors not in the file, left at their initialisation' in caplog.text


# ----------------------------------------------------------------------------- the tools and main_ema.py
def test_tools_and_main_ema_take_a_converted_config(make_digits, tmp_path, capsys):
    """MODEL.ATTENTION focused_linear on a stock timm ViT through tools/model_stats.py (parameters: the
    softmax model's plus the focused-linear tensors counted here, to the table's 1e-3 M), tools/benchmark.py
    --cfgs, tools/export.py --cfg --check (ONNX Runtime against eager, batch 1 and 3) and main_ema.py (one
    epoch, EMA checkpoint)."""
    import importlib.util
    import yaml
    from tools import benchmark, model_stats
    cfg = recipe(tmp_path, 'vitla', epochs=1)
    with open(cfg) as f:
        recipe_yaml = yaml.safe_load(f)
    recipe_yaml['MODEL'].update(TYPE='vit_tiny_patch16_224', ATTENTION='focused_linear',
                                KWARGS={'patch_size': 8, 'embed_dim': 32, 'depth': 1, 'num_heads': 2},
                                LA={'KERNEL_SIZE': 3})
    with open(cfg, 'w') as f:
        yaml.safe_dump(recipe_yaml, f)
    softmax = tiny_vit(depth=1, num_classes=10)
    # per converted block: scale (C) + positional encoding ((1 + 16) x C) + dwc (head_dim x 3 x 3 + head_dim)
    extra = 32 + 17 * 32 + 16 * 9 + 16
    assert model_stats.main([cfg]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1].split('|')
    assert row[2].strip() == 'vit_tiny_patch16_224'
    assert float(row[3]) == round((sum(p.numel() for p in softmax.parameters()) + extra) / 1e6, 3)
    float(row[4])                      # counted (fvcore on the converted module: flatten_deit_t's FLOP test)
    result = benchmark.main(['--smoke', '--no-flops', '--modes', 'infer', 'train', '--cfgs', cfg])
    assert [r['mode'] for r in result['models']] == ['infer', 'train']
    assert all(r['ours']['img_s'] > 0 for r in result['models'])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location('export_tool', os.path.join(root, 'tools', 'export.py'))
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    assert export.main(['--cfg', cfg, '--output', str(tmp_path / 'vitla.onnx'), '--check']) == 0
    run = run_main(['--cfg', cfg, '--data-path', make_digits(size=32, train=2, val=1), '--output',
                    str(tmp_path / 'out'), '--device', 'cpu'], ema=True).ok()
    assert all(isinstance(b.attn, FocusedLinearViTAttention) for b in run.result.model.blocks)
    assert os.path.isfile(run.path('max_ema_acc.pth'))
