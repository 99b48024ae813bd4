"""Export: torch.export and the ONNX exporters (dynamo and the TorchScript-based one), checked by running
the result (the reloaded program, ONNX Runtime on CPU, the traced module) against the eager model.

Each family's tiny variant, shrunk through its own keyword arguments (fewer blocks, narrower, 64 px) so
that the whole file takes tens of seconds: the block types and code paths are the tiny variant's. Native
sizes of the unshrunk tiny variants: ``python tools/export.py <name> --check`` (README).
"""
import os
import warnings

import numpy as np
import pytest
import timm
import torch

import models  # noqa: F401  (registration)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ort = pytest.importorskip('onnxruntime')    # a requirement (requirements.txt); absent only in partial installs

# tiny variant -> shrinking kwargs; the second entry: the non-native input size its ONNX export is checked at
# (built with dynamic_img_size=True), or None: ONNX at the native size (Visformer v1 / v2).
CASES = {
    'flatten_swin_t': (dict(img_size=64, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                            window_size=4), 80),
    'flatten_pvt_t': (dict(img_size=64, embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8),
                           depths=(1, 1, 1, 1)), 96),
    'flatten_pvt_v2_b0': (dict(img_size=64, embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8),
                               depths=(1, 1, 1, 1)), 96),
    'flatten_cswin_t': (dict(img_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                             la_split=(16, 8, 4, 2), softmax_split=(1, 2, 2, 2)), 96),
    'dat_tiny': (dict(img_size=64, dim_stem=16, dims=(16, 32, 64, 128), depths=(1, 1, 2, 1),
                      heads=(1, 2, 4, 8), groups=(1, 1, 2, 4), window_sizes=(4, 4, 4, 2),
                      stage_spec=(('N',), ('D',), ('N', 'D'), ('D',)), nat_ksizes=(5, 5, 3, 3),
                      ksizes=(9, 7, 5, 3), expansion=2), 96),
    'L2ViT_Tiny': (dict(img_size=64, dims=(16, 32, 64, 128), depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                        window_size=4), 96),
    'flatten_deit_t': (dict(img_size=64, embed_dim=32, depth=2, num_heads=2), 96),
    'official_visformer_tiny': (dict(img_size=64, init_channels=16, embed_dim=64, depths=(1, 1, 1),
                                     num_heads=2), None),
    'swin_visformer_tiny_v2': (dict(img_size=64, init_channels=16, embed_dim=64, depths=(1, 1, 2, 2),
                                    num_heads=(1, 1, 2, 4)), None),
}


# in the normal suite (seconds each on 2 idle cores); the other families are marked slow (still run in CI):
# the ONNX exporter itself takes most of the time
NORMAL = ('flatten_pvt_v2_b0', 'official_visformer_tiny')


def _marked(names):
    return [n if n in NORMAL else pytest.param(n, marks=pytest.mark.slow) for n in names]


def tiny(name: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **CASES[name][0], **extra).eval()


def image(size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def onnx_logits(model, x: torch.Tensor, path: str, dynamo: bool = True) -> np.ndarray:
    """``model``: a module, or (dynamo exporter) the ExportedProgram already made of it."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings('ignore')
        torch.onnx.export(model, (x,), path, dynamo=dynamo, verbose=False)
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize('name', _marked(CASES))
def test_torch_export_and_onnx_runtime_reproduce_eager(name, tmp_path):
    """torch.export at the native size; the ONNX (dynamo) exporter + ONNX Runtime at a second, non-native
    size for the families built with ``dynamic_img_size=True`` (the native path plus padding and position
    resampling: one ONNX export covers both), else at the native size."""
    second = CASES[name][1]
    model = tiny(name, **({'dynamic_img_size': True} if second else {}))
    x = image(64)
    with torch.no_grad():
        ref = model(x)
        program = torch.export.export(model, (x,))
        assert rel_err(program.module()(x), ref) < 1e-5
        if second:
            x = image(second, seed=2)
            ref = model(x)
    onnx = onnx_logits(model if second else program, x, str(tmp_path / 'm.onnx'))   # a program: no re-export
    assert onnx.shape == tuple(ref.shape) and rel_err(onnx, ref) < 1e-4


@pytest.mark.parametrize('name', _marked(['flatten_pvt_v2_b0', 'flatten_swin_t', 'dat_tiny']))
def test_legacy_onnx_exporter_and_jit_trace_are_correct(name, tmp_path):
    """The TorchScript-based exporter and torch.jit.trace record the plain operators of the fast paths
    (autograd Functions would be opaque to them): the traced module and the ONNX file both reproduce eager,
    the traced one on another input than it was traced with."""
    model = tiny(name)
    x, y = image(64), image(64, seed=3)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings('ignore')
        traced = torch.jit.trace(model, (x,))
        ref = model(y)
        assert rel_err(traced(y), ref) < 1e-5
    assert rel_err(onnx_logits(model, x, str(tmp_path / 'm.onnx'), dynamo=False), model(x).detach()) < 1e-4


def test_fast_paths_are_not_in_traced_graphs():
    """No opaque autograd Function (prim::PythonOp) in a jit-traced FLatten or DAT++ model."""
    for name in ('flatten_pvt_v2_b0', 'dat_tiny'):
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore')
            graph = torch.jit.trace(tiny(name), (image(64),)).inlined_graph
        assert 'prim::PythonOp' not in str(graph), name


# ----------------------------------------------------------------------------- tools/export.py
def _load_tool():
    import importlib.util
    spec = importlib.util.spec_from_file_location('export_tool', os.path.join(ROOT, 'tools', 'export.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def test_export_tool_writes_and_checks(tmp_path):
    model = tiny('official_visformer_tiny')
    x = image(64)
    for fmt in ('onnx', 'pt2'):
        path = str(tmp_path / f'm.{fmt}')
        tool.export(model, x, fmt, path)
        with torch.no_grad():
            assert tool.relative_error(tool.run_exported(path, fmt, x), model(x)) < 1e-4


class _Cancelling(torch.nn.Module):
    """Badly conditioned on purpose: each logit is (1e5 + a) - 1e5 for a of order 1, and float32 resolves
    1e5 + a only to 1/128."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.stack([x.mean(dim=(1, 2, 3)), x.std(dim=(1, 2, 3))], dim=-1)
        return (a + 1e5) - 1e5


def test_export_check_verdicts():
    """--check passes within the tolerance of eager; above it only when the file is as close to the float64
    result as eager float32 itself is (here: an 'export' computed in float64, more exact than eager); an
    output off by 1% of the largest logit fails."""
    x = image(64)
    model = tiny('official_visformer_tiny')
    with torch.no_grad():
        ref = model(x)
    ok, report = tool.check_exported(model, x, ref.clone(), 1e-4)
    assert ok and 'vs eager: max relative error 0.00e+00' in report
    ok, report = tool.check_exported(model, x, ref + 0.01 * ref.abs().max(), 1e-4)
    assert not ok and report.endswith('FAILED')
    bad = _Cancelling()
    exact = bad.double()(x.double()).float()                      # what a more exact runtime would give
    with torch.no_grad():
        assert tool.relative_error(bad(x), exact) > 1e-4          # eager float32 cannot reproduce it
    ok, report = tool.check_exported(bad, x, exact, 1e-4)
    assert ok and 'as close to float64 as eager float32 is' in report


@pytest.mark.parametrize('args,message', [
    (['no_such_model'], "unknown model 'no_such_model'"),
    ([], 'give a model name or --cfg'),
    (['flatten_swin_t', '--cfg', 'cfgs/flatten_swin_t.yaml'], 'give a model name or --cfg'),
    (['--cfg', 'cfgs/missing.yaml'], '--cfg cfgs/missing.yaml: no such file'),
    (['flatten_swin_t', '--checkpoint', 'missing.pth'], '--checkpoint missing.pth: no such file'),
    (['flatten_swin_t', '--batch', '0'], '--batch and --img-size must be positive'),
])
def test_export_tool_bad_input_is_one_line(args, message, capsys):
    import errors
    assert errors.cli(lambda: tool.main(args)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_export_tool_command_line(startup_server):
    """The script itself (a fresh start past torch and timm): exit status 2 and one line on stderr for a bad
    name."""
    result = startup_server.run([os.path.join(ROOT, 'tools', 'export.py'), 'no_such_model'], cwd=ROOT)
    assert result.code == 2 and result.err.strip().count('\n') == 0, result.err
    assert "unknown model 'no_such_model'" in result.err
