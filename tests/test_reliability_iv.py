"""Reliability IV (issue #32), driven where the user meets each defect: a run folder belongs to one run at a
time (a live holder named, a killed one never blocks); every setting is honoured or refused at load time
(MODEL.KWARGS against the key it duplicates, values the model rejects, experiment keys a model does not take,
MODEL.IN_CHANS 1 as grayscale input); no trained epoch is lost to an unreadable validation image; one line,
never a traceback, in main.py, tools/export.py, ``python -m visualize`` and ``--pretrained``; the ONNX export
takes any batch; plot labels are unique; an empty YAML is refused.

CPU, in this process (``harness.run_main``) except the holder of a run folder (a real ``python main.py``
forked by the session's fork server); tiny models at 32 px on small digits sets.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from harness import Watched, run_folder, run_main, train_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = 'tiny_rel4'

TINY_YAML = f"""
MODEL:
  TYPE: flatten_swin
  NAME: {NAME}
  NUM_CLASSES: 10
  SWIN: {{EMBED_DIM: 16, DEPTHS: [1, 1], NUM_HEADS: [1, 2], WINDOW_SIZE: 56}}
  LA: {{ATTN_TYPE: LL}}
DATA: {{IMG_SIZE: 32, BATCH_SIZE: 8, NUM_WORKERS: 0}}
TRAIN: {{EPOCHS: 1, WARMUP_EPOCHS: 0}}
AUG: {{AUTO_AUGMENT: none, REPROB: 0.0, MIXUP: 0.0, CUTMIX: 0.0}}
PRINT_FREQ: 1
"""
# the same recipe without model keys (any stock timm model through --opts MODEL.TYPE NAME)
RECIPE_YAML = "\n".join(line for line in TINY_YAML.splitlines() if not line.strip().startswith(('SWIN', 'LA')))


@pytest.fixture(scope='module')
def cfgs(tmp_path_factory):
    folder = tmp_path_factory.mktemp('rel4_cfgs')
    (folder / 'tiny.yaml').write_text(TINY_YAML)
    (folder / 'recipe.yaml').write_text(RECIPE_YAML.replace("TYPE: flatten_swin", "TYPE: resnet18"))
    return str(folder / 'tiny.yaml'), str(folder / 'recipe.yaml')


@pytest.fixture(scope='module')
def small(make_digits) -> str:
    """4 train and 2 val images per class."""
    return make_digits(32, train=4, val=2)


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f'rel4_{name}', os.path.join(ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- one run per folder
def test_a_live_run_folder_is_refused_and_a_killed_holder_does_not_block(cfgs, small, tmp_path, fork_server):
    """A second run into a live run's folder stops at once naming the folder and the holder (host, pid);
    --eval into it is allowed (it writes only into its eval/ sub-folder); after the holder is killed -9,
    the same command runs."""
    output = str(tmp_path / 'runs')
    argv = train_args(cfgs[0], small, output)
    holder = Watched.forked(fork_server, argv + ['--opts', 'TRAIN.EPOCHS', '500'])
    try:
        assert holder.wait_for(lambda line: 'Start training' in line), holder.output[-3000:]
        second = run_main(argv)
        line = second.error_line()
        folder = run_folder(output, NAME)
        assert folder in line and f'pid {holder.proc.pid}' in line and 'host ' in line, line
        assert run_main(argv + ['--eval']).ok()
    finally:
        holder.kill()
    run_main(argv).ok()             # the lock of the killed holder went with it


def test_eval_beside_a_live_run_survives_its_checkpoint_rotation(tmp_path, monkeypatch):
    """A live run prunes ckpt_epoch_* while --eval of its folder looks for the newest: a file listed and then
    removed is skipped (never set aside or a traceback), and a chosen file removed before loading is looked
    up again."""
    import checkpoint as ckpt_io
    import resume
    import torch.nn as nn
    model = nn.Linear(2, 2)
    for epoch in (1, 2):
        ckpt_io.save_checkpoint({'model': model.state_dict(), 'epoch': epoch}, str(tmp_path / f'ckpt_epoch_{epoch}.pth'))
    listed = glob.glob
    monkeypatch.setattr(ckpt_io.glob, 'glob', lambda p: listed(p) + [str(tmp_path / 'ckpt_epoch_3.pth')])
    assert ckpt_io.find_resume_checkpoint(str(tmp_path)) == str(tmp_path / 'ckpt_epoch_2.pth')
    assert not listed(str(tmp_path / '*.corrupt'))
    monkeypatch.setattr(ckpt_io.glob, 'glob', listed)
    from config import load_config
    from utils import DistInfo
    config = load_config(os.path.join(ROOT, 'cfgs', 'demo', 'flatten_swin_digits.yaml'),
                         ['OUTPUT', str(tmp_path), 'EVAL_MODE', 'True'], validate=False)
    real_load, calls = resume.load_weights, []

    def load_after_a_prune(path, *a, **k):        # the live run removes the newest file just before it is read
        calls.append(path)
        if len(calls) == 1:
            os.remove(path)
        return real_load(path, *a, **k)
    monkeypatch.setattr(resume, 'load_weights', load_after_a_prune)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device('cpu'))
    source, ckpt = resume.load_evaluated(config, info, model)
    assert calls == [str(tmp_path / 'ckpt_epoch_2.pth'), str(tmp_path / 'ckpt_epoch_1.pth')]
    assert source == calls[-1] and ckpt['epoch'] == 1


# ----------------------------------------------------------------------------- settings honoured or refused
@pytest.mark.parametrize('which,opts,words', [
    ('tiny', ['MODEL.KWARGS', '{embed_dim: 24}'], ['MODEL.KWARGS.embed_dim', 'MODEL.SWIN.EMBED_DIM']),
    ('tiny', ['MODEL.KWARGS', '{num_classes: 5}'], ['MODEL.KWARGS.num_classes', 'MODEL.NUM_CLASSES']),
    ('tiny', ['MODEL.KWARGS', '{drop_rate: abc}'], ['MODEL.KWARGS.drop_rate', 'MODEL.DROP_RATE']),
    ('tiny', ['MODEL.IN_CHANS', '1'], ['MODEL.IN_CHANS', 'MODEL.SWIN.IN_CHANS']),
    ('tiny', ['MODEL.SWIN.IN_CHANS', '2'], ['MODEL.SWIN.IN_CHANS', 'grayscale']),
    ('recipe', ['MODEL.TYPE', 'ghostnet_050', 'MODEL.DROP_PATH_RATE', '0.3'], ['MODEL.DROP_PATH_RATE', 'ghostnet_050']),
    ('recipe', ['MODEL.KWARGS', '{img_size: 32}'], ['MODEL.KWARGS.img_size', 'resnet18']),
    ('recipe', ['MODEL.KWARGS', '{base_width: abc}'], ['MODEL.KWARGS.base_width', 'MODEL.TYPE resnet18']),
])
def test_settings_a_model_does_not_take_are_one_line_before_any_work(cfgs, small, tmp_path, which, opts, words):
    cfg = cfgs[0] if which == 'tiny' else cfgs[1]
    r = run_main(train_args(cfg, small, str(tmp_path), opts=opts))
    line = r.error_line()
    assert all(w in line for w in words), line
    assert not os.path.exists(os.path.join(tmp_path, NAME)), 'the run started work before refusing'


def test_kwargs_value_names_the_type_the_config_set(cfgs, small, tmp_path):
    """A MODEL.KWARGS value the family model rejects (not a section key): the MODEL.TYPE of the config and
    the key, not the registered variant's name."""
    r = run_main(train_args(cfgs[0], small, str(tmp_path), opts=['MODEL.KWARGS', '{patch_norm_typo: 1}']))
    line = r.error_line()
    assert 'MODEL.KWARGS.patch_norm_typo' in line and re.search(r'MODEL\.TYPE flatten_swin\b(?!_)', line), line
    assert 'flatten_swin_t' not in line, line


def test_in_chans_1_is_grayscale_input(cfgs, small, tmp_path):
    """MODEL.IN_CHANS 1 on a stock model: the data pipeline gives the BT.601 luma of the normalised RGB
    channels (checked in float64 against the RGB transform), and --eval runs on the real images."""
    from config import load_config
    from data.build import build_transform
    rgb = load_config(cfgs[1], ['MODEL.TYPE', 'test_efficientnet'])
    gray = load_config(cfgs[1], ['MODEL.TYPE', 'test_efficientnet', 'MODEL.IN_CHANS', '1'])
    img = Image.open(sorted(glob.glob(os.path.join(small, 'val', '3', '*')))[0])
    x, y = build_transform(False, rgb)(img).double(), build_transform(False, gray)(img).double()
    want = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
    assert y.shape == (1, 32, 32) and torch.allclose(y[0], want, atol=1e-6)
    run_main(train_args(cfgs[1], small, str(tmp_path), '--eval',
                        opts=['MODEL.TYPE', 'test_efficientnet', 'MODEL.IN_CHANS', '1'])).ok()


# ----------------------------------------------------------------------------- no lost epoch
def _with_bad_val(small: str, dst: str, decodes: bool) -> str:
    """A copy of ``small`` with one unreadable image in val/4: a text file named .png, or (``decodes``) a PNG
    whose header and chunk checksums are valid but whose pixel data does not inflate (it opens, and fails
    only when decoded)."""
    shutil.copytree(small, dst)
    path = os.path.join(dst, 'val', '4', 'zz_bad.png')
    if decodes:
        import struct
        import zlib
        Image.new('RGB', (32, 32), (200, 30, 30)).save(path)
        blob = bytearray(open(path, 'rb').read())
        at = blob.index(b'IDAT') - 4
        n = struct.unpack('>I', blob[at:at + 4])[0]
        data = bytes(b ^ 0x5A for b in blob[at + 8:at + 8 + n])          # garbage with a valid CRC
        blob[at + 8:at + 12 + n] = data + struct.pack('>I', zlib.crc32(b'IDAT' + data) & 0xFFFFFFFF)
        open(path, 'wb').write(bytes(blob))
    else:
        open(path, 'w').write('not an image\n')
    return path


def test_val_set_checked_before_training(cfgs, small, tmp_path):
    data = str(tmp_path / 'data')
    bad = _with_bad_val(small, data, decodes=False)
    r = run_main(train_args(cfgs[0], data, str(tmp_path / 'out')))
    assert bad in r.error_line() and 'DATA.SKIP_BAD_IMAGES' in r.error_line()
    assert 'Train: [' not in r.out, 'trained before finding the unreadable validation image'


def test_unreadable_val_image_after_the_check_keeps_the_epoch(cfgs, small, tmp_path):
    data = str(tmp_path / 'data')
    bad = _with_bad_val(small, data, decodes=True)
    output = str(tmp_path / 'out')
    line = run_main(train_args(cfgs[0], data, output)).error_line()
    assert bad in line and 'ckpt_epoch_1.pth' in line, line
    ckpt = torch.load(os.path.join(run_folder(output, NAME), 'ckpt_epoch_1.pth'), weights_only=True)
    assert ckpt['epoch'] == 1
    # skipped and counted instead: summary.txt / summary.json and metrics.jsonl say 1 unreadable image
    r = run_main(train_args(cfgs[0], data, str(tmp_path / 'skip'), opts=['DATA.SKIP_BAD_IMAGES', 'True'])).ok()
    assert r.metrics[-1]['bad_val_images'] == 1 and r.summary['skipped_val_images'] == 1
    with open(r.path('summary.txt')) as f:
        assert re.search(r'1 unreadable images \(0 training, 1 validation\)', f.read())


# ----------------------------------------------------------------------------- one line, never a traceback
def test_pretrained_of_another_model_and_two_heads(cfgs, small, tmp_path):
    """--pretrained: a file of another model whose timm filter raises is one line naming file and model;
    a distilled DeiT's two heads of another class count are both re-initialised."""
    deit = ['MODEL.TYPE', 'deit_tiny_distilled_patch16_224',
            'MODEL.KWARGS', '{patch_size: 8, embed_dim: 16, depth: 1, num_heads: 2}']
    import timm
    ours = timm.create_model('deit_tiny_distilled_patch16_224', img_size=32, patch_size=8, embed_dim=16, depth=1,
                             num_heads=2, num_classes=1000)
    own = str(tmp_path / 'deit.pth')
    torch.save({'model': ours.state_dict()}, own)
    other = str(tmp_path / 'resnet.pth')          # timm's ConvNeXt filter raises KeyError on it
    torch.save({'model': timm.create_model('resnet10t', num_classes=10).state_dict()}, other)
    line = run_main(train_args(cfgs[1], small, str(tmp_path / 'a'), '--eval', '--pretrained', other,
                               opts=['MODEL.TYPE', 'convnext_atto'])).error_line()
    assert other in line and 'convnext_atto' in line and 'KeyError' in line, line
    r = run_main(train_args(cfgs[1], small, str(tmp_path / 'b'), '--eval', '--pretrained', own, opts=deit)).ok()
    for head in ('head', 'head_dist'):
        assert f'{head}.weight: class count differs, head re-initialised' in r.out


def test_torchscript_of_a_features_only_model_says_why():
    import timm
    import models  # noqa: F401
    model = timm.create_model('flatten_swin_t', features_only=True, img_size=64, embed_dim=16, depths=(1, 1, 1, 1),
                              num_heads=(1, 1, 1, 1), window_size=2)
    with pytest.raises(RuntimeError, match='torch.jit.script does not compile a features_only flatten_swin_t'):
        torch.jit.script(model)


class _HeadlessLinearAttention(torch.nn.Module):
    """A family's linear attention as the README recipe describes it (an ``AttentionTap3`` on (phi_q, phi_k,
    v), ``attn_kind``), which keeps its head count under another name than ``num_heads``."""
    attn_kind = 'linear'

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        from models.focused_attention import AttentionTap3
        self.qkv, self.heads, self.tap = torch.nn.Linear(dim, 3 * dim), heads, AttentionTap3()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.tap(*[torch.relu(t) if i < 2 else t for i, t in enumerate(self.qkv(x).chunk(3, -1))])
        return (q @ (k.transpose(1, 2) @ v)) / (q @ k.sum(1, keepdim=True).transpose(1, 2) + 1e-6)


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 8, 8, 8)
        self.blocks = torch.nn.ModuleList([torch.nn.ModuleDict({'attn': _HeadlessLinearAttention()})])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.blocks[0]['attn'](x).mean(1)


def test_visualize_tap_without_num_heads_is_one_line(tmp_path, monkeypatch, capsys):
    import visualize.cli as cli
    monkeypatch.setattr(cli, 'build_model', lambda config: _Toy())
    photo = tmp_path / 'p.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photo)
    rc = cli.main(['--cfg', os.path.join(ROOT, 'cfgs', 'demo', 'flatten_swin_digits.yaml'), '--image', str(photo),
                   '--output', str(tmp_path / 'o')])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and 'num_heads' in err[0], err


def test_export_tool_names_close_models_sizes_and_checkpoints(cfgs, tmp_path, capsys, caplog):
    import errors
    tool = _load_tool('export')
    assert errors.cli(lambda: tool.main(['flatten_swin_tt'])) == 2
    assert 'did you mean one of flatten_swin_t' in capsys.readouterr().err
    assert errors.cli(lambda: tool.main(['flatten_swin_t', '--img-size', '100'])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and '--img-size 100' in err[0], err
    # a model without img_size (a CNN) is built as is: the run goes on to the next check (--output's folder)
    assert errors.cli(lambda: tool.main(['resnet10t', '--img-size', '48', '--output', str(tmp_path / 'no' / 'x')])) == 2
    assert 'does not exist' in capsys.readouterr().err
    # --checkpoint says it loads weights (not "Resuming from")
    from config import load_config
    from models import build_model
    path = str(tmp_path / 'w.pth')
    torch.save({'model': build_model(load_config(cfgs[0])).state_dict()}, path)
    with caplog.at_level(logging.INFO):
        tool.build(None, cfgs[0], path, None)
    assert 'Resuming' not in caplog.text and f'loaded the weights of {path}' in caplog.text


def test_onnx_export_takes_any_batch(tmp_path):
    ort = pytest.importorskip('onnxruntime')
    tool = _load_tool('export')
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 5)).eval()
    path = str(tmp_path / 'm.onnx')
    tool.export(model, torch.randn(1, 3, 16, 16), 'onnx', path)
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            want = model(x).double()
        got = torch.from_numpy(session.run(None, {'image': x.numpy()})[0]).double()
        assert got.shape == (batch, 5) and torch.allclose(got, want, atol=1e-5)


def test_plot_labels_are_unique(tmp_path):
    tool = _load_tool('plot_runs')
    runs = []
    for parent in ('a', 'b'):
        folder = tmp_path / parent / 'output' / NAME / 'default'
        folder.mkdir(parents=True)
        (folder / 'config.yaml').write_text(f'MODEL:\n  NAME: {NAME}\nTAG: default\n')
        (folder / 'metrics.jsonl').write_text(json.dumps({'kind': 'epoch', 'epoch': 1, 'train_loss': 1.0,
                                                          'val_acc1': 50.0, 'lr': 0.1}) + '\n')
        runs.append(str(folder))
    fig = tool.plot_runs(runs, str(tmp_path / 'c.png'))
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert len(labels) == 2 and len(set(labels)) == 2, labels


def test_empty_yaml_is_refused(tmp_path, small):
    cfg = tmp_path / 'empty.yaml'
    cfg.write_text('# nothing yet\n')
    line = run_main(train_args(str(cfg), small, str(tmp_path))).error_line()
    assert 'empty.yaml is empty' in line, line
