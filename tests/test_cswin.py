"""FLatten-CSwin: shipped configs, official parameter counts and key layout, a float64 naive recomputation of
a linear CSwin block (focused attention + dwc + LePE), per-window semantics for stripes narrower than the
map, taps, gradient checkpointing and ConfigErrors."""
import os

import pytest
import torch
import torch.nn.functional as F

from config import ConfigError, load_config
from models import build_model
from models.flatten_cswin import CSWinBlock, FLattenCSWinTransformer, FocusedLinearStripeAttention, LePEAttention
from reference import naive_depthwise_conv, naive_focused_linear_attention

CFGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'cfgs')

# Parameter counts of the official models (LeapLabTHU/FLatten-Transformer, built with the same YAMLs; fvcore
# reports 21.202 / 35.452 / 74.867 / 78.369 M for the LLSS ones). The SSSS counts come from the official
# code built with ATTN_TYPE 'SSSS'.
OFFICIAL_PARAMS = {
    'flatten_cswin_t': 21_201_768, 'flatten_cswin_s': 35_451_752,
    'flatten_cswin_b': 74_867_032, 'flatten_cswin_b_384': 78_369_112,
    'cswin_t': 20_393_320, 'cswin_s': 34_643_304, 'cswin_b': 73_053_640, 'cswin_b_384': 73_053_640,
}


def cfg(name, *opts):
    return load_config(os.path.join(CFGS, f'{name}.yaml'), list(opts))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- shipped configs
@pytest.mark.parametrize('name', sorted(OFFICIAL_PARAMS))
def test_shipped_config_builds_with_official_param_count(name):
    config = cfg(name)
    assert config.MODEL.LA.ATTN_TYPE == ('SSSS' if name.startswith('cswin') else 'LLSS')
    with torch.device('meta'):                       # shapes only: skips initialising ~75M weights
        model = build_model(config)
    assert n_params(model) == OFFICIAL_PARAMS[name]


def test_tiny_key_layout_matches_official_shapes():
    """Key names and shapes re-derived by hand for CSwin-T (embed 64, heads 2-4-8-16, head_dim 32, LLSS)."""
    sd = build_model(cfg('flatten_cswin_t')).state_dict()
    expected = {
        'stage1_conv_embed.0.weight': (64, 3, 7, 7), 'stage1_conv_embed.2.weight': (64,),
        'stage1.0.qkv.weight': (192, 64), 'stage1.0.norm1.weight': (64,), 'stage1.0.proj.weight': (64, 64),
        'stage1.0.attns.0.get_v.weight': (64, 1, 3, 3), 'stage1.0.attns.0.dwc.weight': (32, 1, 5, 5),
        'stage1.0.attns.0.scale': (1, 1, 64), 'stage1.0.attns.0.positional_encoding': (1, 56 * 56, 64),
        'stage1.1.mlp.fc1.weight': (256, 64), 'stage1.1.mlp.fc2.weight': (64, 256), 'stage1.1.norm2.bias': (64,),
        'merge1.conv.weight': (128, 64, 3, 3), 'merge1.norm.weight': (128,),
        'stage2.3.attns.0.positional_encoding': (1, 28 * 28, 128), 'stage2.3.attns.0.dwc.weight': (32, 1, 5, 5),
        'merge2.conv.weight': (256, 128, 3, 3),
        'stage3.17.attns.0.get_v.weight': (128, 1, 3, 3), 'stage3.17.attns.1.get_v.bias': (128,),
        'merge3.conv.weight': (512, 256, 3, 3), 'stage4.0.attns.0.get_v.weight': (512, 1, 3, 3),
        'norm.weight': (512,), 'head.weight': (1000, 512),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert 'stage1.0.attns.1.get_v.weight' not in sd and 'stage3.0.attns.0.scale' not in sd
    assert 'stage4.0.attns.1.get_v.weight' not in sd and 'stage5.0.qkv.weight' not in sd
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_num_classes_and_img_size_are_honoured():
    model = build_model(cfg('flatten_cswin_t', 'MODEL.NUM_CLASSES', '10', 'DATA.IMG_SIZE', '96',
                            'MODEL.LA.CSWIN_LA_SPLIT_SIZE', '24-12-6-3'))
    assert model.head.weight.shape == (10, 512)
    assert model.stages[0].blocks[0].attns[0].positional_encoding.shape == (1, 24 * 24, 64)
    assert model.stages[1].blocks[0].attns[0].positional_encoding.shape == (1, 12 * 12, 128)


@torch.no_grad()
def test_tiny_forward_224():
    model = build_model(cfg('flatten_cswin_t', 'MODEL.NUM_CLASSES', '7')).eval()
    out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize('name', ['flatten_cswin_s', 'flatten_cswin_b', 'cswin_t', 'cswin_s'])
@torch.no_grad()
def test_forward_reduced_size(name):
    model = build_model(cfg(name, 'DATA.IMG_SIZE', '96', 'MODEL.LA.CSWIN_LA_SPLIT_SIZE', '24-12-6-3',
                            'MODEL.NUM_CLASSES', '5')).eval()
    out = model(torch.randn(1, 3, 96, 96))
    assert out.shape == (1, 5) and torch.isfinite(out).all()


@torch.no_grad()
def test_base_384_split_sizes_forward():
    """The shipped 384 path: '96-48-24-12' = the stage resolutions, softmax stripes 12 at stage 3."""
    model = build_model(cfg('flatten_cswin_b_384', 'MODEL.NUM_CLASSES', '3')).eval()
    first = [stage.blocks[0] for stage in model.stages]
    windows = [first[0].attns[0].window, first[1].attns[0].window, first[2].attns[0].window,
               first[2].attns[1].window, first[3].attns[0].window]
    assert windows == [(96, 96), (48, 48), (24, 12), (12, 24), (12, 12)]
    assert model.stages[0].blocks[0].attns[0].positional_encoding.shape == (1, 96 * 96, 96)
    out = model(torch.randn(1, 3, 384, 384))
    assert out.shape == (1, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize('attn,split', [('LLLL', '24-12-6-3'), ('LLLL', '12-6-3-3'), ('SSSS', '24-12-6-3'),
                                        ('LSLS', '24-12-3-3')])
@torch.no_grad()
def test_linear_and_softmax_variants(attn, split):
    model = build_model(cfg('flatten_cswin_t', 'DATA.IMG_SIZE', '96', 'MODEL.LA.ATTN_TYPE', attn,
                            'MODEL.LA.CSWIN_LA_SPLIT_SIZE', split)).eval()
    kinds = {type(a) for stage in (s.blocks for s in model.stages)
             for blk in stage for a in blk.attns}
    assert kinds == {FocusedLinearStripeAttention if t == 'L' else LePEAttention for t in attn}
    out = model(torch.randn(1, 3, 96, 96))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize('opts,key', [
    (['DATA.IMG_SIZE', '96'], 'MODEL.LA.CSWIN_LA_SPLIT_SIZE'),                 # 56 > 24
    (['MODEL.LA.CSWIN_LA_SPLIT_SIZE', '56-20-14-7'], 'MODEL.LA.CSWIN_LA_SPLIT_SIZE'),   # 28 % 20
    (['DATA.IMG_SIZE', '200'], 'DATA.IMG_SIZE'),                               # not a multiple of 32
    (['DATA.IMG_SIZE', '320', 'MODEL.LA.CSWIN_LA_SPLIT_SIZE', '80-40-20-10'], 'DATA.IMG_SIZE'),  # 20 % 7 (S)
])
def test_bad_layout_is_config_error(opts, key):
    with pytest.raises(ConfigError) as err:
        build_model(cfg('flatten_cswin_t', *opts))
    msg = str(err.value)
    assert key in msg and '\n' not in msg


# ----------------------------------------------------------------------------- float64 naive reference
def naive_lepe(v, conv, hw):
    """LePE of one window: v (n, C) row-major tokens, 3x3 depth-wise conv with its own kernel per channel."""
    return naive_depthwise_conv(v[None], conv.weight, conv.bias, 1, hw)[0]


def naive_focused_linear_window(q, k, v, hw, attn):
    """A linear CSwin branch on one window in float64: q, k, v (n, C) row-major tokens of an hw window.
    Focused linear attention + dwc (one kernel for every head), from tests/reference.py, + LePE."""
    out = naive_focused_linear_attention(q[None], k[None], v[None], attn.scale, attn.positional_encoding,
                                         attn.focusing_factor, attn.num_heads, attn.dwc.weight, attn.dwc.bias,
                                         hw)[0]
    return out + naive_lepe(v, attn.get_v, hw)


def naive_stripes(q, k, v, attn, R):
    """Every stripe window of a branch, cut out by slicing, attended on its own; q, k, v (R*R, C)."""
    hs, ws = attn.window
    C = q.shape[-1]
    grid = [t.reshape(R, R, C) for t in (q, k, v)]
    out = torch.zeros(R, R, C, dtype=torch.float64)
    for i in range(0, R, hs):
        for j in range(0, R, ws):
            win = [g[i:i + hs, j:j + ws].reshape(hs * ws, C) for g in grid]
            out[i:i + hs, j:j + ws] = naive_focused_linear_window(*win, (hs, ws), attn).reshape(hs, ws, C)
    return out.reshape(R * R, C)


def randomise(module, gen):
    """Non-zero values everywhere (scale and positional encodings start at zero)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = 0.5 if name.endswith(('scale', 'positional_encoding')) else 0.2
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if name.endswith('norm1.weight') else 0.0))


def naive_block(block, x):
    """A linear CSwin block (one or two branches) recomputed in float64 from its parameters."""
    B, L, C = x.shape
    R = block.resolution
    pd = {n: p.detach().double() for n, p in block.named_parameters()}
    y = F.layer_norm(x, (C,), pd['norm1.weight'], pd['norm1.bias'], eps=1e-5)
    qkv = y @ pd['qkv.weight'].T + pd['qkv.bias']
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    outs = []
    for b in range(B):
        if len(block.attns) == 1:
            outs.append(naive_stripes(q[b], k[b], v[b], block.attns[0], R))
        else:
            h = C // 2
            outs.append(torch.cat([naive_stripes(q[b, :, :h], k[b, :, :h], v[b, :, :h], block.attns[0], R),
                                   naive_stripes(q[b, :, h:], k[b, :, h:], v[b, :, h:], block.attns[1], R)], -1))
    x = x + torch.stack(outs) @ pd['proj.weight'].T + pd['proj.bias']
    z = F.layer_norm(x, (C,), pd['norm2.weight'], pd['norm2.bias'], eps=1e-5)
    z = F.gelu(z @ pd['mlp.fc1.weight'].T + pd['mlp.fc1.bias']) @ pd['mlp.fc2.weight'].T + pd['mlp.fc2.bias']
    return x + z


def test_linear_block_matches_float64_naive_reference(rng):
    """Shipped layout: one branch over the whole 8x8 map (split == resolution), 4 heads of 8 channels."""
    block = CSWinBlock(32, 8, 4, split=8, attn_type='L').eval()
    randomise(block, rng)
    x = torch.randn(2, 64, 32, generator=rng, dtype=torch.float64)
    ref = naive_block(block, x)
    with torch.no_grad():
        ours = block.double()(x)
        assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-9), (ours - ref).abs().max()
        assert torch.allclose(block.float()(x.float()).double(), ref, rtol=1e-4, atol=1e-4)
        # the check can fail: a small change of the LePE conv moves the output beyond the tolerance
        block.attns[0].get_v.bias.add_(1e-3)
        assert not torch.allclose(block(x.float()).double(), ref, rtol=1e-4, atol=1e-4)


def test_split_smaller_than_resolution_attends_each_window_separately(rng):
    """Split 2 on a 6x6 map: each branch = three 6x2 (resp. 2x6) stripes, each attended on its own
    (the official reshape would join them into one sequence per image)."""
    block = CSWinBlock(16, 6, 4, split=2, attn_type='L').eval()
    assert [a.window for a in block.attns] == [(6, 2), (2, 6)]
    assert block.attns[0].positional_encoding.shape == (1, 12, 8)
    randomise(block, rng)
    x = torch.randn(3, 36, 16, generator=rng, dtype=torch.float64)
    ref = naive_block(block, x)
    with torch.no_grad():
        ours = block.double()(x)
        assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-9), (ours - ref).abs().max()
        # batch elements stay independent: one image alone gives the same tokens
        assert torch.allclose(block(x[1:2]), ours[1:2], rtol=1e-12, atol=1e-12)


def test_global_linear_equals_per_window_when_split_is_resolution(rng):
    """With split == resolution (every shipped config) a branch is one window over the whole map, i.e. the
    official behaviour: the model equals whole-map focused linear attention + dwc + LePE."""
    attn = FocusedLinearStripeAttention(16, 4, -1, 4, 2)
    randomise(attn, rng)
    q, k, v = (torch.randn(1, 16, 16, generator=rng, dtype=torch.float64) for _ in range(3))
    ref = naive_focused_linear_window(q[0], k[0], v[0], (4, 4), attn)
    with torch.no_grad():
        ours = attn.double()(q, k, v)[0]
    assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-9)


def test_softmax_lepe_branch_matches_naive(rng):
    """LePE softmax branch 1 (horizontal stripes 2x6 on a 6x6 map), naive in float64."""
    attn = LePEAttention(8, 6, 1, 2, 2)
    randomise(attn, rng)
    q, k, v = (torch.randn(1, 36, 8, generator=rng, dtype=torch.float64) for _ in range(3))
    ref = torch.zeros(6, 6, 8, dtype=torch.float64)
    g = [t[0].reshape(6, 6, 8) for t in (q, k, v)]
    for i in range(0, 6, 2):
        qw, kw, vw = (t[i:i + 2].reshape(12, 8) for t in g)
        for h in range(2):
            c = slice(4 * h, 4 * h + 4)
            ref[i:i + 2, :, c] = (torch.softmax(qw[:, c] @ kw[:, c].T / 2.0, -1) @ vw[:, c]).reshape(2, 6, 4)
        ref[i:i + 2] += naive_lepe(vw, attn.get_v, (2, 6)).reshape(2, 6, 8)
    with torch.no_grad():
        ours = attn.double()(q, k, v)[0]
    assert torch.allclose(ours, ref.reshape(36, 8), rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- training features
def small_model(**kw):
    """Every branch kind: two-branch linear (stages 1-2), two-branch softmax (stage 3), single (stage 4)."""
    args = dict(img_size=64, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 4), la_split=(8, 4, 2, 2),
                softmax_split=(1, 2, 2, 2), attn_type='LLSS', num_classes=4, drop_path_rate=0.)
    args.update(kw)
    return FLattenCSWinTransformer(**args)


def test_gradient_reaches_every_parameter(rng):
    torch.manual_seed(0)
    model = small_model()
    assert len(model.stages[0].blocks[0].attns) == 2 and len(model.stages[2].blocks[0].attns) == 2
    model(torch.randn(2, 3, 64, 64, generator=rng)).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_gradient_checkpointing_gives_the_same_gradients(rng):
    torch.manual_seed(0)
    plain = small_model()
    ckpt = small_model(use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=rng)
    for m in (plain, ckpt):
        m(x).square().sum().backward()
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), n


def test_use_checkpoint_from_config():
    model = build_model(cfg('flatten_cswin_t', 'TRAIN.USE_CHECKPOINT', 'True'))
    assert model.use_checkpoint


def test_no_weight_decay_official_rule_and_extra_names():
    model = small_model()
    # the official CSwin rule names parameters CSwin does not have: scales / encodings are decayed
    assert model.no_weight_decay() == {'pos_embed', 'cls_token'}
    assert not hasattr(model, 'no_weight_decay_keywords')
    expected = {n for n, _ in model.named_parameters() if n.split('.')[-1] in ('scale', 'positional_encoding')}
    assert model.extra_no_weight_decay() == expected and len(expected) == 2 * 2 * 2   # stages 1-2, 2 branches


@torch.no_grad()
def test_every_attention_module_exposes_a_tap(rng):
    model = small_model().eval()
    seen = {}
    for name, m in model.named_modules():
        if isinstance(m, (FocusedLinearStripeAttention, LePEAttention)):
            m.tap.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, inp))
    model(torch.randn(1, 3, 64, 64, generator=rng))
    assert len(seen) == 2 + 2 + 4 + 1
    lin = seen['stages.0.blocks.0.attns.0']
    assert len(lin) == 3 and lin[0].shape == (2, 16 * 8, 8)       # two 16x8 stripes, dim/2 channels
    soft = seen['stages.2.blocks.1.attns.1']
    assert len(soft) == 1 and torch.allclose(soft[0].sum(-1), torch.ones(()))


def test_layer_groups_are_the_official_ones():
    """timm's layer groups (layer decay) keep the official CSwin matcher over the official names: merge{i} joins
    block 0 of stage{i}, the final norm is last."""
    from timm.models import group_parameters
    model = small_model()
    groups = group_parameters(model, model.group_matcher())
    group_of = {model.official_keys.official(n): g for g, names in groups.items() for n in names}
    assert group_of['stage1_conv_embed.0.weight'] == 0
    assert group_of['merge1.conv.weight'] == group_of['stage1.0.qkv.weight'] == 1
    assert group_of['stage2.0.qkv.weight'] == group_of['merge2.conv.weight'] == 2
    assert group_of['stage3.1.qkv.weight'] == group_of['stage3.0.qkv.weight'] + 1
    assert group_of['norm.weight'] == max(group_of.values()) - 1 == group_of['head.weight'] - 1
