"""Our families as a timm library: registry and pretrained_cfg, create_model for every
name, features_only / forward_intermediates / feature_info, dynamic_img_size (checked against models built
natively at the other size), torch.hub, official-format checkpoints through pretrained_cfg_overlay, the
checkpoint filters' 224 -> 384 resizing against an F.interpolate recomputation written here, SDPA against
the explicit-probabilities path, official initial weights (random draws replayed by hand in the official
construction order), config size keys, unused parameters, and the models/ import rule."""
from __future__ import annotations

import argparse
import io

import ast
import glob
import os

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import models  # noqa: F401  (registers the families)
from config import ConfigError, load_config
from models import build_model
from models.flatten_cswin import FocusedLinearStripeAttention, LePEAttention
from models.flatten_pvt import FocusedLinearSRAttention, PVTBlock, SRAttention
from models.flatten_pvt_v2 import DepthwiseConvMlp
from models.layers import WindowAttention, shifted_window_mask
from models.flatten_swin import FocusedLinearWindowAttention

from our_registry import feature_reductions, module_of, our_names, tiny_kwargs, tiny_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMM_SUITE = os.path.join(ROOT, 'tests', 'timm_suite', 'test_models.py')

# every name `import models` registers (the registry, filtered to our modules, as timm's own tests select
# theirs); the FLatten families are the names whose pretrained_cfg cites the FLatten paper
OURS = our_names()
FLATTEN = [n for n in OURS if timm.models.get_pretrained_cfg(n).paper_ids == 'arXiv:2308.00442']
# (the hierarchical families: a plain ViT family, one stride, is checked for features and dynamic_img_size by
# the generic checks and its own tests)
FAMILY_REPS = sorted(n for n in tiny_names() if n in FLATTEN and len(set(feature_reductions(n))) > 1)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if n.endswith('norm1.weight') else 0.0))
    return model


# ----------------------------------------------------------------------------- registry
def test_registered_names_and_pretrained_cfgs():
    # every family registers its variants and (FLatten) their softmax baselines under names that cannot
    # clash with timm's own (a clash would overwrite timm's entry; our entrypoints must be ours)
    assert {module_of(n) for n in OURS} >= {'models.flatten_swin', 'models.flatten_pvt', 'models.flatten_pvt_v2',
                                            'models.flatten_cswin', 'models.dat', 'models.l2vit', 'models.visformer'}
    # a FLatten family with softmax baselines has one per variant (PVTv2 b5 / b2_li: no official softmax
    # counterpart); FLatten-DeiT-T's baseline is timm's own deit_tiny_patch16_224
    twinned = {module_of(n) for n in OURS if n.endswith('_softmax')}
    assert all(n + '_softmax' in OURS for n in FLATTEN if module_of(n) in twinned and not n.endswith('_softmax')
               and not n.endswith(('_b5', '_li')))
    assert timm.is_model('deit_tiny_patch16_224')
    for name in OURS:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg is not None and cfg.url in ('', None) and cfg.hf_hub_id in ('', None), name   # never downloads
        assert cfg.num_classes == 1000 and cfg.classifier and cfg.first_conv, name   # names: timm's suite checks
        assert cfg.input_size == (3, 384, 384) if '_384' in name else cfg.input_size == (3, 224, 224)
        if cfg.pool_size is not None:       # every map-pooled family: /32
            assert cfg.pool_size == (cfg.input_size[1] // 32, cfg.input_size[2] // 32), name
        else:                               # token-pooled (a plain ViT family): one stride-16 token grid
            assert set(feature_reductions(name)) == {16}, name
    for name in FLATTEN:
        assert timm.models.get_pretrained_cfg(name).paper_ids == 'arXiv:2308.00442'
    # the official download addresses are kept as metadata
    assert 'cloud.tsinghua.edu.cn' in timm.models.get_pretrained_cfg('flatten_swin_t').origin_url


@pytest.mark.parametrize('name', OURS)
def test_create_model_every_name(name):
    kw = tiny_kwargs(name)
    model = timm.create_model(name, num_classes=5, drop_path_rate=0.1, **kw).eval()
    s = kw['img_size']
    x = torch.randn(1, 3, s, s)
    with torch.no_grad():
        out = model(x)
        features = model.forward_features(x)
    assert out.shape == (1, 5) and torch.isfinite(out).all()
    assert model.pretrained_cfg['architecture'] == name
    # forward_features is laid out as output_fmt says: channels on its axis, the last stage's map on the others
    fmt, m = getattr(model, 'output_fmt', 'NCHW'), -(-s // model.feature_info[-1]['reduction'])
    assert features.shape == ((1, model.num_features, m, m) if fmt == 'NCHW' else
                              (1, model.num_prefix_tokens + m * m, model.num_features) if fmt == 'NLC' else
                              (1, m, m, model.num_features)), (fmt, features.shape)
    kinds = {m.attn_kind for m in model.modules() if hasattr(m, 'attn_kind')}
    if name.endswith('_softmax'):
        assert kinds == {'softmax'}
    elif name in FLATTEN:
        assert 'linear' in kinds
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    with torch.no_grad():
        assert model.forward_head(features).shape == (1, model.num_features) == model(x).shape


def test_bad_keyword_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match='depths'):
        timm.create_model('flatten_pvt_t', depths=(1, 1))
    with pytest.raises(ValueError, match='attn_type'):
        timm.create_model('flatten_swin_t', attn_type='LLS')


# ----------------------------------------------------------------------------- features
@pytest.mark.parametrize('name', FAMILY_REPS)
def test_features_only_and_intermediates(name):
    kw = tiny_kwargs(name)
    s = kw['img_size']
    x = torch.randn(1, 3, s, s)
    feat = timm.create_model(name, features_only=True, out_indices=(0, 1, 2, 3), **kw).eval()
    with torch.no_grad():
        maps = feat(x)
    assert len(maps) == 4
    assert [m.shape[1] for m in maps] == feat.feature_info.channels()
    swin = module_of(name) == 'models.flatten_swin'          # its tiny kwargs use 2-pixel patches
    assert feat.feature_info.reduction() == ([2, 4, 8, 16] if swin else [4, 8, 16, 32])
    for m, r in zip(maps, feat.feature_info.reduction()):
        assert m.shape[-2:] == (s // r, s // r)

    model = timm.create_model(name, **kw).eval()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, norm=True)
        ff = model.forward_features(x)
        assert torch.equal(final, ff)
        assert model.output_fmt == 'NHWC' and torch.equal(inter[-1].permute(0, 2, 3, 1), ff)
        only = model.forward_intermediates(x, indices=[1], intermediates_only=True)
        assert len(only) == 1 and torch.equal(only[0], inter[1])
    taken = model.prune_intermediate_layers([0, 1])
    assert taken == [0, 1]
    with torch.no_grad():
        pruned = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(pruned, inter[:2]))


# ----------------------------------------------------------------------------- dynamic_img_size
@pytest.mark.parametrize('name', FAMILY_REPS)
def test_dynamic_img_size(name):
    kw = tiny_kwargs(name)
    if 'swin' in name:       # two blocks in stages 1-3: shifted windows with padding and runtime masks
        kw = dict(kw, depths=(2, 2, 2, 1))
    s = kw['img_size']
    torch.manual_seed(0)
    fixed = randomize_(timm.create_model(name, num_classes=3, **kw)).eval()
    dyn = timm.create_model(name, num_classes=3, dynamic_img_size=True, **kw).eval()
    dyn.load_state_dict(fixed.state_dict())
    x = torch.randn(1, 3, s, s)
    with torch.no_grad():
        assert torch.equal(dyn(x), fixed(x))                 # native size: unchanged
        for hw in ((s - 20, s + 12), (s + 30, s - 28)):      # non-square, not window multiples
            out = dyn(torch.randn(1, 3, *hw))
            assert out.shape == (1, 3) and torch.isfinite(out).all()
            maps = dyn.forward_intermediates(torch.randn(1, 3, *hw), intermediates_only=True)
            r0 = dyn.feature_info[0]['reduction']
            # stride-4 stem: ceil(size / 4) (padding) or the stem conv's own rounding (CSwin's 7x7, pad 2)
            assert all(abs(m - (-(-e // r0))) <= 1 for m, e in zip(maps[0].shape[-2:], hw))
    with pytest.raises(ValueError, match='dynamic_img_size'):
        fixed(torch.randn(1, 3, s + 32, s))


@pytest.mark.parametrize('name, other', [('flatten_swin_t_softmax', 224), ('flatten_pvt_v2_b0_softmax', 96)])
def test_dynamic_size_equals_a_model_built_at_that_size(name, other):
    """Parameter shapes that do not depend on the size: a dynamic model run at ``other`` must equal the
    model built natively for ``other`` (its masks / grids computed at construction) with the same weights."""
    kw = tiny_kwargs(name)
    if 'swin' in name:       # one block in stage 4: its 7x7 map at 112 clamps the window (no shifted block)
        kw = dict(kw, depths=(2, 2, 2, 1))
    torch.manual_seed(0)
    dyn = randomize_(timm.create_model(name, dynamic_img_size=True, **kw)).eval()
    native = timm.create_model(name, **dict(kw, img_size=other)).eval()
    own = native.state_dict()
    native.load_state_dict({k: (own[k] if k.endswith('attn_mask') else v) for k, v in dyn.state_dict().items()})
    x = torch.randn(1, 3, other, other)
    with torch.no_grad():
        torch.testing.assert_close(dyn(x), native(x), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- hub, checkpoints
def test_torch_hub_local():
    model = torch.hub.load(ROOT, 'flatten_pvt_v2_b0', source='local', num_classes=4,
                           **tiny_kwargs('flatten_pvt_v2_b0'))
    assert type(model).__name__ == 'FLattenPVTv2' and model.num_classes == 4


@pytest.mark.parametrize('name, wrap', [('flatten_swin_t', 'model'), ('flatten_pvt_t', 'state_dict'),
                                        ('flatten_pvt_v2_b0', 'module'), ('flatten_cswin_t', 'model_ema')])
def test_official_checkpoint_through_pretrained_cfg_overlay(tmp_path, name, wrap):
    kw = tiny_kwargs(name)
    torch.manual_seed(0)
    src = randomize_(timm.create_model(name, num_classes=7, **kw)).eval()
    sd = src.state_dict()
    if wrap == 'module':                        # DDP-saved weights, as in a resumable official checkpoint
        ckpt = {'model': {'module.' + k: v for k, v in sd.items()}, 'epoch': 299, 'max_accuracy': 71.1}
    elif wrap == 'model_ema':                   # main_ema.py: both, the EMA weights preferred by timm
        ckpt = {'model': {k: torch.zeros_like(v) for k, v in sd.items()}, 'model_ema': sd, 'epoch': 3}
    else:
        ckpt = {wrap: sd, 'epoch': 299, 'max_accuracy': 82.1}
    if wrap == 'model':                         # the Swin-codebase trainer pickles its yacs config, DeiT's its args
        from yacs.config import CfgNode
        ckpt['config'] = CfgNode({'MODEL': CfgNode({'TYPE': 'flatten_swin', 'NUM_CLASSES': 7})})
        ckpt['args'] = argparse.Namespace(lr=5e-4, model=name)
    path = tmp_path / 'official.pth'
    torch.save(ckpt, path)
    torch.manual_seed(1)
    dst = timm.create_model(name, pretrained=True, num_classes=7,
                            pretrained_cfg_overlay=dict(file=str(path), num_classes=7), **kw).eval()
    x = torch.randn(2, 3, kw['img_size'], kw['img_size'])
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


def _bicubic_grid(t: torch.Tensor, old, new) -> torch.Tensor:
    """(1, h*w, C) row-major tokens -> (1, H*W, C), bicubic, written out here (independent reference)."""
    c = t.shape[-1]
    img = t[0].T.reshape(1, c, *old)
    return F.interpolate(img, size=new, mode='bicubic', align_corners=False)[0].reshape(c, -1).T[None]


def _bicubic_table(t: torch.Tensor, new_len: int) -> torch.Tensor:
    s, r = round(t.shape[0] ** 0.5), round(new_len ** 0.5)
    out = [F.interpolate(t[:, h].reshape(1, 1, s, s), size=(r, r), mode='bicubic',
                         align_corners=False).reshape(-1) for h in range(t.shape[1])]
    return torch.stack(out, 1)


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_checkpoint_filter_resizes_224_to_384(family):
    if family == 'swin':
        from models.flatten_swin import checkpoint_filter_fn
        kw = dict(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), attn_type='LLSS', num_classes=2)
        src = timm.create_model('flatten_swin_t', img_size=224, window_size=56, **kw)
        dst = timm.create_model('flatten_swin_b_384', img_size=384, window_size=96, **kw)
    else:
        from models.flatten_cswin import checkpoint_filter_fn
        kw = dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), num_classes=2)
        src = timm.create_model('flatten_cswin_t', img_size=224, la_split=(56, 28, 14, 7), **kw)
        dst = timm.create_model('flatten_cswin_t', img_size=384, la_split=(96, 48, 24, 12),
                                softmax_split=(1, 2, 12, 12), **kw)
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in randomize_(src).state_dict().items()}
    out = checkpoint_filter_fn({'model': sd}, dst)
    dst.load_state_dict(out, strict=True)
    resized = 0
    for k, v in dst.state_dict().items():
        if k.endswith('positional_encoding') and sd[k].shape != v.shape:
            old, new = round(sd[k].shape[1] ** 0.5), round(v.shape[1] ** 0.5)
            torch.testing.assert_close(v, _bicubic_grid(sd[k], (old, old), (new, new)), rtol=1e-5, atol=1e-6)
            resized += 1
        elif k.endswith('relative_position_bias_table') and sd[k].shape != v.shape:
            torch.testing.assert_close(v, _bicubic_table(sd[k], v.shape[0]), rtol=1e-5, atol=1e-6)
            resized += 1
        elif k.endswith(('relative_position_index', 'attn_mask')):
            continue
        else:
            assert torch.equal(v, sd[k]), k
    assert resized == (2 * 2 + 2 * 2 if family == 'swin' else 2)   # swin: 2 L stages x 2 pe, 2 S x 2 tables


# ----------------------------------------------------------------------------- SDPA
def _both_paths(module: nn.Module, *args, **kwargs):
    module.eval()
    with torch.no_grad():
        fused = module(*args, **kwargs)
        handle = module.tap.register_forward_hook(lambda *a: None)
        explicit = module(*args, **kwargs)
        handle.remove()
    return fused, explicit


@pytest.mark.parametrize('shift', [0, 3])
def test_sdpa_equals_explicit_window_attention(shift):
    torch.manual_seed(0)
    attn = WindowAttention(32, 7, 4)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    mask = shifted_window_mask((14, 14), 7, shift) if shift else None
    x = torch.randn(2 * 4, 49, 32)
    fused, explicit = _both_paths(attn, x, mask=mask)
    assert (fused - explicit).abs().max() / explicit.abs().max() < 1e-6


def test_sdpa_equals_explicit_pvt_and_cswin():
    torch.manual_seed(0)
    sr = SRAttention(32, (8, 8), 4, sr_ratio=2)
    fused, explicit = _both_paths(sr, torch.randn(2, 64, 32))
    assert (fused - explicit).abs().max() / explicit.abs().max() < 1e-6
    lepe = LePEAttention(16, 8, 0, 2, 2)
    q, k, v = torch.randn(3, 2, 64, 16).unbind(0)
    fused, explicit = _both_paths(lepe, q, k, v)
    assert (fused - explicit).abs().max() / explicit.abs().max() < 1e-6


# ----------------------------------------------------------------------------- official initial weights
def _trunc_normal_official(w: torch.Tensor) -> None:
    """The official code's init call: timm's trunc_normal_ (std .02)."""
    from timm.layers import trunc_normal_
    trunc_normal_(w, std=.02)


def test_focused_attention_draws_follow_the_official_order():
    """Official constructors create the projections (and PVT's reduction conv, CSwin's get_v) before dwc;
    replayed here with plain modules in that order under the same seed."""
    dim, heads, k = 16, 2, 5
    torch.manual_seed(3)
    ref = [nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Conv2d(8, 8, k, groups=8, padding=2)]
    torch.manual_seed(3)
    swin = FocusedLinearWindowAttention(dim, 4, heads)
    for ours, theirs in zip((swin.qkv, swin.proj, swin.dwc), ref):
        assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)

    torch.manual_seed(4)
    ref = [nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim), nn.Conv2d(dim, dim, 2, 2),
           nn.Conv2d(8, 8, k, groups=8, padding=2)]
    torch.manual_seed(4)
    pvt = FocusedLinearSRAttention(dim, (8, 8), heads, sr_ratio=2)
    for ours, theirs in zip((pvt.q, pvt.kv, pvt.proj, pvt.sr, pvt.dwc), ref):
        assert torch.equal(ours.weight, theirs.weight), ours

    torch.manual_seed(5)
    ref = [nn.Conv2d(dim, dim, 3, padding=1, groups=dim), nn.Conv2d(8, 8, k, groups=8, padding=2)]
    torch.manual_seed(5)
    cswin = FocusedLinearStripeAttention(dim, 8, -1, 8, heads)
    for ours, theirs in zip((cswin.get_v, cswin.dwc), ref):
        assert torch.equal(ours.weight, theirs.weight)


def test_pvt_v2_block_replays_the_official_nested_init():
    """The official PVTv2 re-initialises at the end of the attention, MLP and block constructors (one
    function for Linear / LayerNorm / Conv2d, applied depth-first); replayed by hand."""
    import math

    def official_init(m):
        if isinstance(m, nn.Linear):
            _trunc_normal_official(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))

    dim, hidden = 16, 32
    torch.manual_seed(6)
    norm1 = nn.LayerNorm(dim)                                                  # noqa: F841
    attn = [nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim), nn.Conv2d(8, 8, 5, groups=8, padding=2)]
    for m in attn:                                     # the attention constructor's own apply
        official_init(m)
    mlp = [nn.Linear(dim, hidden), nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden), nn.Linear(hidden, dim)]
    for m in mlp:                                      # the MLP constructor's own apply
        official_init(m)
    for m in attn + mlp:                               # the block constructor's apply (module order)
        official_init(m)

    torch.manual_seed(6)
    from models.flatten_pvt_v2 import init_pvt_v2
    from functools import partial
    blk = PVTBlock(dim, (4, 4), 2, 'L', 1, partial(DepthwiseConvMlp, resolution=(4, 4)), 2., nested_init=init_pvt_v2)
    ours = [blk.attn.q, blk.attn.kv, blk.attn.proj, blk.attn.dwc, blk.mlp.fc1, blk.mlp.dwconv.dwconv, blk.mlp.fc2]
    for a, b in zip(ours, attn + mlp):
        assert torch.equal(a.weight, b.weight), a


def test_state_dict_order_is_unchanged():
    """Creating modules in the official order must not move keys: dwc stays after the projections."""
    keys = list(FocusedLinearSRAttention(16, (8, 8), 2, sr_ratio=2).state_dict())
    assert keys == ['scale', 'positional_encoding', 'q.weight', 'q.bias', 'kv.weight', 'kv.bias', 'proj.weight',
                    'proj.bias', 'sr.weight', 'sr.bias', 'norm.weight', 'norm.bias', 'dwc.weight', 'dwc.bias']


# ----------------------------------------------------------------------------- config, DDP hints, imports
def test_pvt_size_keys_and_unused_keys():
    cfg = os.path.join(ROOT, 'cfgs/flatten_pvt_t.yaml')
    model = build_model(load_config(cfg, ['DATA.IMG_SIZE', '64', 'MODEL.PVT.DEPTHS', '[1, 1, 1, 1]',
                                          'MODEL.PVT.EMBED_DIMS', '[8, 16, 24, 32]',
                                          'MODEL.PVT.NUM_HEADS', '[1, 2, 3, 4]']))
    assert [len(stage.blocks) for stage in model.stages] == [1, 1, 1, 1]
    assert model.feature_info[3]['num_chs'] == 32
    with pytest.raises(ConfigError, match=r'MODEL\.PVT\.DEPTHS'):
        load_config(os.path.join(ROOT, 'cfgs/flatten_swin_t.yaml'), ['MODEL.PVT.DEPTHS', '[1, 1, 1, 1]'])
    with pytest.raises(ConfigError, match=r'MODEL\.SWIN\.EMBED_DIM'):
        load_config(cfg, ['MODEL.SWIN.EMBED_DIM', '64'])
    with pytest.raises(ConfigError, match=r'MODEL\.CSWIN\.DEPTHS'):
        build_model(load_config(os.path.join(ROOT, 'cfgs/flatten_cswin_t.yaml'), ['MODEL.CSWIN.DEPTHS', '[1, 1]']))
    for path in glob.glob(os.path.join(ROOT, 'cfgs', '**', '*.yaml'), recursive=True):
        load_config(path)                                  # every shipped YAML still validates


@pytest.mark.parametrize('name', sorted(tiny_names()))
def test_every_parameter_gets_a_gradient(name):
    """No registered model has a parameter outside the computation (DDP needs no find_unused_parameters);
    PVT-v1's official, never-applied final norm stays in the state dict as buffers."""
    kw = tiny_kwargs(name)
    model = timm.create_model(name, **kw).train()
    model(torch.randn(2, 3, kw['img_size'], kw['img_size'])).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert not getattr(model, 'has_unused_parameters', False)
    if module_of(name) == 'models.flatten_pvt':
        assert {'norm.weight', 'norm.bias'} <= set(model.state_dict())


def test_vendored_timm_test_file_is_byte_identical():
    """tests/timm_suite/test_models.py is timm's tests/test_models.py at huggingface/pytorch-image-models
    aa4b5850c1543fa488abf260f18390eda46cf85d: its git blob hash, recomputed here."""
    import hashlib
    data = open(TIMM_SUITE, 'rb').read()
    blob = hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()
    assert blob == '224a96fa2c7c52cfb0ce34e3be8f350c16f3427e'


def test_every_family_has_a_tiny_variant_in_the_normal_timm_suite():
    tiny = tiny_names()
    for mod in {module_of(n) for n in OURS}:
        assert any(module_of(n) == mod for n in tiny), mod
    assert all(n + '_softmax' in tiny for n in tiny if n in FLATTEN and n + '_softmax' in OURS)
    # a twin left to -m timm_full has its softmax blocks in the hybrid tiny variant's 'S' stages
    from timm_suite.conftest import COVERED_BY_HYBRID
    for twin in COVERED_BY_HYBRID:
        name = twin[:-len('_softmax')]
        assert name in tiny, twin
        kinds = {type(m) for m in timm.create_model(name, **tiny_kwargs(name)).modules()}
        assert {FocusedLinearStripeAttention, LePEAttention} <= kinds, twin


def test_models_import_no_experiment_modules():
    banned = {'config', 'engine', 'data', 'checkpoint', 'main', 'main_ema', 'optimizer'}
    for path in glob.glob(os.path.join(ROOT, 'models', '*.py')):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split('.')[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [(node.module or '').split('.')[0]]
            else:
                continue
            assert not set(names) & banned, f'{os.path.basename(path)} imports {names}'


# ----------------------------------------------------------------------------- plain torch.fx
PLAIN_FX = {   # the tiny variant of every family, shrunk (64 px, one block a stage where the family allows)
    'flatten_swin_t': dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4),
    'flatten_pvt_t': dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1)),
    'flatten_pvt_v2_b0': dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1)),
    'flatten_cswin_t': dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), la_split=(16, 8, 4, 2),
                            softmax_split=(1, 2, 2, 2)),
}


@pytest.mark.parametrize('name', list(PLAIN_FX))
def test_plain_fx_symbolic_trace_of_focused_linear_models(name):
    """``torch.fx.symbolic_trace`` without timm's leaf list traces through the focused linear attention (its
    reference formulas, no autocast region on a traced device): the GraphModule matches eager (the fast path)
    to float rounding, and the focused kernel's operators are in the graph."""
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=64, num_classes=5, **PLAIN_FX[name]).eval()
    graph_module = torch.fx.symbolic_trace(model)
    assert any(n.op == 'call_function' and 'softplus' in str(n.target) for n in graph_module.graph.nodes)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(graph_module(x), model(x), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- TorchScript
@pytest.mark.parametrize('name', sorted(n for n in tiny_names() if not n.endswith('_softmax')))
def test_torchscript_matches_eager_and_saves(name):
    """``torch.jit.script`` compiles the tiny variant of every family (dynamic_img_size on; the softmax
    twins, whose attention is the shared SDPA code, are scripted by timm's own tests): saved and
    loaded back, it equals the eager model (the fast paths there, their reference formulas in the script)
    at the native size and at another one (DAT++: native); a fixed-size script still names the fix for a
    wrong size."""
    kw = tiny_kwargs(name)
    s = kw.get('img_size', 224)
    torch.manual_seed(0)
    model = randomize_(timm.create_model(name, num_classes=5, dynamic_img_size=True, **kw)).eval()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    buffer.seek(0)
    scripted = torch.jit.load(buffer)
    g = torch.Generator().manual_seed(1)
    # DAT++'s shifted-window ('S') blocks keep the official mask made for the native map: native size only
    sizes = ((s, s),) if module_of(name) == 'models.dat' else ((s, s), (s + 32, s))
    with torch.no_grad():
        for hw in sizes:
            x = torch.randn(2, 3, *hw, generator=g)
            torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-5)
    if module_of(name) in ('models.dat', 'models.l2vit'):
        return                           # size-agnostic families: any size is the model's size
    fixed = torch.jit.script(timm.create_model(name, num_classes=5, **kw).eval())
    with pytest.raises(Exception, match='dynamic_img_size'):
        fixed(torch.randn(1, 3, s + 32, s))
