"""FLatten-PVT and FLatten-PVTv2: shipped configs and exact parameter counts (official figures and a count
re-derived by hand from the architecture), float64 naive recomputation of the spatial-reduction attention
(linear with V interpolation + dwc, softmax, PVTv2 'linear' pooling) and of the PVTv2 MLP, forwards,
gradients (with and without activation checkpointing), taps, NUM_CLASSES / IMG_SIZE and ConfigErrors."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from config import ConfigError, load_config
from models import build_model
from models.flatten_pvt import FLattenPVT, FocusedLinearSRAttention, SRAttention
from models.flatten_pvt_v2 import DepthwiseConvMlp, FLattenPVTv2
from reference import naive_depthwise_conv, naive_focused_linear_attention, naive_interpolate_tokens

CFGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'cfgs')

# Exact counts at 224 / 1000 classes. The flatten_* ones are the official models' (LeapLabTHU/FLatten-Transformer,
# same YAMLs); the SSSS ones come from the official code built with ATTN_TYPE 'SSSS'.
OFFICIAL_PARAMS = {
    'flatten_pvt_t': 12_150_504, 'flatten_pvt_s': 21_670_248, 'flatten_pvt_m': 37_242_216,
    'flatten_pvt_b': 50_649_192,
    'flatten_pvt_v2_b0': 3_594_824, 'flatten_pvt_v2_b1': 12_931_240, 'flatten_pvt_v2_b2': 22_548_264,
    'flatten_pvt_v2_b3': 38_273_832, 'flatten_pvt_v2_b4': 51_836_968,
    'pvt_t': 13_228_264, 'pvt_s': 24_484_840, 'pvt_m': 44_207_080, 'pvt_b': 61_368_296,
    'pvt_v2_b0': 3_666_760, 'pvt_v2_b1': 14_009_000, 'pvt_v2_b2': 25_362_856, 'pvt_v2_b3': 45_238_696,
    'pvt_v2_b4': 62_556_072,
}
# fvcore figures of the facts note (millions).
PUBLISHED_M = {'flatten_pvt_t': 12.151, 'flatten_pvt_s': 21.670, 'flatten_pvt_m': 37.242, 'flatten_pvt_b': 50.649,
               'flatten_pvt_v2_b0': 3.595, 'flatten_pvt_v2_b1': 12.931, 'flatten_pvt_v2_b2': 22.548,
               'flatten_pvt_v2_b3': 38.274, 'flatten_pvt_v2_b4': 51.837}

# Architectures written out from the papers (PVT-v1 Tab. 1, PVTv2 Tab. 1): dims, heads, mlp ratios, depths.
WIDE, HEADS = (64, 128, 320, 512), (1, 2, 5, 8)
ARCH = {
    't': (WIDE, (8, 8, 4, 4), (2, 2, 2, 2)), 's': (WIDE, (8, 8, 4, 4), (3, 4, 6, 3)),
    'm': (WIDE, (8, 8, 4, 4), (3, 4, 18, 3)), 'b': (WIDE, (8, 8, 4, 4), (3, 8, 27, 3)),
    'b0': ((32, 64, 160, 256), (8, 8, 4, 4), (2, 2, 2, 2)), 'b1': (WIDE, (8, 8, 4, 4), (2, 2, 2, 2)),
    'b2': (WIDE, (8, 8, 4, 4), (3, 4, 6, 3)), 'b3': (WIDE, (8, 8, 4, 4), (3, 4, 18, 3)),
    'b4': (WIDE, (8, 8, 4, 4), (3, 8, 27, 3)),
}


def cfg(name, *opts):
    return load_config(os.path.join(CFGS, f'{name}.yaml'), list(opts))


def n_params(model):
    """The official count: every parameter, plus PVT-v1's final ``norm`` (in the official model a parameter
    that its forward never uses; here buffers, so that every parameter gets a gradient)."""
    inert = sum(b.numel() for n, b in model.named_buffers() if n.startswith('norm.'))
    return sum(p.numel() for p in model.parameters()) + inert


def hand_count(name, img=224, classes=1000, attn=None, la_sr='1111', ksize=5, linear=False):
    """Parameter count derived from the architecture, term by term."""
    v2 = '_v2_' in name
    dims, ratios, depths = ARCH[name.split('_')[-1]]
    attn = attn or ('SSSS' if name.startswith('pvt') else 'LLLL')
    lin = lambda i, o: i * o + o                                         # noqa: E731
    ln = lambda c: 2 * c                                                 # noqa: E731
    total, c_in = 0, 3
    for i, (c, r, depth, t) in enumerate(zip(dims, ratios, depths, attn)):
        res = img // 2 ** (i + 2)
        k = (7 if i == 0 else 3) if v2 else (4 if i == 0 else 2)
        total += c_in * c * k * k + c + ln(c)                            # patch embed conv + norm
        total += 0 if v2 else res * res * c                              # pos_embed{i}
        sr = (8, 4, 2, 1)[i] if t == 'S' else int(la_sr[i])
        hidden = c * r
        blk = ln(c) * 2 + lin(c, c) + lin(c, 2 * c) + lin(c, c) + lin(c, hidden) + lin(hidden, c)
        blk += hidden * 9 + hidden if v2 else 0                          # mlp.dwconv
        if linear:
            blk += lin(c, c) + ln(c)                                     # 1x1 sr + norm
        elif sr > 1:
            blk += c * c * sr * sr + c + ln(c)                           # sr conv + norm
        if t == 'L':
            d = c // HEADS[i]
            n_kv = 49 if linear else (res // sr) ** 2
            blk += d * ksize * ksize + d + c + n_kv * c                  # dwc, scale, positional_encoding
        total += depth * blk + (ln(c) if v2 else 0)                      # blocks (+ norm{i})
        c_in = c
    total += 0 if v2 else ln(dims[-1])                                   # the unused final norm
    return total + lin(dims[-1], classes)


# ----------------------------------------------------------------------------- shipped configs
@pytest.mark.parametrize('name', sorted(OFFICIAL_PARAMS))
def test_shipped_config_param_count(name):
    config = cfg(name)
    assert config.MODEL.LA.ATTN_TYPE == ('SSSS' if name.startswith('pvt') else 'LLLL')
    assert config.MODEL.NAME.startswith('pvt_' if name.startswith('pvt') else 'flatten_pvt_')
    assert hand_count(name) == OFFICIAL_PARAMS[name]
    if name in PUBLISHED_M:
        assert round(OFFICIAL_PARAMS[name] / 1e6, 3) == PUBLISHED_M[name]
    with torch.device('meta'):            # shapes only: building the large ones for real is slow on CI
        model = build_model(config)
    assert n_params(model) == OFFICIAL_PARAMS[name]


def test_official_key_layout():
    v1 = {k: tuple(v.shape) for k, v in build_model(cfg('flatten_pvt_t', 'MODEL.LA.PVT_LA_SR_RATIOS', '8421'))
          .state_dict().items()}
    assert v1['pos_embed1'] == (1, 3136, 64) and v1['pos_embed4'] == (1, 49, 512)
    assert v1['block1.0.attn.q.weight'] == (64, 64) and v1['block1.0.attn.kv.weight'] == (128, 64)
    assert v1['block1.0.attn.sr.weight'] == (64, 64, 8, 8) and v1['block1.0.attn.norm.weight'] == (64,)
    assert v1['block1.0.attn.positional_encoding'] == (1, 49, 64) and v1['block1.0.attn.scale'] == (1, 1, 64)
    assert v1['block3.1.attn.dwc.weight'] == (64, 1, 5, 5) and 'block4.0.attn.sr.weight' not in v1
    assert v1['patch_embed2.proj.weight'] == (128, 64, 2, 2) and v1['norm.weight'] == (512,)
    v2 = {k: tuple(v.shape) for k, v in build_model(cfg('flatten_pvt_v2_b0')).state_dict().items()}
    assert v2['patch_embed1.proj.weight'] == (32, 3, 7, 7) and v2['patch_embed2.proj.weight'] == (64, 32, 3, 3)
    assert v2['block1.0.mlp.dwconv.dwconv.weight'] == (256, 1, 3, 3) and v2['norm4.weight'] == (256,)
    assert v2['block2.1.attn.dwc.weight'] == (32, 1, 5, 5) and not any(k.startswith('pos_embed') for k in v2)
    assert 'norm.weight' not in v2 and 'block1.0.attn.sr.weight' not in v2


def test_official_layer_norm_eps():
    model = _tiny_v1()
    assert model.stages[0].patch_embed.norm.eps == 1e-5 and model.stages[0].blocks[0].attn.norm.eps == 1e-5   # embed, reduction
    assert model.stages[0].blocks[0].norm1.eps == model.stages[1].blocks[0].norm2.eps == model.norm.eps == 1e-6
    v2 = _tiny_v2(linear=True)
    assert v2.stages[1].patch_embed.norm.eps == v2.stages[0].blocks[0].attn.norm.eps == 1e-5
    assert v2.stages[0].blocks[0].norm1.eps == v2.stages[3].norm.eps == 1e-6


@pytest.mark.parametrize('name', ['flatten_pvt_t', 'flatten_pvt_v2_b0'])
def test_forward_224(name):
    model = build_model(cfg(name)).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 224, 224))
    assert y.shape == (1, 1000) and torch.isfinite(y).all()


@pytest.mark.parametrize('name,sr', [('pvt_t', '1111'), ('pvt_v2_b0', '1111'), ('flatten_pvt_t', '8421'),
                                     ('flatten_pvt_v2_b0', '8421')])
def test_forward_small_image(name, sr):
    model = build_model(cfg(name, 'DATA.IMG_SIZE', '64', 'MODEL.NUM_CLASSES', '5',
                            'MODEL.LA.PVT_LA_SR_RATIOS', sr)).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 5) and torch.isfinite(y).all()


# ----------------------------------------------------------------------------- naive float64 recomputation
def _randomise(module, gen, std=0.3):
    with torch.no_grad():
        for name, p in module.named_parameters():     # LayerNorm gains around 1, everything else around 0
            offset = 1.0 if p.dim() == 1 and name.endswith('weight') else 0.
            p.copy_(torch.randn(p.shape, generator=gen) * std + offset)


def _linear(x, layer):
    return x @ layer.weight.double().T + layer.bias.double()


def _layer_norm(x, layer):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + layer.eps) * layer.weight.double() + layer.bias.double()


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _strided_conv(x, conv, hw, s):
    """Non-overlapping s x s conv (kernel = stride = s) by block sums: (B, H*W, C) -> (B, H/s*W/s, C_out)."""
    B, _, C = x.shape
    H, W = hw
    blocks = x.double().reshape(B, H // s, s, W // s, s, C)              # b, Y, i, X, j, c
    out = torch.einsum('byixjc,ocij->byxo', blocks, conv.weight.double()) + conv.bias.double()
    return out.reshape(B, -1, out.shape[-1])


def _depthwise_3x3(x, conv, hw):
    """Per-channel 3x3 conv, zero padding 1, by shifted sums: (B, H*W, C) -> same shape."""
    B, _, C = x.shape
    H, W = hw
    padded = F.pad(x.double().reshape(B, H, W, C), (0, 0, 1, 1, 1, 1))
    w = conv.weight.double()[:, 0]                                       # (C, 3, 3)
    out = sum(padded[:, dy:dy + H, dx:dx + W] * w[:, dy, dx] for dy in range(3) for dx in range(3))
    return (out + conv.bias.double()).reshape(B, H * W, C)


def _reduce(x, attn, hw, sr, linear):
    """The keys/values' source tokens, by hand."""
    if linear:                     # 7x7 adaptive mean of a 14x14 map = 2x2 block means; then 1x1 conv
        B, _, C = x.shape
        pooled = x.double().reshape(B, 7, 2, 7, 2, C).mean(dim=(2, 4)).reshape(B, 49, C)
        w = attn.sr.weight.double()[:, :, 0, 0]
        return _gelu(_layer_norm(pooled @ w.T + attn.sr.bias.double(), attn.norm))
    if sr == 1:
        return x.double()
    return _layer_norm(_strided_conv(x, attn.sr, hw, sr), attn.norm)


@pytest.mark.parametrize('sr,linear', [(1, False), (2, False), (4, False), (1, True)])
def test_linear_sr_attention_matches_naive(sr, linear, rng):
    """FLatten-PVT(v2) linear block: reduction, focused attention, V stretched back by 1-D interpolation
    over the flattened tokens, per-head shared dwc, projection."""
    H = W = 14 if linear else 8
    dim, heads = 24, 3
    attn = FocusedLinearSRAttention(dim, (H, W), heads, sr_ratio=sr, linear=linear).eval()
    _randomise(attn, rng)
    x = torch.randn(2, H * W, dim, generator=rng)
    src = _reduce(x, attn, (H, W), sr, linear)
    q = _linear(x.double(), attn.q)
    k, v = _linear(src, attn.kv).split(dim, dim=-1)
    assert k.shape[1] == (49 if linear else H * W // sr ** 2)
    v_full = naive_interpolate_tokens(v, H * W) if k.shape[1] != H * W else v
    out = naive_focused_linear_attention(q, k, v, attn.scale, attn.positional_encoding, 3, heads,
                                         attn.dwc.weight, attn.dwc.bias, (H, W), dwc_input=v_full)
    expected = _linear(out, attn.proj)
    with torch.no_grad():
        got = attn(x).double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    if k.shape[1] != H * W:        # the interpolation is really exercised: a nearest-neighbour stretch differs
        v_nn = v.repeat_interleave(H * W // k.shape[1], dim=1)
        wrong = naive_depthwise_conv(v_nn, attn.dwc.weight, attn.dwc.bias, heads, (H, W))
        right = naive_depthwise_conv(v_full, attn.dwc.weight, attn.dwc.bias, heads, (H, W))
        assert (wrong - right).abs().max() > 1e-2


@pytest.mark.parametrize('sr', [1, 2])
def test_softmax_sr_attention_matches_naive(sr, rng):
    H = W = 8
    dim, heads = 16, 2
    attn = SRAttention(dim, (H, W), heads, sr_ratio=sr).eval()
    _randomise(attn, rng)
    x = torch.randn(2, H * W, dim, generator=rng)
    probs = []
    attn.tap.register_forward_hook(lambda m, i, o: probs.append(o))
    with torch.no_grad():
        got = attn(x).double()
    assert probs[0].shape == (2, heads, H * W, H * W // sr ** 2)
    q = _linear(x.double(), attn.q)
    k, v = _linear(_reduce(x, attn, (H, W), sr, False), attn.kv).split(dim, dim=-1)
    d = dim // heads
    out = torch.zeros_like(q)
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        p = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) * d ** -0.5, dim=-1)
        torch.testing.assert_close(probs[0][:, h].double(), p, rtol=1e-4, atol=1e-5)
        out[..., s] = p @ v[..., s]
    torch.testing.assert_close(got, _linear(out, attn.proj), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('linear', [False, True])
def test_pvt_v2_conv_mlp_matches_naive(linear, rng):
    H, W, dim, hidden = 6, 5, 8, 16
    mlp = DepthwiseConvMlp(dim, hidden, (H, W), linear=linear).eval()
    _randomise(mlp, rng)
    x = torch.randn(2, H * W, dim, generator=rng)
    h = _linear(x.double(), mlp.fc1)
    h = h.clamp(min=0) if linear else h
    h = _depthwise_3x3(h, mlp.dwconv.dwconv, (H, W))
    expected = _linear(_gelu(h), mlp.fc2)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x).double(), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- training behaviour
def _tiny_v1():
    return FLattenPVT(img_size=64, num_classes=3, embed_dims=(16, 32, 40, 64), depths=(1, 2, 1, 1),
                      attn_type='LSLS', la_sr_ratios='2121')


def _tiny_v2(linear):
    return FLattenPVTv2(img_size=64, num_classes=3, embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1),
                        attn_type='SLLS', la_sr_ratios='1421', linear=linear)


def test_state_dict_names_are_the_official_ones_at_any_depth():
    """The stages live in one ModuleList; state dicts still use the official per-stage names (written out here),
    load strictly at any nesting depth, and name missing keys officially."""
    torch.manual_seed(0)
    src, dst = _tiny_v2(False), _tiny_v2(False)
    sd = src.state_dict()
    official = {f'{name}{i}' for i in range(1, 5) for name in ('patch_embed', 'block', 'norm')} | {'head'}
    assert {k.split('.')[0] for k in sd} == official
    wrapped = torch.nn.Sequential(dst)
    wrapped.load_state_dict({f'0.{k}': v for k, v in sd.items()}, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(src.parameters(), dst.parameters()))
    assert list(wrapped.state_dict()) == [f'0.{k}' for k in sd]
    sd.pop('block3.0.norm1.weight')
    assert wrapped.load_state_dict({f'0.{k}': v for k, v in sd.items()}, strict=False).missing_keys == [
        '0.block3.0.norm1.weight']


@pytest.mark.parametrize('family', ['v1', 'v2', 'v2_linear'])
def test_gradients_reach_every_parameter_with_and_without_checkpointing(family, rng):
    torch.manual_seed(0)
    model = _tiny_v1() if family == 'v1' else _tiny_v2(family == 'v2_linear')
    with torch.no_grad():                       # non-zero scale / positional encodings, as after training
        for name, p in model.named_parameters():
            if name.endswith(('attn.scale', 'positional_encoding')):
                p.normal_(0, 0.5)
    x = torch.randn(2, 3, 64, 64, generator=rng)
    grads = []
    for use_checkpoint in (False, True):
        model.use_checkpoint = use_checkpoint
        model.zero_grad()
        model(x).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    names = {n for n, _ in model.named_parameters()}    # v1's never-applied final norm: buffers, not here
    missing = {n for n in names if n not in grads[0] or grads[0][n].abs().sum() == 0}
    assert not missing, sorted(missing)
    assert set(grads[1]) == set(grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6)


def test_use_checkpoint_config_and_weight_decay_lists():
    model = build_model(cfg('flatten_pvt_v2_b0', 'TRAIN.USE_CHECKPOINT', 'True', 'DATA.IMG_SIZE', '64'))
    assert model.use_checkpoint
    v1 = _tiny_v1()
    names = {n for n, _ in v1.named_parameters()}
    assert {f'stages.{i}.pos_embed' for i in range(4)} <= names       # state-dict name: pos_embed{i + 1}
    # the official rules (LeapLabTHU/FLatten-Transformer): PVT-v1 {'cls_token'} (pos_embed1-4 decayed),
    # PVTv2 {'pos_embed1'..'pos_embed4', 'cls_token'} (names PVTv2 does not have); no keyword lists
    assert v1.no_weight_decay() == {'cls_token'}
    assert model.no_weight_decay() == {'pos_embed1', 'pos_embed2', 'pos_embed3', 'pos_embed4', 'cls_token'}
    assert not hasattr(v1, 'no_weight_decay_keywords') or not v1.no_weight_decay_keywords()
    # our opt-in extras: full names of every scale, positional encoding and (v1) position embedding
    for m in (v1, model):
        want = {n for n in dict(m.named_parameters())
                if n.split('.')[-1] in ('scale', 'positional_encoding', 'pos_embed')}
        assert m.extra_no_weight_decay() == want and any(n.endswith('attn.scale') for n in want)
    assert {f'stages.{i}.pos_embed' for i in range(4)} <= v1.extra_no_weight_decay()
    # the official final norm: in the state dict (strict official loading), but buffers, not parameters
    assert not getattr(v1, 'has_unused_parameters', False) and not getattr(model, 'has_unused_parameters', False)
    assert {'norm.weight', 'norm.bias'} <= set(v1.state_dict()) and not names & {'norm.weight', 'norm.bias'}


def test_taps_expose_every_attention():
    model = _tiny_v1().eval()
    seen = []
    for name, module in model.named_modules():
        if name.endswith('.tap'):
            module.register_forward_hook(lambda m, i, o, name=name: seen.append((name, o)))
    n_attn = sum(1 for n, _ in model.named_modules() if n.endswith('.attn'))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert len(seen) == n_attn == 5
    for name, out in seen:
        if name.startswith(('stages.0.', 'stages.2.')):    # 'L' stages: (phi_q, phi_k, v)
            assert isinstance(out, tuple) and len(out) == 3
        else:                                              # 'S' stages: probabilities over reduced keys
            torch.testing.assert_close(out.sum(-1), torch.ones_like(out.sum(-1)))
    shapes = dict((n, o[1].shape if isinstance(o, tuple) else o.shape) for n, o in seen)
    assert shapes['stages.0.blocks.0.attn.tap'] == (1, 64, 16)       # 16x16 map reduced by 2 -> 64 keys
    assert shapes['stages.1.blocks.0.attn.tap'] == (1, 2, 64, 4)     # 8x8 map, softmax sr 4 -> 4 keys


# ----------------------------------------------------------------------------- config handling
def test_num_classes_and_img_size_are_honoured():
    config = cfg('flatten_pvt_t', 'DATA.IMG_SIZE', '96', 'MODEL.NUM_CLASSES', '7',
                 'MODEL.LA.PVT_LA_SR_RATIOS', '8421')
    model = build_model(config).eval()
    assert model.stages[0].pos_embed.shape == (1, 24 * 24, 64) and model.stages[3].pos_embed.shape == (1, 9, 512)
    assert model.stages[0].blocks[0].attn.positional_encoding.shape == (1, 9, 64)
    assert n_params(model) == hand_count('flatten_pvt_t', img=96, classes=7, la_sr='8421')
    with torch.no_grad():
        assert model(torch.randn(2, 3, 96, 96)).shape == (2, 7)
        with pytest.raises(ValueError, match='DATA.IMG_SIZE'):
            model(torch.randn(1, 3, 64, 64))
    v2 = build_model(cfg('flatten_pvt_v2_b0', 'DATA.IMG_SIZE', '128', 'MODEL.NUM_CLASSES', '4'))
    assert v2.stages[1].blocks[0].attn.positional_encoding.shape == (1, 16 * 16, 64)
    assert n_params(v2) == hand_count('flatten_pvt_v2_b0', img=128, classes=4)


def test_pvt_v2_li_param_count():
    config = cfg('flatten_pvt_v2_b2', 'MODEL.TYPE', 'flatten_pvt_v2_b2_li')
    with torch.device('meta'):
        model = build_model(config)
    assert n_params(model) == hand_count('flatten_pvt_v2_b2', linear=True)


@pytest.mark.parametrize('name,opts,match', [
    ('flatten_pvt_t', ['DATA.IMG_SIZE', '100'], 'DATA.IMG_SIZE 100'),
    ('pvt_v2_b0', ['DATA.IMG_SIZE', '240'], 'divisible by 32'),
    ('flatten_pvt_t', ['MODEL.LA.PVT_LA_SR_RATIOS', '2222'], 'stage 4 map 7x7'),
    ('flatten_pvt_v2_b0', ['MODEL.LA.PVT_LA_SR_RATIOS', '3111'], 'sr ratio 3'),
])
def test_bad_layout_raises_config_error(name, opts, match):
    with pytest.raises(ConfigError, match=match) as err:
        build_model(cfg(name, *opts))
    assert '\n' not in str(err.value)
