"""FLatten-Swin: shipped configs, official state-dict layout and counts, window rules, masks, and
block-level agreement with float64 naive references."""
import functools
import glob
import json
import os

import pytest
import torch
import torch.nn.functional as F

from config import ConfigError, load_config
from models import build_model
from reference import naive_focused_linear_attention, naive_relative_position_index, naive_window_softmax_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFGS = os.path.join(ROOT, 'cfgs')
SWIN_CFGS = sorted(glob.glob(os.path.join(CFGS, 'flatten_swin_*.yaml')) + glob.glob(os.path.join(CFGS, 'swin_*.yaml')))
FIXTURE = os.path.join(ROOT, 'tests', 'fixtures', 'flatten_swin_t_keys.json')

# fvcore parameter counts of the official models (0.001 M in the published table); exact here.
OFFICIAL_PARAMS = {'flatten_swin_t': 29_192_384, 'flatten_swin_s': 50_510_288,
                   'flatten_swin_b': 88_972_488, 'flatten_swin_b_384': 91_433_928}

# A small model with every kind of block: patch 2 at 112 gives maps 56, 28, 14, 7, so 'S' stages with
# window 7 shift in stages 1-3 and 'L' stages with WINDOW_SIZE 56 are global.
SMALL = ['DATA.IMG_SIZE', '112', 'MODEL.SWIN.PATCH_SIZE', '2', 'MODEL.SWIN.EMBED_DIM', '8',
         'MODEL.SWIN.DEPTHS', '[2, 2, 2, 2]', 'MODEL.SWIN.NUM_HEADS', '[1, 2, 2, 4]', 'MODEL.NUM_CLASSES', '5',
         'MODEL.DROP_PATH_RATE', '0.0']


def name_of(path):
    return os.path.splitext(os.path.basename(path))[0]


@functools.lru_cache(maxsize=None)
def shipped_model(name, meta=True):
    """The model of cfgs/<name>.yaml; on the meta device (structure and shapes only, no memory, no init
    cost) unless ``meta=False``."""
    torch.manual_seed(0)
    config = load_config(os.path.join(CFGS, name + '.yaml'))
    if not meta:
        return build_model(config).eval()
    with torch.device('meta'):
        return build_model(config).eval()


def small_model(attn_type, window=56, extra=()):
    cfg = os.path.join(CFGS, 'flatten_swin_t.yaml')
    torch.manual_seed(0)
    return build_model(load_config(cfg, SMALL + ['MODEL.LA.ATTN_TYPE', attn_type,
                                                 'MODEL.SWIN.WINDOW_SIZE', str(window)] + list(extra)))


def randomize_(model, seed=0):
    """Random non-zero values everywhere (scale, positional encodings, biases, norms included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if name.endswith('norm1.weight') or name.endswith('norm2.weight'):
                p.copy_(1 + 0.1 * r)
            elif p.dim() == 1 or name.endswith('scale') or 'positional_encoding' in name:
                p.copy_(0.3 * r)
            else:
                p.copy_(r * p.shape[-1] ** -0.5 if p.dim() == 2 else 0.2 * r)
    return model


# ----------------------------------------------------------------------------- shipped configs
def test_shipped_swin_configs_exist():
    names = {name_of(p) for p in SWIN_CFGS}
    assert set(OFFICIAL_PARAMS) <= names
    assert {'swin_t', 'swin_s', 'swin_b', 'swin_b_384'} <= names


@pytest.mark.parametrize('path', SWIN_CFGS, ids=name_of)
def test_shipped_swin_config_builds(path):
    model = shipped_model(name_of(path))
    c = load_config(path)
    assert model.head.out_features == c.MODEL.NUM_CLASSES
    assert len(model.layers) == len(c.MODEL.SWIN.DEPTHS)
    assert [len(layer.blocks) for layer in model.layers] == list(c.MODEL.SWIN.DEPTHS)


@pytest.mark.parametrize('name', sorted(OFFICIAL_PARAMS))
def test_parameter_counts_match_official(name):
    assert sum(p.numel() for p in shipped_model(name).parameters()) == OFFICIAL_PARAMS[name]


def test_softmax_baselines_are_swin():
    # Swin-T/S/B (window 7) and Swin-B/384 (window 12) of Liu et al.: 28.288 / 49.606 / 87.768 / 87.904 M
    counts = {n: sum(p.numel() for p in shipped_model(n).parameters()) for n in ('swin_t', 'swin_s', 'swin_b', 'swin_b_384')}
    assert [round(v / 1e6, 3) for v in counts.values()] == [28.288, 49.606, 87.768, 87.904]
    assert shipped_model('swin_b_384').layers[0].blocks[0].window == 12
    assert shipped_model('swin_t').layers[0].blocks[1].shift == 3


def test_flatten_swin_t_forward():
    model = shipped_model('flatten_swin_t', meta=False)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize('name,opts', [
    ('flatten_swin_s', ['MODEL.SWIN.DEPTHS', '[2, 2, 2, 2]']),
    ('flatten_swin_b', ['MODEL.SWIN.DEPTHS', '[1, 1, 2, 1]']),
    ('flatten_swin_b_384', ['MODEL.SWIN.DEPTHS', '[1, 1, 2, 1]', 'MODEL.SWIN.EMBED_DIM', '32',
                            'MODEL.SWIN.NUM_HEADS', '[1, 2, 4, 8]']),
    ('swin_t', ['MODEL.SWIN.DEPTHS', '[2, 2, 2, 2]']),
    ('swin_s', ['MODEL.SWIN.DEPTHS', '[2, 2, 2, 2]']),
    ('swin_b', ['MODEL.SWIN.DEPTHS', '[1, 1, 2, 1]']),
    ('swin_b_384', ['MODEL.SWIN.DEPTHS', '[1, 1, 2, 1]', 'MODEL.SWIN.EMBED_DIM', '32',
                    'MODEL.SWIN.NUM_HEADS', '[1, 2, 4, 8]']),
])
def test_shrunk_shipped_configs_forward(name, opts):
    c = load_config(os.path.join(CFGS, name + '.yaml'), opts + ['MODEL.NUM_CLASSES', '7'])
    model = build_model(c).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, c.DATA.IMG_SIZE, c.DATA.IMG_SIZE))
    assert out.shape == (1, 7) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- official layout
def test_state_dict_matches_official_fixture():
    """(key, shape, dtype) of the official flatten_swin_t, buffers included, recorded from the official code."""
    with open(FIXTURE) as f:
        official = {k: (tuple(shape), dtype) for k, shape, dtype in json.load(f)}
    ours = {k: (tuple(v.shape), str(v.dtype).replace('torch.', ''))
            for k, v in shipped_model('flatten_swin_t', meta=False).state_dict().items()}
    assert sorted(set(official) - set(ours)) == [] and sorted(set(ours) - set(official)) == []
    assert {k: v for k, v in ours.items() if official[k] != v} == {}
    assert official['layers.2.blocks.1.attn_mask'] == ((4, 49, 49), 'float32')
    assert official['layers.2.blocks.0.attn.relative_position_index'] == ((49, 49), 'int64')


def test_state_dict_and_parameter_order_match_official_fixture():
    """Keys come in the official order too (the fixture was written in the official state_dict order), so
    an official optimizer state, which is matched by parameter position, lines up with our parameters."""
    with open(FIXTURE) as f:
        official = [k for k, _, _ in json.load(f)]
    model = shipped_model('flatten_swin_t', meta=False)
    assert list(model.state_dict()) == official
    params = [n for n, _ in model.named_parameters()]
    assert params == [k for k in official if k in set(params)]


def test_window_clamping_rule():
    """WINDOW_SIZE 56 at 224: stage 1 (56x56) keeps 56, stage 2 (28x28) clamps to 28; both global, no shift.
    Softmax stages use 7 (shifted in odd blocks of stage 3; stage 4 at 7x7 is one window, no shift)."""
    model = shipped_model('flatten_swin_t')
    got = [[(b.window, b.shift) for b in layer.blocks] for layer in model.layers]
    assert got == [[(56, 0)] * 2, [(28, 0)] * 2, [(7, 0), (7, 3)] * 3, [(7, 0)] * 2]
    assert model.layers[0].blocks[0].attn.positional_encoding.shape == (1, 56 * 56, 96)
    assert model.layers[1].blocks[1].attn.positional_encoding.shape == (1, 28 * 28, 192)
    assert all(b.attn_mask is None for layer in (model.layers[0], model.layers[1], model.layers[3])
               for b in layer.blocks)
    # 384 / window 96: linear stages clamp to 96 and 48; softmax stages use 12
    model = shipped_model('flatten_swin_b_384')
    assert [layer.blocks[1].window for layer in model.layers] == [96, 48, 12, 12]
    assert [layer.blocks[1].shift for layer in model.layers] == [0, 0, 6, 0]


def test_linear_window_smaller_than_stage_keeps_official_buffers():
    model = small_model('LLLL', window=7)
    blk = model.layers[0].blocks[1]
    assert (blk.window, blk.shift) == (7, 3)
    assert blk.attn.positional_encoding.shape == (1, 49, 8)
    assert blk.attn_mask.shape == ((56 // 7) ** 2, 49, 49)


@pytest.mark.parametrize('img,window,attn', [(100, 56, 'LLSS'), (224, 10, 'LLLL'), (222, 56, 'LLSS')])
def test_bad_layout_is_a_config_error(img, window, attn):
    with pytest.raises(ConfigError, match='DATA.IMG_SIZE'):
        build_model(load_config(os.path.join(CFGS, 'flatten_swin_t.yaml'),
                                ['DATA.IMG_SIZE', str(img), 'MODEL.SWIN.WINDOW_SIZE', str(window),
                                 'MODEL.LA.ATTN_TYPE', attn]))


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize('attn,window', [('LLSS', 56), ('SSSS', 7), ('LLLL', 7)])
def test_gradients_reach_every_parameter(attn, window):
    model = randomize_(small_model(attn, window)).train()
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    loss = F.cross_entropy(model(x), torch.tensor([1, 3]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert missing == []


# ----------------------------------------------------------------------------- shifted-window mask
def rolled_regions(H, W, shift):
    """Region id of each position of the map rolled by -shift: positions that wrapped around in a
    direction are not neighbours of those that did not. (Independent of the model's band rule.)"""
    rows = (torch.arange(H) >= H - shift).long()
    cols = (torch.arange(W) >= W - shift).long()
    return rows[:, None] * 2 + cols[None, :]


def windows_of(grid, w):
    """(H, W) -> (nW, w*w), windows in row-major order, tokens row-major inside each window."""
    H, W = grid.shape
    return grid.view(H // w, w, W // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)


def test_shifted_window_mask_keeps_mass_inside_regions():
    model = randomize_(small_model('SSSS', 7)).eval()
    blk = model.layers[0].blocks[1]                       # 56x56 map, window 7, shift 3
    assert (blk.window, blk.shift) == (7, 3)
    seen = []
    blk.attn.tap.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        model(torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(2)))
    probs = seen[0]                                       # (B * nW, heads, 49, 49)
    nW = (56 // 7) ** 2
    assert probs.shape == (2 * nW, 1, 49, 49)
    region = windows_of(rolled_regions(56, 56, 3), 7)      # (nW, 49)
    same = region[:, :, None] == region[:, None, :]        # (nW, 49, 49)
    same = same.repeat(2, 1, 1)[:, None]                  # batch-major windows
    assert (~same).any(), 'some windows must straddle a boundary for this test to bite'
    assert probs.masked_fill(same, 0).max() < 1e-30        # e^-100 ~ 4e-44
    assert torch.allclose(probs.masked_fill(~same, 0).sum(-1), torch.ones(()), atol=1e-6)
    # the unshifted block mixes freely inside windows: no such zeros
    assert model.layers[0].blocks[0].attn_mask is None


# ----------------------------------------------------------------------------- blocks vs naive references
def naive_mlp(x, mlp):
    h = F.linear(x, mlp.fc1.weight.double(), mlp.fc1.bias.double())
    h = 0.5 * h * (1 + torch.erf(h / 2 ** 0.5))
    return F.linear(h, mlp.fc2.weight.double(), mlp.fc2.bias.double())


def naive_layer_norm(x, norm):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()


def naive_block(blk, x, H, W, attention):
    """A (shifted) window block in float64 by explicit gathers: x (B, H*W, C). ``attention(windows)``
    maps (B * nW, w*w, C) normed tokens to attention outputs (before proj)."""
    B, L, C = x.shape
    w, s = blk.window, blk.shift
    y = naive_layer_norm(x, blk.norm1)
    # token gathered into window slot t of window (wy, wx): rolled position (wy*w + t//w, wx*w + t%w),
    # i.e. original position ((r + s) % H, (c + s) % W)
    idx = []
    for wy in range(H // w):
        for wx in range(W // w):
            for t in range(w * w):
                r, c = wy * w + t // w, wx * w + t % w
                idx.append(((r + s) % H) * W + (c + s) % W)
    idx = torch.tensor(idx)
    wins = y[:, idx].reshape(B * len(idx) // (w * w), w * w, C)
    att = attention(wins)
    att = F.linear(att, blk.attn.proj.weight.double(), blk.attn.proj.bias.double())
    out = torch.zeros(B, L, C, dtype=torch.float64)
    out[:, idx] = att.reshape(B, -1, C)
    x = x + out
    return x + naive_mlp(naive_layer_norm(x, blk.norm2), blk.mlp)


def qkv_of(blk, wins):
    return F.linear(wins, blk.attn.qkv.weight.double(), blk.attn.qkv.bias.double()).chunk(3, dim=-1)


def region_mask(H, W, w, s):
    """(nW, w*w, w*w) additive mask from the independently computed regions."""
    region = windows_of(rolled_regions(H, W, s), w)
    return torch.where(region[:, :, None] == region[:, None, :], 0.0, -100.0).double()


def test_shifted_softmax_block_equals_naive_reference():
    model = randomize_(small_model('SSSS', 7)).double().eval()
    blk = model.layers[1].blocks[1]                       # 28x28 map, dim 16, 2 heads, window 7, shift 3
    assert (blk.window, blk.shift) == (7, 3)
    x = torch.randn(2, 28 * 28, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask = region_mask(28, 28, 7, 3)
    assert torch.equal(blk.attn_mask, mask)                               # the persistent buffers too
    assert torch.equal(blk.attn.relative_position_index, naive_relative_position_index(7))

    def attention(wins):
        q, k, v = qkv_of(blk, wins)
        return naive_window_softmax_attention(q, k, v, 2, blk.attn.relative_position_bias_table, 7, mask)[0]

    with torch.no_grad():
        ours = blk(x)
    ref = naive_block(blk, x, 28, 28, attention)
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-10


def test_unshifted_softmax_window_attention_equals_naive_reference():
    model = randomize_(small_model('SSSS', 7)).double().eval()
    attn = model.layers[2].blocks[0].attn                 # dim 32, 2 heads, window 7
    wins = torch.randn(3, 49, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    q, k, v = F.linear(wins, attn.qkv.weight, attn.qkv.bias).chunk(3, dim=-1)
    ref, _ = naive_window_softmax_attention(q, k, v, 2, attn.relative_position_bias_table, 7)
    with torch.no_grad():
        ours = attn(wins)
    ref = F.linear(ref, attn.proj.weight, attn.proj.bias)
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-10


@pytest.mark.parametrize('layer,block,window', [(1, 1, 56), (0, 1, 7)])
def test_linear_block_equals_naive_reference(layer, block, window):
    """'L' block: global (clamped window) and a shifted 7x7-window one, whose mask linear attention ignores."""
    model = randomize_(small_model('LLLL', window)).double().eval()
    blk = model.layers[layer].blocks[block]
    H = 56 // 2 ** layer
    C, heads = blk.attn.dim, blk.attn.num_heads
    w = blk.window
    x = torch.randn(1, H * H, C, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    a = blk.attn

    def attention(wins):
        q, k, v = qkv_of(blk, wins)
        return naive_focused_linear_attention(q, k, v, a.scale, a.positional_encoding, a.focusing_factor, heads,
                                              a.dwc.weight, a.dwc.bias, (w, w))

    with torch.no_grad():
        ours = blk(x)
    ref = naive_block(blk, x, H, H, attention)
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-9


# ----------------------------------------------------------------------------- tools/model_stats.py
def test_model_stats_table(capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location('model_stats', os.path.join(ROOT, 'tools', 'model_stats.py'))
    stats = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stats)
    assert stats.main(['--no-flops', os.path.join(CFGS, 'flatten_swin_t.yaml')]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == '| config | MODEL.TYPE | params (M) | GFLOPs |'
    assert out[2] == '| flatten_swin_t | flatten_swin | 29.192 | - |'
