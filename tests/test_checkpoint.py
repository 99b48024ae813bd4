"""checkpoint.py: atomic save, safe load (CfgNode allowed, hostile pickles refused), strict loading,
auto-resume discovery, pruning, and the fine-tuning load of resume.py (checked against an independent
interpolation)."""
import builtins
import errno
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint as C
from config import default_config
from models import build_model
from resume import load_finetune_weights, load_weights


# ----------------------------------------------------------------------------- helpers
def _state(epoch: int = 0, step: int = 0, value: float = 1.0) -> dict:
    return {'model': {'w': torch.full((3, 2), value), 'b': torch.zeros(2)}, 'optimizer': {'state': {}},
            'epoch': epoch, 'step': step, 'config': 'MODEL:\n  TYPE: flatten_swin\n'}


class _Touch:
    """Unpickling this object would run a shell command that creates a file."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f'touch {self.target}',))


class _Eval:
    def __reduce__(self):
        return (builtins.eval, ("__import__('os').getcwd()",))


# ----------------------------------------------------------------------------- save
def test_save_roundtrip_is_atomic_and_leaves_no_temp(tmp_path):
    path = tmp_path / 'ckpt_epoch_0.pth'
    C.save_checkpoint(_state(value=2.0), str(path))
    assert sorted(os.listdir(tmp_path)) == ['ckpt_epoch_0.pth']
    back = C.load_checkpoint(str(path))
    assert torch.equal(back['model']['w'], torch.full((3, 2), 2.0)) and back['epoch'] == 0
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask      # like a plain torch.save, not 0600


@pytest.mark.parametrize('where', ['save', 'replace'])
def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch, where):
    path = str(tmp_path / 'last.pth')
    C.save_checkpoint(_state(value=1.0), path)
    before = open(path, 'rb').read()

    def disk_full(*args, **kwargs):
        if where == 'save':                    # write part of the file, then run out of space
            args[1].write(b'partial')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(C.torch if where == 'save' else C.os, 'save' if where == 'save' else 'replace', disk_full)
    with pytest.raises(C.CheckpointError) as e:
        C.save_checkpoint(_state(value=5.0), path)
    msg = str(e.value)
    assert path in msg and 'No space left' in msg and 'writable --output' in msg and '\n' not in msg
    monkeypatch.undo()
    assert open(path, 'rb').read() == before
    assert os.listdir(tmp_path) == ['last.pth']          # temp file removed
    assert torch.equal(C.load_checkpoint(path)['model']['w'], torch.ones(3, 2))


def test_save_into_unwritable_location(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    with pytest.raises(C.CheckpointError, match='could not write checkpoint'):
        C.save_checkpoint(_state(), str(blocker / 'sub' / 'a.pth'))   # parent is a file: ENOTDIR


def test_refuses_to_save_nonfinite_weights(tmp_path):
    path = str(tmp_path / 'a.pth')
    C.save_checkpoint(_state(value=1.0), path)
    bad = _state()
    bad['model']['w'][0, 0] = float('inf')
    with pytest.raises(C.CheckpointError, match=r"NaN/Inf \(w\)"):
        C.save_checkpoint(bad, path)
    assert torch.equal(C.load_checkpoint(path)['model']['w'], torch.ones(3, 2))


# ----------------------------------------------------------------------------- safe load
@pytest.mark.parametrize('zip_format', [True, False])
def test_cfgnode_checkpoint_loads_under_weights_only(tmp_path, zip_format):
    """An official-style checkpoint pickles the yacs config (plus optimizer/scheduler state); also in
    the legacy (pre-1.6, non-zip) format, which auto-resume reads without mmap."""
    cfg = default_config()
    cfg.MODEL.NAME = 'flatten_swin_tiny_patch4_224'
    cfg.freeze()
    model = nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    path = str(tmp_path / 'official.pth')
    torch.save({'model': model.state_dict(), 'optimizer': opt.state_dict(), 'lr_scheduler': {'base_values': [1e-3]},
                'max_accuracy': 82.1, 'epoch': 299, 'config': cfg}, path,  # plain torch.save, as officially
               _use_new_zipfile_serialization=zip_format)
    ckpt = C.load_checkpoint(path)
    assert type(ckpt['config']).__name__ == 'CfgNode'
    assert ckpt['config'].dump() == cfg.dump() and ckpt['config'].is_frozen()
    assert ckpt['config'].MODEL.NAME == 'flatten_swin_tiny_patch4_224'
    assert type(ckpt['config'].MODEL).__name__ == 'CfgNode'
    assert ckpt['max_accuracy'] == 82.1 and ckpt['epoch'] == 299
    assert torch.equal(ckpt['model']['weight'], model.weight)
    assert torch.equal(ckpt['optimizer']['state'][0]['exp_avg'], opt.state_dict()['state'][0]['exp_avg'])
    assert C.find_resume_checkpoint(str(tmp_path)) == path
    # the allow-list is scoped: a plain weights_only load outside load_checkpoint still refuses CfgNode
    with pytest.raises(Exception, match='CfgNode'):
        torch.load(path, weights_only=True)


def test_hostile_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / 'pwned'
    path = str(tmp_path / 'evil.pth')
    torch.save({'model': {'w': torch.ones(1)}, 'extra': _Touch(str(marker))}, path)
    with pytest.raises(C.CheckpointError) as e:
        C.load_checkpoint(path)
    assert not marker.exists()
    msg = str(e.value)
    assert msg.startswith(f'refusing to load {path}') and 'system' in msg and 'weights_only' in msg
    # sanity: the same file really would create the marker under an unsafe load
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize('payload, name', [(_Eval(), 'eval'), (nn.Linear(2, 2), 'torch.nn.modules.linear.Linear')])
def test_other_disallowed_globals_are_refused(tmp_path, payload, name):
    path = str(tmp_path / 'x.pth')
    torch.save({'model': payload}, path)
    with pytest.raises(C.CheckpointError, match=f'needs {name}'):
        C.load_checkpoint(path)


def test_missing_truncated_and_garbage_files(tmp_path):
    with pytest.raises(C.CheckpointError, match='checkpoint not found'):
        C.load_checkpoint(str(tmp_path / 'nope.pth'))
    good = str(tmp_path / 'good.pth')
    C.save_checkpoint(_state(), good)
    data = open(good, 'rb').read()
    for name, blob in (('trunc.pth', data[:len(data) // 2]), ('garbage.pth', b'not a checkpoint' * 4),
                       ('empty.pth', b'')):
        p = str(tmp_path / name)
        open(p, 'wb').write(blob)
        with pytest.raises(C.CheckpointError, match='truncated or corrupt') as e:
            C.load_checkpoint(p)
        assert p in str(e.value) and '\n' not in str(e.value)


# ----------------------------------------------------------------------------- model state
def test_extract_model_state_variants():
    sd = {'a': torch.ones(1), 'b.c': torch.zeros(2)}
    ddp = {'module.' + k: v for k, v in sd.items()}
    ema = {'a': torch.full((1,), 3.0), 'b.c': torch.zeros(2)}
    for ckpt in ({'model': sd}, {'state_dict': ddp}, {'model_ema': sd}, ddp, sd):
        out = C.extract_model_state(ckpt)
        assert list(out) == ['a', 'b.c']
    assert C.extract_model_state({'model': sd, 'model_ema': ema}, prefer_ema=True)['a'].item() == 3.0
    assert C.extract_model_state({'model': sd, 'model_ema': ema})['a'].item() == 1.0
    assert C.extract_model_state({'model': sd, 'model_ema': None}, prefer_ema=True)['a'].item() == 1.0
    with pytest.raises(C.CheckpointError, match='no model weights'):
        C.extract_model_state({'epoch': 3, 'config': 'x'})


def test_load_model_state_is_strict_with_report():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    good = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    C.load_model_state(model, good, 'good.pth')
    assert torch.equal(model[0].weight, good['0.weight'])
    bad = dict(good)
    del bad['1.bias']
    bad['2.weight'] = torch.zeros(1)
    bad['0.weight'] = torch.zeros(5, 4)
    before = model[0].weight.clone()
    with pytest.raises(C.CheckpointError) as e:
        C.load_model_state(model, bad, 'bad.pth')
    msg = str(e.value)
    assert 'bad.pth' in msg and '1 missing: 1.bias' in msg and '1 unexpected: 2.weight' in msg
    assert '1 shape mismatches: 0.weight (5, 4) vs model (3, 4)' in msg and '--cfg' in msg
    assert torch.equal(model[0].weight, before)           # nothing half-loaded


# ----------------------------------------------------------------------------- resume & prune
def test_find_resume_orders_by_recorded_progress_not_mtime(tmp_path):
    assert C.find_resume_checkpoint(str(tmp_path / 'absent')) is None
    assert C.find_resume_checkpoint(str(tmp_path)) is None
    C.save_checkpoint(_state(epoch=3, step=5), str(tmp_path / 'preempt.pth'))     # mid-epoch 4
    C.save_checkpoint(_state(epoch=3), str(tmp_path / 'ckpt_epoch_3.pth'))
    C.save_checkpoint(_state(epoch=2), str(tmp_path / 'ckpt_epoch_2.pth'))        # newest mtime, oldest progress
    torch.save({'model': {'w': torch.ones(1)}}, str(tmp_path / 'exported.pth'))  # no epoch: not resumable
    assert C.find_resume_checkpoint(str(tmp_path)) == str(tmp_path / 'preempt.pth')
    C.save_checkpoint(_state(epoch=4), str(tmp_path / 'ckpt_epoch_4.pth'))
    assert C.find_resume_checkpoint(str(tmp_path)) == str(tmp_path / 'ckpt_epoch_4.pth')
    assert (tmp_path / 'exported.pth').exists()


def test_find_resume_sets_aside_truncated_newest(tmp_path):
    good = str(tmp_path / 'ckpt_epoch_1.pth')
    C.save_checkpoint(_state(epoch=1), good)
    newest = str(tmp_path / 'ckpt_epoch_2.pth')
    C.save_checkpoint(_state(epoch=2), newest)
    data = open(newest, 'rb').read()
    open(newest, 'wb').write(data[:-200])                 # crash while copying / disk trouble
    hostile = str(tmp_path / 'last.pth')
    torch.save({'model': {}, 'epoch': 9, 'x': _Touch(str(tmp_path / 'pwned'))}, hostile)
    assert C.find_resume_checkpoint(str(tmp_path)) == good
    assert not os.path.exists(newest) and os.path.exists(newest + '.corrupt')
    assert open(newest + '.corrupt', 'rb').read() == data[:-200]                # kept, not deleted
    assert os.path.exists(hostile + '.corrupt') and not (tmp_path / 'pwned').exists()
    assert C.load_checkpoint(good)['epoch'] == 1


def test_find_resume_removes_temp_files_of_dead_writers(tmp_path):
    C.save_checkpoint(_state(epoch=1), str(tmp_path / 'ckpt_epoch_1.pth'))
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()                                            # a pid that no longer runs
    stale = tmp_path / f'.ckpt_epoch_2.pth.{dead.pid}.0123abcd.tmp'
    live = tmp_path / f'.ckpt_epoch_2.pth.{os.getppid()}.0123abcd.tmp'   # writer still alive
    other = tmp_path / 'notes.tmp'
    for p in (stale, live, other):
        p.write_bytes(b'partial')
    assert C.find_resume_checkpoint(str(tmp_path)) == str(tmp_path / 'ckpt_epoch_1.pth')
    assert not stale.exists() and live.exists() and other.exists()


def test_prune_keeps_newest_epochs(tmp_path):
    for e in (1, 2, 10, 3):
        C.save_checkpoint(_state(epoch=e), str(tmp_path / f'ckpt_epoch_{e}.pth'))
    C.save_checkpoint(_state(epoch=3, step=1), str(tmp_path / 'preempt.pth'))
    C.prune_checkpoints(str(tmp_path), 0)
    assert len(os.listdir(tmp_path)) == 5
    C.prune_checkpoints(str(tmp_path), 2)
    assert sorted(os.listdir(tmp_path)) == ['ckpt_epoch_10.pth', 'ckpt_epoch_3.pth', 'preempt.pth']


# ----------------------------------------------------------------------------- pretrained
def _swin_config(img: int, window: int, classes: int, embed: int = 16):
    cfg = default_config()
    cfg.MODEL.TYPE = 'flatten_swin'
    cfg.MODEL.NAME = 'tiny'
    cfg.MODEL.NUM_CLASSES = classes
    cfg.MODEL.DROP_PATH_RATE = 0.0
    cfg.DATA.IMG_SIZE = img
    cfg.MODEL.SWIN.EMBED_DIM = embed
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [2, 2, 4]
    cfg.MODEL.SWIN.WINDOW_SIZE = window
    cfg.MODEL.LA.ATTN_TYPE = 'LLS'
    return cfg


def _ref_grid(t: torch.Tensor, n: int) -> torch.Tensor:
    """Independent reference: (1, s*s, C) tokens -> (1, n, C) via a square-grid bicubic interpolation."""
    s, c = int(round(t.shape[1] ** 0.5)), t.shape[2]
    r = int(round(n ** 0.5))
    img = t[0].T.reshape(c, s, s)[None]                                       # (1, C, s, s)
    return F.interpolate(img, size=(r, r), mode='bicubic', align_corners=False)[0].reshape(c, r * r).T[None]


def _ref_table(t: torch.Tensor, n: int) -> torch.Tensor:
    L, h = t.shape
    s, r = int(round(L ** 0.5)), int(round(n ** 0.5))
    img = torch.stack([t[:, i].reshape(s, s) for i in range(h)])[None]        # (1, heads, s, s)
    out = F.interpolate(img, size=(r, r), mode='bicubic', align_corners=False)[0]
    return torch.stack([out[i].reshape(-1) for i in range(h)], dim=1)


def test_load_pretrained_resizes_flatten_swin_64_to_96(tmp_path):
    torch.manual_seed(0)
    src = build_model(_swin_config(64, 8, 10))
    src_sd = src.state_dict()
    for k, v in src_sd.items():                          # non-trivial values everywhere
        if v.is_floating_point():
            v.copy_(torch.randn_like(v))
    path = str(tmp_path / 'pre.pth')
    C.save_checkpoint({'model': src_sd, 'epoch': 0}, path)

    dst = build_model(_swin_config(96, 12, 5))
    dst_before = {k: v.clone() for k, v in dst.state_dict().items()}
    # the layout really differs: window-64 pos-enc -> 144, bias table 7^2 -> 11^2, masks differ
    pe = 'layers.0.blocks.0.attn.positional_encoding'
    rpb = 'layers.2.blocks.1.attn.relative_position_bias_table'
    assert src_sd[pe].shape == (1, 64, 16) and dst_before[pe].shape == (1, 144, 16)
    assert src_sd[rpb].shape == (49, 4) and dst_before[rpb].shape == (121, 4)
    assert src_sd['layers.0.blocks.1.attn_mask'].shape != dst_before['layers.0.blocks.1.attn_mask'].shape

    load_finetune_weights(dst, path)
    out = dst.state_dict()
    n_pe = n_rpb = 0
    for k, v in out.items():
        if k.endswith('positional_encoding'):
            n_pe += 1
            torch.testing.assert_close(v, _ref_grid(src_sd[k], v.shape[1]), rtol=0, atol=1e-6)
        elif k.endswith('relative_position_bias_table'):
            n_rpb += 1
            torch.testing.assert_close(v, _ref_table(src_sd[k], v.shape[0]), rtol=0, atol=1e-6)
        elif k.endswith(('relative_position_index', 'attn_mask')) or k.startswith('head.'):
            assert torch.equal(v, dst_before[k]), k         # the model's own buffers / fresh head
        else:
            assert torch.equal(v, src_sd[k]), k
    assert n_pe == 4 and n_rpb == 2
    assert torch.isfinite(dst(torch.randn(1, 3, 96, 96))).all()


def test_pretrained_constant_grid_stays_constant():
    """Bicubic interpolation preserves constants: a sanity check of the Swin filter independent of
    F.interpolate (constant positional encodings and bias tables stay constant after 64 -> 96)."""
    from models.flatten_swin import checkpoint_filter_fn
    src = build_model(_swin_config(64, 8, 10)).state_dict()
    src = {k: (torch.full_like(v, 0.25) if k.endswith(('positional_encoding', 'relative_position_bias_table'))
               else v) for k, v in src.items()}
    dst = build_model(_swin_config(96, 12, 10))
    out = checkpoint_filter_fn({'model': src}, dst)
    for k, v in out.items():
        if k.endswith(('positional_encoding', 'relative_position_bias_table')):
            assert v.shape == dst.state_dict()[k].shape and v.shape != src[k].shape
            assert torch.allclose(v, torch.full_like(v, 0.25), atol=1e-6), k


def test_load_pretrained_maps_22k_head_and_rejects_wrong_model(tmp_path):
    torch.manual_seed(0)
    src = build_model(_swin_config(64, 8, 21841))
    path = str(tmp_path / 'in22k.pth')
    C.save_checkpoint({'model': src.state_dict()}, path)
    g = torch.Generator().manual_seed(1)
    idx = torch.randperm(21841, generator=g)[:1000]
    index_file = tmp_path / 'map22kto1k.txt'
    index_file.write_text('\n'.join(str(i) for i in idx.tolist()) + '\n')
    dst = build_model(_swin_config(64, 8, 1000))
    load_finetune_weights(dst, path, index_22k_to_1k=str(index_file))
    assert torch.equal(dst.head.weight, src.head.weight[idx]) and torch.equal(dst.head.bias, src.head.bias[idx])
    assert torch.equal(dst.layers[0].blocks[0].attn.qkv.weight, src.layers[0].blocks[0].attn.qkv.weight)

    wrong = build_model(_swin_config(64, 8, 1000, embed=32))
    with pytest.raises(C.CheckpointError, match=r'do not fit the model: .*shape mismatches: patch_embed'):
        load_finetune_weights(wrong, path)


def test_load_pretrained_resizes_flatten_pvt_pos_embeds(tmp_path):
    """PVT-v1 carries pos_embed{i} (1, N_i, C_i) and per-block positional_encoding: 64 px -> 96 px."""
    def pvt(img):
        cfg = default_config()
        cfg.MODEL.TYPE = 'flatten_pvt_tiny'
        cfg.MODEL.NUM_CLASSES = 10
        cfg.MODEL.DROP_PATH_RATE = 0.0
        cfg.DATA.IMG_SIZE = img
        return build_model(cfg)

    torch.manual_seed(0)
    src = pvt(64)
    src_sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in src.state_dict().items()}
    path = str(tmp_path / 'pvt.pth')
    C.save_checkpoint({'model': src_sd}, path)
    dst = pvt(96)
    load_finetune_weights(dst, path)
    out = dst.state_dict()
    grids = [k for k in out if k.startswith('pos_embed') or k.endswith('positional_encoding')]
    assert {k for k in grids if k.startswith('pos_embed')} == {f'pos_embed{i}' for i in range(1, 5)}
    for k in grids:
        assert src_sd[k].shape != out[k].shape, k
        torch.testing.assert_close(out[k], _ref_grid(src_sd[k], out[k].shape[1]), rtol=0, atol=1e-6)
    for k in out:
        if k not in grids:
            assert torch.equal(out[k], src_sd[k]), k


def test_ema_flag_picks_model_ema_for_pretrained_and_eval(tmp_path, caplog):
    """--ema: --pretrained and --eval --resume take the file's 'model_ema' entry (said in the log); without
    it, 'model'. A file without EMA weights falls back to 'model'."""
    import logging

    from config import get_config
    from main import build_parser

    cfg_file = tmp_path / 'c.yaml'
    cfg_file.write_text('MODEL:\n  TYPE: flatten_swin\n')
    args = build_parser().parse_args(['--cfg', str(cfg_file), '--ema'])
    assert get_config(args).MODEL.USE_EMA_WEIGHTS is True
    assert get_config(build_parser().parse_args(['--cfg', str(cfg_file)])).MODEL.USE_EMA_WEIGHTS is False

    torch.manual_seed(0)
    cfg = _swin_config(64, 8, 5)
    plain, averaged = build_model(cfg).state_dict(), build_model(cfg).state_dict()
    path = str(tmp_path / 'both.pth')
    torch.save({'model': plain, 'model_ema': averaged, 'epoch': 3}, path)
    key = 'layers.0.blocks.0.attn.qkv.weight'
    assert not torch.equal(plain[key], averaged[key])
    for prefer, want in ((True, averaged), (False, plain)):
        m = build_model(cfg)
        with caplog.at_level(logging.INFO):
            load_finetune_weights(m, path, prefer_ema=prefer)
        assert torch.equal(m.state_dict()[key], want[key])
        assert ('model_ema weights' if prefer else 'model weights') in caplog.text
        caplog.clear()
        m = build_model(cfg)
        load_weights(path, m, prefer_ema=prefer)
        assert torch.equal(m.state_dict()[key], want[key])
    only = str(tmp_path / 'plain.pth')
    torch.save({'model': plain}, only)
    m = build_model(cfg)
    load_weights(only, m, prefer_ema=True)
    assert torch.equal(m.state_dict()[key], plain[key])
