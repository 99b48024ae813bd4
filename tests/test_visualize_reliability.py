"""``python -m visualize`` as a demanding user tries it: ``--list`` prints exactly what ``--stage/--block``
accept; a 16-bit image is scaled as the training loader scales it; bad option values and blocks that cannot be
drawn are one line with exit status 2; options of drawn (deformable / neighbourhood) blocks are honoured or
refused; a model without attention taps says so in one line; nothing in ``visualize/`` names a model family.

Runs in this process on the demo configs (64 px digits models, random weights) and scikit-learn's photo.
"""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
from PIL import Image

import errors
from config import load_config
from models import build_model
from visualize.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAT = os.path.join(ROOT, 'cfgs', 'demo', 'dat_digits.yaml')
L2VIT = os.path.join(ROOT, 'cfgs', 'demo', 'l2vit_digits.yaml')
SWIN = os.path.join(ROOT, 'cfgs', 'demo', 'flatten_swin_digits.yaml')


@pytest.fixture(scope='module')
def photo(tmp_path_factory) -> str:
    sklearn_datasets = pytest.importorskip('sklearn.datasets')
    path = tmp_path_factory.mktemp('img') / 'china.jpg'
    Image.fromarray(sklearn_datasets.load_sample_images().images[0]).save(path, format='JPEG')
    return str(path)


def one_error_line(capsys, rc: int) -> str:
    """The single ``ERROR: ...`` line of a failed call (asserted: exit status 2, nothing else on stderr)."""
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith('ERROR: '), (rc, err)
    return err[0]


def listed(capsys, cfg: str) -> list:
    """``--list`` as (options, module path) pairs."""
    assert main(['--cfg', cfg, '--list']) == 0
    out = capsys.readouterr().out.strip().splitlines()
    pairs = [re.match(r'^(--\S+ \S+(?: --\S+ \S+)?): (\S+) \(', line) for line in out]
    assert all(pairs), out
    return [(m.group(1), m.group(2)) for m in pairs]


def tap_modules(cfg: str) -> list:
    """The attention modules of the config's model, read here: every module with a ``tap`` child, in order."""
    model = build_model(load_config(cfg, []))
    return [name for name, m in model.named_modules() if 'tap' in dict(m.named_children())]


# ----------------------------------------------------------------------------- --list
def test_list_is_what_stage_and_block_accept(photo, tmp_path, capsys):
    """DAT's demo: one line per attention module, no pair twice, each the module the README documents for
    ``--stage S --block B`` (``stages.S.attns.B``); following every listed line draws that module."""
    pairs = listed(capsys, DAT)
    assert [name for _, name in pairs] == tap_modules(DAT)
    assert len({opts for opts, _ in pairs}) == len(pairs)                       # no selection listed twice
    for opts, name in pairs:
        s, b = re.fullmatch(r'stages\.(\d+)\.attns\.(\d+)', name).groups()
        assert opts == f'--stage {s} --block {b}'
    for opts, name in pairs:
        out = tmp_path / name
        assert main(['--cfg', DAT, '--image', photo, *opts.split(), '--queries', '1,1', '--size', '64',
                     '--output', str(out)]) == 0
        files = os.listdir(out)
        assert len(files) == 1 and files[0].startswith(name + '_') and files[0].endswith('_r1_c1.png'), files
    capsys.readouterr()
    msg = one_error_line(capsys, main(['--cfg', DAT, '--image', photo, '--stage', '0', '--block', '1',
                                       '--output', str(tmp_path / 'none')]))
    assert 'no block at --stage 0 --block 1' in msg and 'stage 2: blocks 0-1' in msg


def test_list_of_a_window_model_matches_its_paths(capsys):
    """The FLatten-Swin demo: ``layers.S.blocks.B.attn`` is ``--stage S --block B``."""
    pairs = listed(capsys, SWIN)
    assert [name for _, name in pairs] == tap_modules(SWIN)
    for opts, name in pairs:
        s, b = re.fullmatch(r'layers\.(\d+)\.blocks\.(\d+)\.attn', name).groups()
        assert opts == f'--stage {s} --block {b}'


# ----------------------------------------------------------------------------- 16-bit images
def test_16bit_png_is_scaled_like_the_training_loader(tmp_path):
    """A 16-bit grayscale PNG gives the same drawings as the 8-bit image scaled by 255/65535 (the training
    loader's rule; the old reader clipped it to white); both readers return the same pixels."""
    ramp = np.linspace(0, 65535, 96 * 64).reshape(64, 96)
    deep = tmp_path / 'deep.png'
    Image.fromarray(np.rint(ramp).astype(np.uint16)).save(deep)
    with Image.open(deep) as f:
        assert f.mode.startswith('I')                                          # really stored as 16 bits
    eight = tmp_path / 'eight.png'
    gray = np.rint(np.rint(ramp) * 255.0 / 65535.0).astype(np.uint8)
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(eight)
    outputs = []
    for path in (deep, eight):
        out = tmp_path / path.stem
        assert main(['--cfg', SWIN, '--image', str(path), '--queries', '2,3', '--size', '48',
                     '--output', str(out)]) == 0
        outputs.append({f: np.asarray(Image.open(out / f)) for f in sorted(os.listdir(out))})
    assert outputs[0].keys() == outputs[1].keys()
    assert all(np.array_equal(outputs[0][f], outputs[1][f]) for f in outputs[0])
    from data.cached_image_folder import load_image
    from visualize.photo import load_photo
    want = np.stack([gray] * 3, axis=-1)[:, 16:80]                               # the centred 64 x 64 square
    assert np.array_equal(np.asarray(load_photo(str(deep))), want)
    assert np.array_equal(np.asarray(load_image(str(deep)))[:, 16:80], want)


# ----------------------------------------------------------------------------- one line, exit 2
@pytest.mark.parametrize('option, value, words', [('--size', '0', '--size'), ('--cmap', 'bogus', "'bogus'"),
                                                  ('--max-grid', '0', '--max-grid'), ('--alpha', '1.5', '--alpha'),
                                                  ('--query-stride', '0', '--query-stride')])
def test_bad_option_values_are_one_line(photo, tmp_path, capsys, option, value, words):
    rc = main(['--cfg', SWIN, '--image', photo, option, value, '--output', str(tmp_path)])
    msg = one_error_line(capsys, rc)
    assert words in msg
    assert not os.listdir(tmp_path)


def test_padded_window_block_is_one_line(photo, tmp_path, capsys):
    """L2ViT's demo at 64 px: the last stage's 2x2 map is zero-padded into one 4x4 window, whose padded
    tokens have no image position: one line naming the block; the same stage's linear block draws."""
    msg = one_error_line(capsys, main(['--cfg', L2VIT, '--image', photo, '--stage', '3', '--block', '0',
                                       '--output', str(tmp_path / 'w')]))
    assert 'stages.3.0.attn' in msg and '2x2' in msg and '4x4' in msg
    assert main(['--cfg', L2VIT, '--image', photo, '--stage', '3', '--block', '1', '--queries', '1,1',
                 '--size', '32', '--output', str(tmp_path / 'l')]) == 0
    assert main(['--cfg', L2VIT, '--image', photo, '--stage', '2', '--block', '0', '--queries', '3,0',
                 '--size', '32', '--output', str(tmp_path / 'w4')]) == 0       # 4x4 map, one whole window


def test_overlay_smaller_than_the_token_grid(photo, tmp_path):
    """--size 4 on an 8x8 token grid (cells of half a pixel): drawn, not a Pillow error."""
    assert main(['--cfg', SWIN, '--image', photo, '--queries', '3,3', '--size', '4', '--output', str(tmp_path)]) == 0
    with Image.open(tmp_path / 'layers.0.blocks.0.attn_r3_c3.png') as im:
        assert im.size == (4, 4)


def test_exit_status_and_one_line_from_the_command_line(tmp_path, startup_server):
    """``python -m visualize`` itself (a fresh start past torch and timm): exit status 2 and one stderr line
    for a bad --cmap."""
    proc = startup_server.run(['-m', 'visualize', '--cfg', SWIN, '--image', 'x.png', '--cmap', 'nope',
                               '--output', str(tmp_path)], cwd=ROOT)
    lines = [ln for ln in proc.err.splitlines() if ln.strip()]
    assert proc.code == 2 and len(lines) == 1 and "'nope'" in lines[0], proc.err[-2000:]


# ----------------------------------------------------------------------------- drawn blocks
def test_query_stride_and_compare_are_honoured_on_drawn_blocks(photo, tmp_path):
    """A deformable block (stage 1: 8x8 map): --query-stride 2 draws the lattice rows/cols 1, 3, 5, 7;
    --compare-cfg draws the second model's block for the same queries (prefixed compare_)."""
    out = tmp_path / 'stride'
    assert main(['--cfg', DAT, '--image', photo, '--stage', '1', '--block', '0', '--query-stride', '2',
                 '--size', '64', '--output', str(out)]) == 0
    want = {f'stages.1.attns.0_deformable_r{r}_c{c}.png' for r in (1, 3, 5, 7) for c in (1, 3, 5, 7)}
    assert set(os.listdir(out)) == want
    out = tmp_path / 'compare'
    assert main(['--cfg', DAT, '--image', photo, '--stage', '2', '--block', '0', '--queries', '0,0', '3,2',
                 '--compare-cfg', DAT, '--compare-module', 'stages.2.attns.0', '--seed', '1', '--size', '64',
                 '--output', str(out)]) == 0
    names = [f'stages.2.attns.0_neighborhood_r{r}_c{c}.png' for r, c in ((0, 0), (3, 2))]
    assert set(os.listdir(out)) == set(names) | {f'compare_{n}' for n in names}


def test_map_options_and_mixed_compare_on_drawn_blocks_are_one_line(photo, tmp_path, capsys):
    msg = one_error_line(capsys, main(['--cfg', DAT, '--image', photo, '--stage', '1', '--block', '0',
                                       '--cmap', 'magma', '--smooth', '--output', str(tmp_path / 'a')]))
    assert '--cmap' in msg and '--smooth' in msg and 'deformable' in msg
    msg = one_error_line(capsys, main(['--cfg', DAT, '--image', photo, '--stage', '1', '--block', '0',
                                       '--compare-cfg', SWIN, '--output', str(tmp_path / 'b')]))
    assert 'deformable' in msg and 'linear' in msg and '--compare-cfg' in msg
    msg = one_error_line(capsys, main(['--cfg', DAT, '--image', photo, '--stage', '1', '--block', '0',
                                       '--head', '7', '--output', str(tmp_path / 'c')]))
    assert 'head 7' in msg


# ----------------------------------------------------------------------------- any model
def test_model_without_taps_is_one_line(photo, tmp_path, capsys):
    """A stock timm model (no attention taps): --list and drawing both say why in one line."""
    cfg = tmp_path / 'resnet.yaml'
    cfg.write_text('MODEL:\n  TYPE: resnet18\n  NAME: resnet18_digits\n  NUM_CLASSES: 10\nDATA:\n  IMG_SIZE: 32\n')
    for extra in (['--list'], ['--image', photo, '--output', str(tmp_path / 'o')]):
        msg = one_error_line(capsys, main(['--cfg', str(cfg), *extra]))
        assert 'resnet18' in msg and 'no attention module with a tap' in msg


def test_errors_share_the_one_base_class():
    from visualize import InputError, LayoutError, SelectionError
    assert all(issubclass(e, errors.UserError) for e in (InputError, LayoutError, SelectionError))


FAMILY = re.compile(r'(?i:\b(swin|cswin|pvt\w*|dat|l2vit|visformer|lepe)\b)|FLatten|flatten_\w+')


def test_visualize_names_no_family():
    """visualize/ works from what every model exposes (taps, attn_kind, token_groups, feature_info)."""
    folder = os.path.join(ROOT, 'visualize')
    hits = []
    for name in sorted(os.listdir(folder)):
        if name.endswith('.py'):
            with open(os.path.join(folder, name)) as f:
                hits += [f'{name}:{i}: {line.strip()}' for i, line in enumerate(f, 1) if FAMILY.search(line)]
    assert not hits, '\n'.join(hits)
