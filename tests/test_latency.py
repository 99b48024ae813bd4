"""tools/latency.py (the paper's Fig. 7 on this machine): the equal-accuracy interpolation against hand-computed
cases, the prediction check of each runtime option against eager on digits, and a tiny end-to-end run.
No timing is asserted."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from tools import latency
from tools.published_top1 import TABLE, Published

CURVE = [(80.0, 20.0), (75.0, 10.0), (82.0, 40.0)]          # (top-1, latency ms), deliberately unsorted


def test_interpolation_hand_computed():
    # 81 lies halfway between 80 (20 ms) and 82 (40 ms): 30 ms
    assert latency.softmax_latency_at(81.0, CURVE) == (pytest.approx(30.0), 'interpolated')
    # 77 is 2/5 of the way from 75 (10 ms) to 80 (20 ms): 14 ms
    assert latency.softmax_latency_at(77.0, CURVE) == (pytest.approx(14.0), 'interpolated')
    assert latency.softmax_latency_at(80.0, CURVE) == (20.0, 'exact')
    assert latency.softmax_latency_at(83.0, CURVE) == (40.0, 'bound')
    assert latency.softmax_latency_at(74.9, CURVE) == (None, 'below')


def test_equal_accuracy_speedup_per_family():
    table = [Published('F1', 'a', 'flatten', 81.0, 's', ''), Published('F2', 'a', 'flatten', 83.0, 's', ''),
             Published('F3', 'a', 'flatten', None, 's', '')] + [
        Published(f'S{i}', 'a', 'softmax', acc, 's', '') for i, (acc, _) in enumerate(CURVE)] + [
        Published('G1', 'b', 'flatten', 80.0, 's', ''), Published('T', 'b', 'softmax', 80.0, 's', '')]
    lat = {'F1': 15.0, 'F2': 16.0, 'F3': 1.0, 'S0': 20.0, 'S1': 10.0, 'S2': 40.0, 'G1': 4.0, 'T': 10.0}
    rows = {r['model']: r for r in latency.equal_accuracy_speedups(lat, table)}
    assert set(rows) == {'F1', 'F2', 'G1'}                  # no published top-1: not on the curve
    assert rows['F1']['speedup'] == pytest.approx(30.0 / 15.0) and rows['F1']['how'] == 'interpolated'
    assert rows['F2']['speedup'] == pytest.approx(40.0 / 16.0) and rows['F2']['how'] == 'bound'
    assert rows['G1']['speedup'] == pytest.approx(2.5) and rows['G1']['how'] == 'exact'   # family b's own curve


def test_official_code_speedup_needs_a_softmax_curve():
    """Only FLatten models timed (with the official code beside them): no speed-up on either side, no error."""
    table = [Published('F1', 'a', 'flatten', 81.0, 's', '')] + [
        Published(f'S{i}', 'a', 'softmax', acc, 's', '') for i, (acc, _) in enumerate(CURVE)]
    (alone,) = latency.speedups_of_rows([{'model': 'F1', 'kind': 'flatten', 'ms': 15.0, 'official_ms': 20.0}], table)
    assert alone['how'] == 'none' and alone['speedup'] is None and 'speedup_official_code' not in alone
    rows = [{'model': 'F1', 'kind': 'flatten', 'ms': 15.0, 'official_ms': 20.0}] + [
        {'model': f'S{i}', 'kind': 'softmax', 'ms': ms} for i, (_, ms) in enumerate(CURVE)]
    (both,) = latency.speedups_of_rows(rows, table)
    assert both['speedup_official_code'] == pytest.approx(30.0 / 20.0)     # 81.0 lies halfway on 20 .. 40 ms


def test_published_table_matches_the_papers():
    top1 = {p.name: p.top1 for p in TABLE}
    # equal-accuracy pairs of Fig. 7 (FLatten table of Fig. 6; PVT and Swin papers)
    assert top1['FLatten-PVT-S'] == top1['PVT-L'] == 81.7
    assert top1['FLatten-Swin-S'] == top1['Swin-B'] == 83.5
    assert [top1[f'PVT-{s}'] for s in 'TSML'] == [75.1, 79.8, 81.2, 81.7]
    assert [top1[f'Swin-{s}'] for s in 'TSB'] == [81.3, 83.0, 83.5]
    assert all(p.source for p in TABLE)


@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, 4), torch.nn.GELU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()
    return model, latency.digits_images(6, 32)


def test_digits_images_are_the_val_split(tiny):
    _, x = tiny
    assert x.shape == (6, 3, 32, 32)
    # white background normalised: (1 - mean) / std in the corner pixel of every image
    expect = (1 - torch.tensor(latency.MEAN)) / torch.tensor(latency.STD)
    torch.testing.assert_close(x[:, :, 0, 0], expect.expand(6, 3))


@pytest.mark.parametrize('runtime', ['compile', 'onnxruntime'])
def test_runtime_gives_eager_predictions(tiny, runtime):
    model, x = tiny
    if runtime == 'onnxruntime':
        pytest.importorskip('onnxruntime')
    # the compile check runs dynamo's capture with the eager backend here (inductor's codegen costs minutes of
    # CPU); the tool itself uses inductor
    run = latency.make_runner(model, runtime, x, compile_backend='eager')
    res = latency.check_predictions(model, run, x)
    assert res['top1_agree'] == 6 and res['max_abs_diff'] <= res['atol'] + 1e-3
    if runtime == 'onnxruntime':                            # dynamic batch: another batch size runs too
        assert run(x[:1]).shape == (1, 10)


def test_check_rejects_a_different_function(tiny):
    model, x = tiny
    with pytest.raises(ValueError, match='logits differ'):
        latency.check_predictions(model, lambda t: model(t) * 1.01, x)
    with torch.no_grad():
        wrong = lambda t: model(t).flip(-1) # noqa: E731  (same values, permuted classes)
        with pytest.raises(ValueError):
            latency.check_predictions(model, wrong, x)


def test_end_to_end_smoke(tmp_path, capsys):
    out, png = tmp_path / 'fig7.json', tmp_path / 'fig7.png'
    latency.main(['--smoke', '--floor', '--json', str(out), '--plot', str(png)])
    text = capsys.readouterr().out
    assert '| tiny-FLatten | 80.0 |' in text and 'interpolated' in text and 'attention core free' in text
    result = json.loads(out.read_text())
    assert result['environment']['runtime'] == 'eager' and 'loadavg_end' in result['environment']
    ms = {r['model']: r['ms'] for r in result['models']}
    (row,) = result['equal_accuracy']
    # the tiny FLatten model's 80.0 lies halfway between the two softmax models (79.0, 81.0)
    assert row['softmax_latency_at_top1'] == pytest.approx((ms['tiny-softmax-a'] + ms['tiny-softmax-b']) / 2)
    assert row['speedup'] == pytest.approx(row['softmax_latency_at_top1'] / ms['tiny-FLatten'])
    assert png.stat().st_size > 0
    (flat,) = [r for r in result['models'] if 'floor_ms' in r]          # --floor: the FLatten model only
    assert flat['model'] == 'tiny-FLatten' and flat['floor_ms'] > 0 and flat['unfocused_ms'] > 0


def test_attention_core_free_leaves_the_projections():
    """--floor's copy: a focused linear attention outputs proj(q) (recomputed here from its weights); the
    model itself is untouched, and torch.compile traces the copy apart from it."""
    from models.flatten_pvt import FocusedLinearSRAttention
    from models.flatten_swin import FocusedLinearWindowAttention
    torch.manual_seed(0)
    pvt, swin = FocusedLinearSRAttention(16, (4, 4), 2).eval(), FocusedLinearWindowAttention(16, 4, 2).eval()
    x = torch.randn(3, 16, 16, dtype=torch.float64)
    pvt, swin = pvt.double(), swin.double()
    linear = lambda m, t: t @ m.weight.T + m.bias          # noqa: E731
    with torch.no_grad():
        full = pvt(x), swin(x)
        free_pvt, free_swin = latency.without_attention_core(pvt), latency.without_attention_core(swin)
        torch.testing.assert_close(free_pvt(x), linear(pvt.proj, linear(pvt.q, x)))
        q = x @ swin.qkv.weight[:16].T + swin.qkv.bias[:16]
        torch.testing.assert_close(free_swin(x), linear(swin.proj, q))
        assert not torch.allclose(pvt(x), linear(pvt.proj, linear(pvt.q, x)))
        # the focusing function free: linear attention of relu(q), relu(k + pos) per head (2 heads of 8
        # channels), plus the DWC branch (one 3 x 3 depth-wise kernel shared by the heads, on each head's 4 x 4
        # image of v), all recomputed here in float64
        unfocused = latency.without_focusing(pvt)
        k, v = linear(pvt.kv, x).split(16, dim=-1)
        heads = lambda t: t.view(3, 16, 2, 8).transpose(1, 2)                  # noqa: E731  (B, h, N, d)
        qh, kh, vh = heads(linear(pvt.q, x).relu()), heads((k + pvt.positional_encoding).relu()), heads(v)
        a = qh @ kh.transpose(-2, -1)
        attn = a @ vh / (a.sum(-1, keepdim=True) + 16 * 1e-6)
        images = vh.reshape(6, 4, 4, 8).permute(0, 3, 1, 2)                    # (B * h, d, H, W)
        dwc = F.conv2d(images, pvt.dwc.weight, pvt.dwc.bias, padding=pvt.dwc.padding, groups=8)
        dwc = dwc.permute(0, 2, 3, 1).reshape(3, 2, 16, 8)
        expect = linear(pvt.proj, (attn + dwc).transpose(1, 2).reshape(3, 16, 16))
        torch.testing.assert_close(unfocused(x), expect)
        compiled, compiled_free = (torch.compile(m, backend='eager') for m in (pvt, free_pvt))
        torch.testing.assert_close((compiled(x), compiled_free(x)), (full[0], linear(pvt.proj, linear(pvt.q, x))))
        torch.testing.assert_close((pvt(x), swin(x)), full)


# ----------------------------------------------------------------------------- --compile / TRAIN.COMPILE
CFG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'cfgs', 'demo', 'flatten_swin_digits.yaml')
TINY = ['DATA.IMG_SIZE', '32', 'MODEL.SWIN.PATCH_SIZE', '4', 'MODEL.SWIN.EMBED_DIM', '16',
        'MODEL.SWIN.DEPTHS', '[1, 1, 1, 1]', 'MODEL.SWIN.NUM_HEADS', '[1, 1, 2, 2]', 'DATA.BATCH_SIZE', '33',
        'DATA.NUM_WORKERS', '0', 'MODEL_EMA.ENABLE', 'False']


@pytest.fixture
def quick_compile(monkeypatch):
    """torch.compile with dynamo's eager backend (the graph capture the option relies on, without minutes of
    inductor code generation on CPU); records each call."""
    calls = []
    real = torch.compile

    def compile_eager(model, **kwargs):
        calls.append(kwargs)
        return real(model, backend='eager', dynamic=kwargs.get('dynamic'))
    monkeypatch.setattr(torch, 'compile', compile_eager)
    return calls


def test_compile_flag_eval_gives_the_eager_accuracy(digits, tmp_path, quick_compile):
    from harness import run_main
    argv = ['--cfg', CFG, '--data-path', digits, '--device', 'cpu', '--eval']
    eager = run_main(argv + ['--output', str(tmp_path / 'e'), '--opts', *TINY]).ok().result
    assert not quick_compile
    compiled = run_main(argv + ['--compile', '--output', str(tmp_path / 'c'), '--opts', *TINY]).ok().result
    assert len(quick_compile) == 1
    assert compiled.eval.count == eager.eval.count == 99
    assert (compiled.eval.acc1, compiled.eval.acc5) == (eager.eval.acc1, eager.eval.acc5)
    assert compiled.eval.loss == pytest.approx(eager.eval.loss, rel=1e-5)


def test_compiled_for_inference_refuses_a_different_function(monkeypatch):
    import engine
    from config import load_config
    from errors import ConfigError
    config = load_config(CFG, ['TRAIN.COMPILE', 'True'])
    model = torch.nn.Linear(4, 10)
    monkeypatch.setattr(torch, 'compile', lambda m, **kw: (lambda x: m(x).flip(-1)))
    with pytest.raises(ConfigError, match='TRAIN.COMPILE'):
        engine.compiled_for_inference(config, model, torch.randn(8, 4), torch.device('cpu'))


def test_attention_sweep_smoke(capsys):
    res = latency.main(['--attention-sweep', '--sizes', '28', '56', '--rounds', '1', '--warmup', '0',
                        '--repeats', '1', '--global-max-tokens', '49'])
    small, big = res['rows']
    assert (small['tokens'], big['tokens']) == (49, 196)
    assert 'global softmax' in small and 'global softmax' not in big      # skipped above --global-max-tokens
    assert all(r['focused linear'] > 0 and r['window softmax'] > 0 for r in res['rows'])
    assert '| 56 | 196 |' in capsys.readouterr().out
    # each form is an attention over the stage-1 map: (B, H*W, C) in and out
    for name, (m, call) in latency.attention_modules(56).items():
        assert call(m, torch.randn(2, 196, 96)).shape == (2, 196, 96), name
