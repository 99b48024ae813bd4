"""tools/benchmark.py in CI-sized smoke runs (no timing is asserted), and its --reference protocol against a
stand-in 'official checkout' written here (a tiny model under the official layout: config.py, models/, cfgs/)."""
import json
import os
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from errors import ConfigError
from tools import benchmark
from tools.bench import configs, official, timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_measures_both_modes_and_writes_json(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    benchmark.main(['--smoke', '--json', str(out)])
    table = capsys.readouterr().out
    assert '| flatten_swin_digits.yaml | infer | 64 | 2 |' in table
    assert '| flatten_swin_digits.yaml | train | 64 | 2 |' in table
    result = json.loads(out.read_text())
    env = result['environment']
    for key in ('device_name', 'torch', 'date', 'git_commit', 'threads', 'loadavg_start', 'attention_impl'):
        assert key in env
    assert env['torch'] == torch.__version__ and env['attention_impl'] == 'fast'
    rows = {r['mode']: r for r in result['models']}
    assert set(rows) == {'infer', 'train'}
    for r in rows.values():
        assert r['ours']['img_s'] > 0 and r['ours']['peak_mb'] > 0
        assert r['gflops_per_img'] > 0 and r['ours']['tflops'] > 0
        assert r['ours']['peak_fraction'] is None                       # no known peak for a CPU
    # a training step is forward + backward + update: FLOPs per image counted 3x the forward
    assert rows['train']['ours']['tflops'] / rows['train']['ours']['img_s'] == pytest.approx(
        3 * rows['infer']['ours']['tflops'] / rows['infer']['ours']['img_s'])


def test_smoke_resolution_sweep(capsys):
    result = benchmark.main(['--smoke', '--sweep-resolution', '--no-flops'])
    rows = result['sweep']
    assert [r['img_size'] for r in rows] == [64, 128]
    assert rows[1]['token_growth'] == pytest.approx(4.0)
    assert all(r['ms_per_img'] > 0 and r['peak_mb'] > 0 for r in rows)


def test_timm_spec_passes_keyword_arguments():
    """timm:NAME,key=value builds the timm model with those arguments: PVTv2-b0 without key reduction is
    global attention (no spatial-reduction conv anywhere), the counterpart the sweep needs."""
    assert configs.parse_timm_spec('pvt_v2_b0,sr_ratios=(1, 1, 1, 1),drop_rate=0.1') == \
        ('pvt_v2_b0', {'sr_ratios': (1, 1, 1, 1), 'drop_rate': 0.1})
    reduced = configs.build(configs.load_cfg('timm:pvt_v2_b0', 64))
    glob = configs.build(configs.load_cfg('timm:pvt_v2_b0,sr_ratios=(1,1,1,1)', 64))
    assert sum(name.endswith('attn.sr') for name, _ in reduced.named_modules()) == 6      # stages 1-3, 2 blocks
    assert not any(name.endswith('attn.sr') for name, _ in glob.named_modules())
    with pytest.raises(ConfigError, match="'sr_ratios' is not key=<python literal>"):
        configs.parse_timm_spec('pvt_v2_b0,sr_ratios')


def test_bad_reference_dir_is_one_line_error(tmp_path, capsys):
    assert benchmark.run(['--reference', str(tmp_path / 'missing')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('ERROR: ')
    assert 'not a directory; pass the official checkout (e.g. LeapLabTHU/FLatten-Transformer)' in err


TINY = '''
import torch.nn as nn

def tiny(num_classes):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))
'''


def _fake_checkout(root, width=4, header=''):
    """The official repository's layout, holding a tiny model: config.py (yacs _C), models.build_model, cfgs/."""
    (root / 'models').mkdir(parents=True)
    (root / 'cfgs').mkdir()
    (root / 'config.py').write_text(textwrap.dedent('''
        from yacs.config import CfgNode as CN
        _C = CN()
        _C.DATA = CN(); _C.DATA.IMG_SIZE = 224
        _C.MODEL = CN(); _C.MODEL.NUM_CLASSES = 1000; _C.MODEL.TYPE = 'tiny'
    '''))
    (root / 'models' / '__init__.py').write_text(header + TINY.replace('(3, 4, 3', f'(3, {width}, 3').replace(
        'Linear(4', f'Linear({width}') + textwrap.dedent('''
        def build_model(config):
            print('official code prints while building')          # must not break the protocol
            return tiny(config.MODEL.NUM_CLASSES)
    '''))
    (root / 'cfgs' / 'tiny.yaml').write_text('MODEL:\n  TYPE: tiny\n')
    return root


def _ours():
    ns = {}
    exec(TINY, ns)
    torch.manual_seed(0)
    return ns['tiny'](10)


OPTS = {'device': 'cpu', 'batch': 2, 'img_size': 16, 'dtype': 'float32', 'channels_last': False, 'compile': False,
        'warmup': 0, 'repeats': 1, 'num_classes': 10, 'fused_optimizer': False}


def test_reference_subprocess_alternates_rounds_with_same_weights(tmp_path):
    ref = _fake_checkout(tmp_path / 'official')
    proc = official.OfficialProcess(str(ref), str(tmp_path / 'x' / 'tiny.yaml'), _ours(), OPTS)
    try:
        for _ in range(2):                                            # two rounds on the official side
            res = proc.measure(['infer', 'train'])
            assert res['infer']['img_s'] > 0 and res['train']['img_s'] > 0 and res['train']['peak_mb'] > 0
    finally:
        proc.close()
    assert proc.proc.returncode == 0


def test_reference_worker_keeps_carried_packages_on_its_path(tmp_path, monkeypatch):
    """The worker drops this repository from PYTHONPATH (the official config.py and models/ must win) but keeps
    the rest: on the GPU machine, carried wheels (yacs for the official config) live in a --target site."""
    site = tmp_path / 'site'
    site.mkdir()
    (site / 'carried_wheel.py').write_text('MARK = 1\n')
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(site), ROOT]))
    dropped = f"import os\nassert {ROOT!r} not in os.environ['PYTHONPATH'].split(os.pathsep)\n"
    ref = _fake_checkout(tmp_path / 'official', header='import carried_wheel\n' + dropped)
    proc = official.OfficialProcess(str(ref), str(tmp_path / 'x' / 'tiny.yaml'), _ours(), OPTS)
    try:
        assert proc.measure(['infer'])['infer']['img_s'] > 0
    finally:
        proc.close()


def test_reference_without_that_config_fails_clearly(tmp_path):
    ref = _fake_checkout(tmp_path / 'official')
    with pytest.raises(ConfigError, match='no cfgs/other.yaml there'):
        official.OfficialProcess(str(ref), 'other.yaml', _ours(), OPTS)


def test_measure_train_updates_parameters():
    model = _ours()
    before = [p.detach().clone() for p in model.parameters()]
    res = timing.measure(model, dict(OPTS, repeats=2), ['train'])
    assert res['train']['img_s'] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert isinstance(model, nn.Module)


def _placeholder_result(modes):
    """What measure() returns, with placeholder numbers: for tests about what is measured, not the timings."""
    return {m: {'img_s': 1.0, 'cpu_s_per_img': 1.0, 'peak_mb': 1.0} for m in modes}


@pytest.mark.parametrize('same', [False, True])
def test_each_side_trains_with_its_own_adamw(tmp_path, monkeypatch, capsys, same):
    """Ours steps with the fused AdamW our optimizer.py builds on CPU; the official side with torch's default
    AdamW, as its own optimizer.py does, unless --same-optimizer gives it ours."""
    built, official_opts = [], []
    real_adamw = torch.optim.AdamW

    def spy_adamw(params, **kw):
        built.append(kw.get('fused', False))
        return real_adamw(params, **kw)

    class FakeOfficial:
        def __init__(self, ref_dir, cfg_path, model, opts):
            official_opts.append(opts)

        def measure(self, modes):
            return _placeholder_result(modes)

        def close(self):
            pass

    monkeypatch.setattr(torch.optim, 'AdamW', spy_adamw)
    monkeypatch.setattr(official, 'OfficialProcess', FakeOfficial)
    result = benchmark.main(['--smoke', '--modes', 'train', '--no-flops', '--reference', str(tmp_path)]
                            + (['--same-optimizer'] if same else []))
    assert built and all(built)                                   # every step of ours: fused
    assert [o['fused_optimizer'] for o in official_opts] == [same]
    row = result['models'][0]
    assert (row['ours']['adamw'], row['official']['adamw']) == ('fused', 'fused' if same else 'torch default')
    assert f"ours fused, official {'fused' if same else 'torch default'}" in capsys.readouterr().out


def test_data_mode_times_the_input_pipeline(tmp_path):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for cls in ('a', 'b'):
        folder = tmp_path / 'train' / cls
        folder.mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f'{i}.png')
    cfg = os.path.join(ROOT, 'cfgs', 'demo', 'flatten_swin_digits.yaml')
    result = benchmark.main(['--data', str(tmp_path), '--cfgs', cfg,
                             '--opts', 'MODEL.NUM_CLASSES', '2', '--workers', '0', '--batch', '2',
                             '--data-batches', '3', '--warmup', '1'])
    row, = result['data']
    assert row['workers'] == 0 and row['images'] == 6 and row['img_s'] > 0 and row['img_size'] == 64


def test_op_mode_times_the_implementations_a_module_declares(capsys):
    result = benchmark.main(['--op', 'neighborhood_attention', '--batch', '1', '--warmup', '0', '--repeats', '1',
                             '--device', 'cpu'])['op']
    rows = result['rows']
    assert [(r['map'], r['heads']) for r in rows] == [(56, 2), (28, 4), (14, 8)]
    assert result['impls'][:2] == ['fast', 'naive']
    for r in rows:
        for key in ('fast_fwd_s', 'naive_fwd_s', 'fast_fwd_bwd_s', 'naive_fwd_bwd_s'):
            assert r[key] > 0
    capsys.readouterr()
    assert benchmark.run(['--op', 'list']) == 0 and 'neighborhood_attention: ' in capsys.readouterr().out
    assert benchmark.run(['--op', 'nope']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'no such op benchmark; use one of' in err


def test_an_op_benchmark_declared_in_one_module_is_run_by_the_tool(capsys):
    """A new kernel's benchmark needs no edit of the tool: register it and --op finds it."""
    from models.impl_choice import OP_BENCHMARKS, OpBenchmark, register_op_benchmark
    calls = []

    def double(x):
        calls.append(x.shape)
        return x * 2
    register_op_benchmark('test_double', OpBenchmark(
        'x * 2', lambda batch, device: [({'n': 3}, (torch.ones(batch, 3, device=device),))],
        lambda: ({'mul': double}, ['one note'])))
    try:
        result = benchmark.main(['--op', 'test_double', '--batch', '2', '--warmup', '0', '--repeats', '1'])['op']
    finally:
        OP_BENCHMARKS.pop('test_double')
    assert result['impls'] == ['mul'] and result['rows'][0]['n'] == 3 and result['rows'][0]['mul_fwd_bwd_s'] > 0
    assert calls and all(s == (2, 3) for s in calls)
    assert '(one note)' in capsys.readouterr().out


def test_gpu_benchmark_script_arguments_check_without_a_gpu(tmp_path, monkeypatch, capsys):
    """tools/gpu_benchmarks.sh is run once, on a GPU, by a session with minutes to spare: its every step's
    arguments are checked here (configs load, timm names exist, the official checkout holds each config).
    The script runs for real; its ``python tools/benchmark.py ARGS`` calls go through a ``python`` on PATH
    that records ARGS (the pytest step runs for real), and each recorded command is then run here as
    ``benchmark.main(ARGS)`` with the script's working directory: the same check, without five more
    interpreter start-ups."""
    import subprocess
    from models.focused_attention import attention_impl, get_attention_impl
    official = tmp_path / 'official'
    (official / 'cfgs').mkdir(parents=True)
    for name in ('flatten_swin_t', 'flatten_pvt_v2_b0', 'flatten_cswin_t', 'flatten_swin_s', 'flatten_swin_b',
                 'flatten_pvt_t', 'flatten_pvt_s', 'flatten_pvt_m', 'flatten_pvt_b'):
        (official / 'cfgs' / f'{name}.yaml').write_text('')
    shim, calls = tmp_path / 'shim', tmp_path / 'benchmark_calls.jsonl'
    shim.mkdir()
    (shim / 'python').write_text(textwrap.dedent(f'''\
        #!{sys.executable}
        import json, os, sys
        if len(sys.argv) > 1 and os.path.basename(sys.argv[1]) in ('benchmark.py', 'latency.py'):
            with open({str(calls)!r}, 'a') as f:
                f.write(json.dumps([os.path.basename(sys.argv[1])] + sys.argv[2:]) + '\\n')
            sys.exit(0)
        os.execv({sys.executable!r}, [{sys.executable!r}] + sys.argv[1:])
    '''))
    (shim / 'python').chmod(0o755)
    proc = subprocess.run(['bash', os.path.join(ROOT, 'tools', 'gpu_benchmarks.sh'), str(tmp_path / 'out'),
                           str(official)], env=dict(os.environ, GPU_BENCH_DRY_RUN='args',
                                                    PATH=f"{shim}{os.pathsep}{os.environ['PATH']}"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [line.split(':')[0][4:] for line in proc.stdout.splitlines() if line.startswith('=== ')]
    assert steps[:-1] == ['cuda_tests', 'fig7_batch1', 'fig7_batch64', 'vs_official', 'vs_timm', 'triton', 'sweep',
                          'op_neighborhood']
    assert 'tests collected' in (tmp_path / 'out' / 'log.txt').read_text()
    argvs = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(argvs) == 7 and all('--check' in a for a in argvs)
    from tools import latency
    tools = {'benchmark.py': benchmark.main, 'latency.py': latency.main}
    monkeypatch.chdir(ROOT)                                           # the script runs from the repository root
    capsys.readouterr()
    for script, *argv in argvs:
        with attention_impl(get_attention_impl()):                    # --attention-impl sets it process-wide
            assert tools[script](argv)['checked'] >= 1, argv
    assert capsys.readouterr().out.count('nothing measured (--check)') == 7
    assert len(list((tmp_path / 'out').iterdir())) <= 8              # what the device tool brings back


def test_check_names_what_is_wrong(tmp_path, capsys):
    (tmp_path / 'cfgs').mkdir()
    with pytest.raises(ConfigError, match='no cfgs/flatten_swin_t.yaml there'):
        benchmark.main(['--check', '--cfgs', os.path.join(ROOT, 'cfgs', 'flatten_swin_t.yaml'),
                        '--reference', str(tmp_path)])
    with pytest.raises(ConfigError, match='timm:swin_tinyy: timm has no such model'):
        benchmark.main(['--check', '--cfgs', 'timm:swin_tinyy'])
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        benchmark.main(['--check', '--cfgs', str(tmp_path / 'nope.yaml')])
    assert benchmark.main(['--check', '--cfgs', os.path.join(ROOT, 'cfgs', 'dat_tiny.yaml'),
                           'timm:swin_tiny_patch4_window7_224'])['checked'] == 2


@pytest.mark.parametrize('alternate', [False, True])
def test_alternate_takes_turns_between_models(monkeypatch, alternate):
    """--alternate measures every model once per round, in turn (A B A B), each rebuilt with the same weights;
    without it (and without --reference) each model is measured once."""
    order, first_weights = [], {}

    def fake_measure(model, opts, modes):
        name = type(model).__name__
        order.append(name)
        w = next(model.parameters()).detach().clone()
        assert torch.equal(first_weights.setdefault(name, w), w)      # rebuilt from the same seed
        return _placeholder_result(modes)

    monkeypatch.setattr(timing, 'measure', fake_measure)
    result = benchmark.main(['--smoke', '--no-flops', '--modes', 'infer', '--rounds', '2', '--cfgs',
                             'timm:resnet18', 'timm:mobilenetv3_small_050', '--img-size', '64']
                            + (['--alternate'] if alternate else []))
    a, b = 'ResNet', 'MobileNetV3'
    assert order == ([a, b, a, b] if alternate else [a, b])
    assert [len(r['ours']['img_s_rounds']) for r in result['models']] == [2 if alternate else 1] * 2


# ----------------------------------------------------------------------------- the command line (issue #32)
BENCH = os.path.join(ROOT, 'tools', 'benchmark.py')


def test_timm_class_count_sets_the_training_targets(startup_server):
    """``timm:NAME,num_classes=10``: the training step's random targets come from the model's 10 classes (they
    came from 1000: a traceback in the cross-entropy). Run as a file, as the README writes it."""
    result = startup_server.run([BENCH, '--smoke', '--no-flops', '--modes', 'train', '--img-size', '32',
                                 '--cfgs', 'timm:resnet18,num_classes=10'], cwd=ROOT)
    assert result.code == 0, result.err[-2000:]
    assert '| timm:resnet18,num_classes=10 | train | 32 | 2 |' in result.out


@pytest.mark.parametrize('check', [True, False])
def test_unknown_timm_keyword_is_one_line(startup_server, check):
    """An unknown keyword in ``timm:NAME,key=value``: one line naming the entry and the keyword, exit 2, both
    when measuring and under ``--check`` (which called it fine). Run as a package module."""
    result = startup_server.run(['-m', 'tools.benchmark', '--no-flops', '--smoke', '--img-size', '32',
                                 '--cfgs', 'timm:resnet18,no_such_kwarg=1'] + (['--check'] if check else []),
                                cwd=ROOT)
    assert result.code == 2, result.err[-2000:]
    err = result.err.strip()
    assert '\n' not in err and err.startswith('ERROR: --cfgs timm:resnet18,no_such_kwarg=1: '), err
    assert "unexpected keyword argument 'no_such_kwarg'" in err


def test_dense_backbone_timm_refuses_is_one_line(capsys):
    """--dense on a model timm cannot build with features_only + dynamic_img_size: one line, exit 2."""
    assert benchmark.run(['--dense', '--dense-models', 'resnet18', '--dense-sizes', '32x32', '--batch', '1',
                          '--rounds', '1', '--warmup', '0', '--repeats', '1']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('ERROR: --dense-models resnet18: timm cannot build it'), err
    assert benchmark.run(['--dense', '--dense-models', 'resnet18', '--dense-sizes', '32by32']) == 2
    assert 'ERROR: --dense-sizes 32by32: give HxW, e.g. 512x1024' in capsys.readouterr().err
