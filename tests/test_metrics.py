"""metrics.jsonl (logger.MetricsWriter), TensorBoard being optional, and tools/plot_runs.py. The engine's
records themselves (2-epoch run, auto-resume, preemption, 2-rank torchrun) are checked in test_engine.py
on its runs."""
from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from logger import METRICS_FILE, MetricsWriter, read_metrics

from tools import plot_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _epoch(e: int, **kw) -> dict:
    rec = {'kind': 'epoch', 'epoch': e, 'step': 10 * e, 'train_loss': 2.0 / e, 'val_acc1': 10.0 * e,
           'lr': 1e-3 / e}
    rec.update(kw)
    return rec


def test_records_are_whole_lines_and_nan_is_null(tmp_path):
    w = MetricsWriter(str(tmp_path))
    w.write(_epoch(1, grad_norm=float('nan')))
    w.write({'kind': 'eval', 'val_acc1': 50.0})
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(x)['kind'] for x in lines] == ['epoch', 'eval']
    assert json.loads(lines[0])['grad_norm'] is None                 # NaN is not JSON


def test_truncate_after_resume_point_and_torn_line(tmp_path):
    """A run that wrote epochs 1-3 and then died while writing epoch 4 (torn line), resumed from the
    epoch-2 checkpoint: epochs 3 and the torn record go, eval records stay; appending continues."""
    w = MetricsWriter(str(tmp_path))
    for e in (1, 2, 3):
        w.write(_epoch(e))
    w.write({'kind': 'eval', 'val_acc1': 1.0})
    with open(tmp_path / METRICS_FILE, 'a') as f:
        f.write('{"kind": "epoch", "epoch": 4, "val_ac')
    assert [r.get('epoch') for r in read_metrics(str(tmp_path))] == [1, 2, 3, None]
    w.truncate_after(2)
    w.write(_epoch(3, val_acc1=99.0))
    recs = read_metrics(str(tmp_path))
    assert [(r['kind'], r.get('epoch')) for r in recs] == [('epoch', 1), ('epoch', 2), ('eval', None), ('epoch', 3)]
    assert recs[-1]['val_acc1'] == 99.0
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 4
    before = (tmp_path / METRICS_FILE).stat().st_mtime_ns
    w.truncate_after(3)                                                # nothing to drop: file untouched
    assert (tmp_path / METRICS_FILE).stat().st_mtime_ns == before


def test_tensorboard_is_optional(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        from errors import ConfigError
        with pytest.raises(ConfigError, match='pip install tensorboard'):
            MetricsWriter(str(tmp_path), tensorboard=True)
        MetricsWriter(str(tmp_path)).write(_epoch(1))                 # without the flag nothing is needed
        return
    w = MetricsWriter(str(tmp_path), tensorboard=True)
    w.write(_epoch(1))
    w.close()
    assert any(n.startswith('events.out.tfevents') for n in os.listdir(tmp_path / 'tensorboard'))


def _run(folder, name: str, tag: str, records) -> str:
    os.makedirs(folder)
    with open(os.path.join(folder, 'config.yaml'), 'w') as f:
        f.write(f'MODEL:\n  NAME: {name}\n  TYPE: flatten_swin\nTAG: {tag}\n')
    w = MetricsWriter(str(folder))
    for r in records:
        w.write(r)
    return str(folder)


def test_plot_runs_draws_one_line_per_run_per_panel(tmp_path):
    a = _run(tmp_path / 'a', 'flatten_swin_digits', 'L', [_epoch(e) for e in (1, 2, 3)])
    # run b: epoch 2 was written twice (resumed after a crash) and has EMA figures and an eval record
    b = _run(tmp_path / 'b', 'flatten_swin_digits', 'S', [_epoch(1, ema_acc1=5.0), _epoch(2, val_acc1=1.0),
                                                          _epoch(2, val_acc1=40.0, ema_acc1=7.0),
                                                          {'kind': 'eval', 'val_acc1': 3.0}])
    out = str(tmp_path / 'fig' / 'curves.png')
    fig = plot_runs.plot_runs([a, b], out)
    loss_ax, acc_ax, lr_ax = fig.axes
    for ax in fig.axes:
        assert len(ax.get_lines()) == 2
    assert [list(l.get_xdata()) for l in acc_ax.get_lines()] == [[1, 2, 3], [1, 2]]
    assert list(acc_ax.get_lines()[1].get_ydata()) == [10.0, 40.0]            # the last record of epoch 2
    assert list(loss_ax.get_lines()[0].get_ydata()) == pytest.approx([2.0, 1.0, 2.0 / 3])
    assert list(lr_ax.get_lines()[0].get_ydata()) == pytest.approx([1e-3, 5e-4, 1e-3 / 3])
    assert [t.get_text() for t in acc_ax.get_legend().get_texts()] == ['flatten_swin_digits/L',
                                                                       'flatten_swin_digits/S']
    with Image.open(out) as img:
        assert img.format == 'PNG' and img.size[0] > img.size[1] > 100
    fig = plot_runs.plot_runs([a, b], out, labels=['linear', 'softmax'], ema=True)
    assert len(fig.axes[1].get_lines()) == 3                                     # + run b's EMA (dashed)
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ['linear', 'softmax', 'softmax (EMA)']


def test_plot_runs_cli(tmp_path, startup_server):
    """The script itself, as a file and as a package module (fresh starts past torch and timm)."""
    a = _run(tmp_path / 'a', 'm', 'one', [_epoch(1), _epoch(2)])
    proc = startup_server.run([os.path.join(ROOT, 'tools', 'plot_runs.py'), a, '-o', str(tmp_path / 'c.png')])
    assert proc.code == 0, proc.err
    assert os.path.getsize(tmp_path / 'c.png') > 1000
    # a folder without metrics: one line on stderr, exit 2, through the script's own entry
    proc = startup_server.run(['-m', 'tools.plot_runs', str(tmp_path / 'nope')])
    assert proc.code == 2 and proc.out == ''
    assert proc.err.strip().splitlines() == [f"ERROR: no metrics.jsonl in {tmp_path / 'nope'}: give the "
                                             'output folder of a training run']


@pytest.mark.parametrize('case', ['labels', 'empty', 'unreadable', 'binary', 'output_dir', 'extension'])
def test_plot_runs_errors_are_one_line_exit_2(tmp_path, case, capsys):
    """Every problem a user can cause is ``ERROR: <one line>`` and exit 2 (``errors.cli`` around ``main``,
    as the script runs), never a traceback or exit 1; a broken config.yaml only costs the label."""
    import errors
    a = _run(tmp_path / 'a', 'm', 'one', [_epoch(1)])
    (tmp_path / 'a' / 'config.yaml').write_text('MODEL: [unclosed\n')      # label falls back to the folder
    assert plot_runs.run_label(a) == f'{tmp_path.name}/a'
    argv, words = [a, '-o', str(tmp_path / 'c.png')], ()
    if case == 'labels':
        argv += ['--labels', 'x', 'y']
        words = ('2 --labels for 1 runs',)
    elif case == 'empty':
        (tmp_path / 'e').mkdir()
        (tmp_path / 'e' / METRICS_FILE).write_text(json.dumps({'kind': 'eval', 'val_acc1': 1.0}) + '\n')
        argv[0], words = str(tmp_path / 'e'), ('has no epoch records yet',)
    elif case == 'unreadable':
        (tmp_path / 'u').mkdir()
        (tmp_path / 'u' / METRICS_FILE).mkdir()                             # a folder where the file should be
        argv[0], words = str(tmp_path / 'u'), ('cannot read its metrics.jsonl',)
    elif case == 'binary':
        (tmp_path / 'b').mkdir()
        (tmp_path / 'b' / METRICS_FILE).write_bytes(b'\xff\xfe\x00garbage\n')
        argv[0], words = str(tmp_path / 'b'), ('cannot read its metrics.jsonl',)
    elif case == 'output_dir':
        (tmp_path / 'file').write_text('x')
        argv[2], words = str(tmp_path / 'file' / 'c.png'), ('cannot write the figure', 'writable .png')
    else:
        argv[2], words = str(tmp_path / 'c.notanimage'), ('cannot write the figure',)
    code = errors.cli(lambda: plot_runs.main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith('ERROR: '), err
    assert all(w in err[0] for w in words), err
