"""visualize: hook capture, token layout, dwc folding and the CLI, on a real photo (scikit-learn's china.jpg).

References are written here from first principles: the equivalent attention as a float64 q k^T per head,
the dwc as the matrix whose columns are the conv of one-hot images, the Swin token layout read off the
block's own data flow (which image token each window token is a copy of).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from config import load_config
from models import build_model
from visualize import attention_maps, attention_sites, capture, select_site
from visualize.cli import main, to_input

CFG = 'cfgs/flatten_swin_t.yaml'
# 3 stages on a 112 image: 28x28, 14x14, 7x7 token grids; stage 2 is softmax ('S', window 7 = global).
SMALL = ['DATA.IMG_SIZE', '112', 'MODEL.SWIN.EMBED_DIM', '16', 'MODEL.SWIN.DEPTHS', '[2, 2, 2]',
         'MODEL.SWIN.NUM_HEADS', '[2, 2, 4]', 'MODEL.NUM_CLASSES', '10', 'MODEL.LA.ATTN_TYPE', 'LLS']
GLOBAL = SMALL + ['MODEL.SWIN.WINDOW_SIZE', '56']      # linear stages clamp the window: one global window
WINDOWED = SMALL + ['MODEL.SWIN.WINDOW_SIZE', '7']     # stage 0: 16 windows of 7x7, block 1 shifted by 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def photo(tmp_path_factory) -> str:
    sklearn_datasets = pytest.importorskip('sklearn.datasets')
    path = tmp_path_factory.mktemp('img') / 'china.jpg'
    Image.fromarray(sklearn_datasets.load_sample_images().images[0]).save(path, format='JPEG')
    return str(path)


def _model(opts, seed=0):
    torch.manual_seed(seed)
    return build_model(load_config(os.path.join(ROOT, CFG), opts)).eval()


def _input(photo):
    with Image.open(photo) as f:
        return to_input(f.convert('RGB').resize((112, 112)), 112)


def _tap_inputs(module, model, x):
    """The tap's inputs, recorded by a hook written here (independent of visualize.capture)."""
    seen = []
    h = module.tap.register_forward_hook(lambda m, inp, out: seen.append(inp))
    with torch.no_grad():
        model(x)
    h.remove()
    return seen[0]


def _dwc_reference(weight: torch.Tensor, hw) -> torch.Tensor:
    """(N, N) matrix of a single-channel conv (k, k), no bias: column j = conv of the j-th one-hot image."""
    h, w = hw
    eye = torch.eye(h * w, dtype=torch.float64).view(h * w, 1, h, w)
    cols = F.conv2d(eye, weight.double()[None, None], padding=weight.shape[-1] // 2)
    return cols.view(h * w, h * w).T


def _window_positions(block, model, x):
    """For each window token fed to the block's attention, its row-major index in the block's token grid,
    found by matching it to the LayerNorm output in image order."""
    grab = {}
    h1 = block.norm1.register_forward_hook(lambda m, i, o: grab.setdefault('img', o))
    h2 = block.attn.register_forward_pre_hook(lambda m, i: grab.setdefault('win', i[0]))
    with torch.no_grad():
        model(x)
    h1.remove()
    h2.remove()
    img, win = grab['img'][0], grab['win']                        # (H*W, C), (nW, N, C)
    dist = (win.reshape(-1, 1, win.shape[-1]) - img[None]).abs().sum(-1)
    assert (dist.min(-1).values == 0).all()
    return dist.argmin(-1).view(win.shape[:2])


@pytest.mark.parametrize('opts, block', [(GLOBAL, 0), (WINDOWED, 0), (WINDOWED, 1)])
def test_folded_equivalent_attention_matches_dense_reference(photo, opts, block):
    model, x = _model(opts), _input(photo)
    site = select_site(attention_sites(model), 0, block)
    blk = model.layers[0].blocks[block]
    phi_q, phi_k, _ = _tap_inputs(site.module, model, x)
    heads, (H, W) = site.module.num_heads, blk.resolution
    positions = _window_positions(blk, model, x)
    win = blk.window
    assert (opts[-1] == '56') == (win == H)
    cap = capture(model, site, x)
    for head, channel in ((0, 0), (1, 3)):
        maps = attention_maps(site, cap, (112, 112), head=head, dwc_channel=channel)
        assert maps.grid == (H, W)
        D = _dwc_reference(site.module.dwc.weight.detach()[channel, 0], (win, win))
        d = phi_q.shape[-1] // heads
        for g in (0, positions.shape[0] - 1):
            q = phi_q[g, :, head * d:(head + 1) * d].double()
            k = phi_k[g, :, head * d:(head + 1) * d].double()
            # the block's normaliser: out_i = sum_j (q_i . k_j / n) v_j / (q_i . mean(k) + 1e-6)
            n = k.shape[0]
            A = (q @ k.T / n) / (q @ k.mean(0, keepdim=True).T + 1e-6)
            ref = (A + D).abs()
            ref = ref / ref.sum(-1, keepdim=True)
            torch.testing.assert_close(maps.matrix[g], ref, rtol=1e-5, atol=1e-9)
            # the map of a query token, on the image grid, puts row t at its keys' image positions
            t = positions.shape[1] // 2 + 1
            pos = int(positions[g, t])
            expect = torch.zeros(H * W, dtype=torch.float64)
            expect[positions[g]] = ref[t]
            torch.testing.assert_close(maps.query_map(pos // W, pos % W).flatten(), expect, rtol=1e-5, atol=1e-9)


def test_signed_fold_reproduces_the_block(photo):
    """Per head h and channel c, (A_h + D_c) @ v + bias_c is the attention output before ``proj``:
    the folded matrix is exactly the token mixing the block applies (shifted windows included)."""
    from models.focused_attention import equivalent_attention
    from visualize import dwc_matrix
    model, x = _model(WINDOWED), _input(photo)
    site = select_site(attention_sites(model), 0, 1)
    phi_q, phi_k, v = _tap_inputs(site.module, model, x)
    pre_proj = []
    h = site.module.proj.register_forward_pre_hook(lambda m, i: pre_proj.append(i[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    heads, win = site.module.num_heads, site.module.window
    d = v.shape[-1] // heads
    A = equivalent_attention(phi_q.double(), phi_k.double(), heads)            # (nW, h, N, N)
    dwc = site.module.dwc
    for head in range(heads):
        for c in range(d):
            D = dwc_matrix(dwc.weight.detach()[c, 0].double(), (win, win))
            got = (A[:, head] + D) @ v[:, :, head * d + c].double().unsqueeze(-1)
            want = pre_proj[0][:, :, head * d + c].double().unsqueeze(-1) - dwc.bias[c].double()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('stage, kind', [(0, 'linear'), (2, 'softmax')])
def test_rows_sum_to_one(photo, stage, kind):
    model, x = _model(WINDOWED), _input(photo)
    site = select_site(attention_sites(model), stage, 1)
    cap = capture(model, site, x)
    assert cap.kind == kind
    for fold in (True, False):
        m = attention_maps(site, cap, (112, 112), head='mean', fold_dwc=fold).matrix
        assert (m >= 0).all()
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1], dtype=m.dtype), rtol=0, atol=2e-6)
    if kind == 'softmax':
        probs = _tap_inputs(site.module, model, x)[0]
        torch.testing.assert_close(attention_maps(site, cap, (112, 112), head=2).matrix, probs[:, 2].double())


def test_hooks_leave_outputs_unchanged(photo):
    model, x = _model(WINDOWED), _input(photo)
    with torch.no_grad():
        before = model(x)
    for site in attention_sites(model):
        cap = capture(model, site, x)
        if site.module.attn_kind == 'linear':
            assert torch.equal(cap.output, before)
        else:     # a hooked softmax block computes explicit probabilities instead of the fused SDPA
            torch.testing.assert_close(cap.output, before, rtol=1e-5, atol=1e-6)
        assert not site.module.tap._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_cli_writes_pngs_and_compares(photo, tmp_path):
    out = tmp_path / 'vis'
    opts = ['--opts', *GLOBAL]
    rc = main(['--cfg', os.path.join(ROOT, CFG), *opts, '--image', photo, '--stage', '0', '--block', '1',
               '--query-stride', '14', '--size', '96', '--output', str(out),
               '--compare-cfg', os.path.join(ROOT, 'cfgs/swin_t.yaml'),
               '--compare-opts', *SMALL, 'MODEL.LA.ATTN_TYPE', 'SSS'])
    assert rc == 0
    files = sorted(os.listdir(out))
    lattice = [(r, c) for r in (7, 21) for c in (7, 21)]                       # 28x28 grid, stride 14
    singles = [f'layers.0.blocks.1.attn_r{r}_c{c}.png' for r, c in lattice]
    expected = singles + [f'compare_{f}' for f in singles] + [
        'layers.0.blocks.1.attn_grid.png', 'compare_layers.0.blocks.1.attn_grid.png', 'compare_grid.png']
    assert files == sorted(expected)
    for f in singles:
        with Image.open(out / f) as im:
            assert im.size == (96, 96) and im.mode == 'RGB'
    with Image.open(out / 'compare_grid.png') as im:
        assert im.size[0] > im.size[1]                 # 2 rows of 4 queries


def test_cli_explicit_queries(photo, tmp_path):
    rc = main(['--cfg', os.path.join(ROOT, CFG), '--opts', *WINDOWED, '--image', photo, '--stage', '1',
               '--block', '1', '--queries', '3,4', '10,12', '--size', '64', '--output', str(tmp_path)])
    assert rc == 0
    assert sorted(os.listdir(tmp_path)) == sorted(['layers.1.blocks.1.attn_r3_c4.png',
                                                   'layers.1.blocks.1.attn_r10_c12.png',
                                                   'layers.1.blocks.1.attn_grid.png'])


def test_cli_bad_block_lists_valid_ones(photo, tmp_path, capsys):
    rc = main(['--cfg', os.path.join(ROOT, CFG), '--opts', *WINDOWED, '--image', photo, '--stage', '1',
               '--block', '5', '--output', str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and '\n' not in err
    assert 'no block at --stage 1 --block 5' in err and 'stage 1: blocks 0-1' in err and 'stage 2' in err
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize('content', [None, b'not an image at all'])
def test_cli_unreadable_image(tmp_path, capsys, content):
    path = tmp_path / 'broken.jpg'
    if content is not None:
        path.write_bytes(content)
    rc = main(['--cfg', os.path.join(ROOT, CFG), '--opts', *WINDOWED, '--image', str(path),
               '--output', str(tmp_path / 'out')])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and '\n' not in err and f'cannot read image {path}:' in err


def test_cli_query_outside_grid(photo, tmp_path, capsys):
    rc = main(['--cfg', os.path.join(ROOT, CFG), '--opts', *WINDOWED, '--image', photo, '--stage', '2',
               '--queries', '7,0', '--output', str(tmp_path)])
    assert rc == 2 and 'outside the 7x7 token grid' in capsys.readouterr().err


def test_checkpoint_weights_are_used(photo, tmp_path):
    """--checkpoint goes through checkpoint.py: the maps are those of the saved weights, not of the seed."""
    pytest.importorskip('checkpoint')
    from visualize.cli import load_model
    trained = _model(GLOBAL, seed=123)
    ckpt = tmp_path / 'm.pth'
    torch.save({'model': trained.state_dict(), 'epoch': 3}, ckpt)
    model, _ = load_model(os.path.join(ROOT, CFG), GLOBAL, str(ckpt), False, 0, torch.device('cpu'))
    x = _input(photo)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))
    rc = main(['--cfg', os.path.join(ROOT, CFG), '--opts', *WINDOWED, '--image', photo,
               '--checkpoint', str(ckpt), '--output', str(tmp_path / 'o')])
    assert rc == 2                                         # wrong window size for these weights: shape mismatch


def test_whole_image_family_and_unsupported_layout(photo):
    """A block of another family that attends over the whole image works; reduced keys are refused."""
    from visualize import LayoutError
    cfg = os.path.join(ROOT, 'cfgs/flatten_pvt_v2_b0.yaml')
    x = None
    for sr, ok in (('1111', True), ('2111', False)):
        torch.manual_seed(0)
        model = build_model(load_config(cfg, ['DATA.IMG_SIZE', '64', 'MODEL.LA.PVT_LA_SR_RATIOS', sr])).eval()
        if x is None:
            with Image.open(photo) as f:
                x = to_input(f.convert('RGB'), 64)
        site = select_site(attention_sites(model), 0, 0)
        cap = capture(model, site, x)
        if ok:
            maps = attention_maps(site, cap, (64, 64))
            assert maps.grid == (16, 16)
            torch.testing.assert_close(maps.matrix.sum(-1), torch.ones(1, 256, dtype=torch.float64))
        else:
            with pytest.raises(LayoutError, match='spatially reduced'):
                attention_maps(site, cap, (64, 64))


# ----------------------------------------------------------------------------- prefix tokens (converted ViTs)
DEIT = os.path.join(ROOT, 'cfgs/flatten_deit_t.yaml')
# a stock timm ViT converted through the config: 32 px, patch 8 -> a 4x4 grid, 2 blocks of 2 heads
VIT_LA = ['MODEL.TYPE', 'vit_tiny_patch16_224', 'MODEL.ATTENTION', 'focused_linear', 'MODEL.LA.KERNEL_SIZE', '3',
          'DATA.IMG_SIZE', '32', 'MODEL.NUM_CLASSES', '10']
VIT_KWARGS = '{{patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2{}}}'


def _focused_map_reference(attn, x: torch.Tensor, prefix: int, grid, query: int) -> torch.Tensor:
    """The drawn map of grid query ``query`` recomputed in float64 from the definition: q, k from the module's
    qkv weights, k + positional encoding, phi(t) = f_p(relu(t) + 1e-6) / softplus(scale) with
    f_p(t) = t^p ||t|| / ||t^p||, per head A_ij = q_i.k_j / (sum_j q_i.k_j + N 1e-6) over all N tokens,
    the dwc of channel 0 added on the grid tokens only (column j = the conv of the j-th one-hot image),
    |A + D| row-normalised, the mean over heads; then the prefix columns removed. Returns (grid tokens,)."""
    d64 = lambda t: t.detach().double()
    x = d64(x)[0]                                                  # (N, C), image 0
    N, C = x.shape
    q, k, _ = (x @ d64(attn.qkv.weight).T + d64(attn.qkv.bias)).split(C, dim=-1)
    k = k + d64(attn.positional_encoding)[0]

    def phi(t):
        t = (F.relu(t) + 1e-6) / F.softplus(d64(attn.scale)[0])
        p = attn.focusing_factor
        return t ** p * t.norm(dim=-1, keepdim=True) / (t ** p).norm(dim=-1, keepdim=True)

    q, k = phi(q), phi(k)
    D = torch.zeros(N, N, dtype=torch.float64)
    D[prefix:, prefix:] = _dwc_reference(d64(attn.dwc.weight)[0, 0], grid)
    h = attn.num_heads
    d = C // h
    rows = []
    for head in range(h):
        sl = slice(head * d, (head + 1) * d)
        a = q[query + prefix, sl] @ k[:, sl].T                     # (N,) one query row
        row = (a / (a.sum() + N * 1e-6) + D[query + prefix]).abs()
        rows.append(row / row.sum())
    return torch.stack(rows).mean(0)[prefix:]


@pytest.mark.parametrize('extra, prefix', [('', 1), (', reg_tokens: 2', 3),
                                           (', class_token: False, global_pool: avg', 0)])
def test_converted_vit_block_with_prefix_tokens_matches_the_definition(photo, extra, prefix):
    """A stock timm ViT converted through MODEL.ATTENTION (class token, + register tokens, none): the drawn map
    of a query is its row of the focused linear attention with the dwc, prefix columns removed; the prefix
    tokens' share is the rest of the row."""
    torch.manual_seed(0)
    model = build_model(load_config(DEIT, VIT_LA + ['MODEL.KWARGS', VIT_KWARGS.format(extra)])).eval()
    site = select_site(attention_sites(model), 0, 1)               # timm's ViT: one stage, blocks 0-1
    assert site.name == 'blocks.1.attn' and site.module.num_prefix_tokens == prefix
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                                          # non-trivial scale, encoding and dwc
        for name in ('scale', 'positional_encoding', 'dwc.weight'):
            t = site.module.get_parameter(name)
            t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    with Image.open(photo) as f:
        x = to_input(f.convert('RGB'), 32)
    seen = []
    h = site.module.register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    maps = attention_maps(site, capture(model, site, x), (32, 32))
    h.remove()
    assert maps.grid == (4, 4) and maps.layout.prefix == prefix
    for r, c in ((1, 2), (3, 0)):
        ref = _focused_map_reference(site.module, seen[0], prefix, (4, 4), r * 4 + c)
        torch.testing.assert_close(maps.query_map(r, c).flatten(), ref, rtol=1e-5, atol=1e-8)
        share = maps.query_prefix_share(r, c)
        assert (share is None) if not prefix else abs(share - (1 - float(ref.sum()))) < 1e-6


def test_cli_draws_flatten_deit_t(photo, tmp_path, capsys):
    """python -m visualize on flatten_deit_t (class token): one stage of blocks, the maps written."""
    opts = ['DATA.IMG_SIZE', '32', 'MODEL.KWARGS', '{patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}']
    assert main(['--cfg', DEIT, '--opts', *opts, '--list']) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith('--stage 0 --block 1: blocks.1.attn')
    out = tmp_path / 'o'
    assert main(['--cfg', DEIT, '--opts', *opts, '--image', photo, '--stage', '0', '--block', '1',
                 '--queries', '1,2', '--output', str(out)]) == 0
    assert sorted(os.listdir(out)) == ['blocks.1.attn_grid.png', 'blocks.1.attn_r1_c2.png']
