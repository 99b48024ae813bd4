"""The optional natten backend of neighbourhood attention (models/neighborhood_attention.py).

natten is never a requirement, so most checks use stand-in ``natten`` modules written here from natten's
documented API and semantics (explicit loops over clamped windows, float64): they check that our adapter
calls each natten generation's functions with the right arguments and layout, and that unusable natten
versions are refused with an error naming the fix. When a real natten with relative position bias is
installed, the last test compares it with the built-in path.
"""
from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from errors import ConfigError

from models.neighborhood_attention import (get_neighborhood_impl, natten_functions, neighborhood_attention,
                                           neighborhood_impl, set_neighborhood_impl)

from dat_reference import neighborhood_reference


def _window_entries(H, W, kernel):
    """(i, j, entry, y, x) for every query (i, j) and every key (y, x) of its clamped window, entries row-major."""
    r = kernel // 2
    for i in range(H):
        top = min(max(i - r, 0), H - kernel)
        for j in range(W):
            left = min(max(j - r, 0), W - kernel)
            for a in range(kernel):
                for b in range(kernel):
                    yield i, j, a * kernel + b, top + a, left + b


def _loop_qk_rpb(q, k, rpb, kernel):
    """natten's QK+RPB: (B, h, H, W, k*k) logits over the clamped window, bias at the true offset."""
    B, h, H, W, _ = q.shape
    out = torch.zeros(B, h, H, W, kernel * kernel, dtype=q.dtype)
    for i, j, e, y, x in _window_entries(H, W, kernel):
        out[:, :, i, j, e] = (q[:, :, i, j] * k[:, :, y, x]).sum(-1) + rpb[:, y - i + kernel - 1, x - j + kernel - 1]
    return out


def _loop_av(attn, v, kernel):
    """natten's AV: each query's window values weighted by its (k*k) attention entries."""
    out = torch.zeros_like(v)
    for i, j, e, y, x in _window_entries(v.shape[2], v.shape[3], kernel):
        out[:, :, i, j] += attn[:, :, i, j, e, None] * v[:, :, y, x]
    return out


def _install(monkeypatch, version: str, functional: types.ModuleType) -> None:
    natten = types.ModuleType('natten')
    natten.__version__ = version
    natten.functional = functional
    monkeypatch.setitem(sys.modules, 'natten', natten)
    monkeypatch.setitem(sys.modules, 'natten.functional', functional)


def _functional(**functions) -> types.ModuleType:
    nf = types.ModuleType('natten.functional')
    for name, fn in functions.items():
        setattr(nf, name, fn)
    return nf


def natten_014() -> types.ModuleType:
    """natten 0.14.x (DAT's pin): natten2dqkrpb(q, k, rpb, kernel_size, dilation), natten2dav(a, v, ks, dil)."""
    def natten2dqkrpb(query, key, rpb, kernel_size, dilation):
        assert dilation == 1
        return _loop_qk_rpb(query, key, rpb, kernel_size)

    def natten2dav(attn, value, kernel_size, dilation):
        assert dilation == 1
        return _loop_av(attn, value, kernel_size)
    return _functional(natten2dqkrpb=natten2dqkrpb, natten2dav=natten2dav)


def natten_017() -> types.ModuleType:
    """natten 0.15-0.17: na2d_qk(q, k, kernel_size, dilation=1, ..., rpb=None), na2d_av(a, v, ks, dilation=1)."""
    def na2d_qk(query, key, kernel_size, dilation=1, additional_keys=None, is_causal=False, rpb=None):
        assert dilation == 1 and rpb is not None
        return _loop_qk_rpb(query, key, rpb, kernel_size)

    def na2d_av(attn, value, kernel_size, dilation=1, additional_values=None, is_causal=False):
        assert dilation == 1
        return _loop_av(attn, value, kernel_size)
    return _functional(na2d_qk=na2d_qk, na2d_av=na2d_av)


def natten_020() -> types.ModuleType:
    """natten 0.20+: no relative position bias anywhere."""
    def na2d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None):
        raise AssertionError('must not be called')

    def na2d_qk(query, key, kernel_size, dilation=1, is_causal=False):
        raise AssertionError('must not be called')
    return _functional(na2d=na2d, na2d_qk=na2d_qk)


def _inputs(H, W, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, key, v = (torch.randn(2, 3, H, W, 4, generator=g, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(3, 2 * k - 1, 2 * k - 1, generator=g, dtype=torch.float64)
    return q, key, v, rpb


@pytest.mark.parametrize('make', [natten_014, natten_017], ids=['natten-0.14', 'natten-0.17'])
@pytest.mark.parametrize('H,W,k', [(7, 9, 7), (10, 6, 5)])
def test_natten_backend_matches_reference(monkeypatch, make, H, W, k):
    _install(monkeypatch, '0.x', make())
    q, key, v, rpb = _inputs(H, W, k, seed=H * W)
    assert get_neighborhood_impl() == 'torch'
    with neighborhood_impl('natten'):
        assert get_neighborhood_impl() == 'natten'
        out = neighborhood_attention(q, key, v, rpb, k)
    assert get_neighborhood_impl() == 'torch'
    torch.testing.assert_close(out, neighborhood_reference(q, key, v, rpb, k), rtol=1e-10, atol=1e-12)


def test_natten_backend_gradients_flow(monkeypatch):
    _install(monkeypatch, '0.14.6', natten_014())
    q, key, v, rpb = (t.requires_grad_() for t in _inputs(7, 7, 3, seed=3))
    with neighborhood_impl('natten'):
        out = neighborhood_attention(q, key, v, rpb, 3)
    weight = torch.randn_like(out)
    got = torch.autograd.grad((out * weight).sum(), (q, key, v, rpb))
    want = torch.autograd.grad((neighborhood_reference(q, key, v, rpb, 3) * weight).sum(), (q, key, v, rpb))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_natten_without_bias_is_refused(monkeypatch):
    _install(monkeypatch, '0.21.7', natten_020())
    with pytest.raises(ConfigError, match=r'natten 0\.21\.7 has no relative position bias.*natten 0\.14-0\.17'):
        set_neighborhood_impl('natten')
    assert get_neighborhood_impl() == 'torch'


def test_missing_natten_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, 'natten', None)          # import natten -> ImportError
    with pytest.raises(ConfigError, match="natten cannot be imported.*'torch' implementation"):
        natten_functions()
    with pytest.raises(ConfigError, match="'cuda_magic' is unknown; use one of torch, natten"):
        set_neighborhood_impl('cuda_magic')
    assert get_neighborhood_impl() == 'torch'


def test_dat_model_uses_natten_backend(monkeypatch):
    """A whole 'N' block through the selected backend equals the built-in path (no hook on the tap)."""
    from models.dat import NeighborhoodAttention
    _install(monkeypatch, '0.14.6', natten_014())
    torch.manual_seed(0)
    block = NeighborhoodAttention(dim=12, kernel_size=5, num_heads=3).double().eval()
    x = torch.randn(2, 12, 6, 8, dtype=torch.float64)
    calls = []
    nf = sys.modules['natten.functional']
    original = nf.natten2dqkrpb
    nf.natten2dqkrpb = lambda *a: calls.append(a[3]) or original(*a)
    with torch.no_grad():
        ours = block(x)
        with neighborhood_impl('natten'):
            theirs = block(x)
    assert calls == [5]
    torch.testing.assert_close(theirs, ours, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(importlib.util.find_spec('natten') is None, reason='natten is not installed (optional)')
@pytest.mark.parametrize('H,W,k', [(7, 7, 7), (9, 13, 7), (14, 14, 7), (12, 5, 5)])
def test_installed_natten_matches_builtin(H, W, k):
    """Only where a real natten is installed: its kernels against the built-in path, float32."""
    try:
        natten_functions()
    except ConfigError as e:
        pytest.skip(str(e))
    q, key, v, rpb = (t.float() for t in _inputs(H, W, k, seed=7))
    ours = neighborhood_attention(q, key, v, rpb, k)
    with neighborhood_impl('natten'):
        theirs = neighborhood_attention(q, key, v, rpb, k)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


def test_implementation_choice_reads_and_checks_its_environment_variable(monkeypatch):
    from models.impl_choice import ImplChoice
    monkeypatch.setenv('DAT_NEIGHBORHOOD_IMPL', 'natten')
    checked = []
    choice = ImplChoice('thing', ('torch', 'natten'), 'DAT_NEIGHBORHOOD_IMPL', 'torch', check=checked.append)
    assert choice.name == 'natten' and checked == ['natten']  # the variable's choice is checked at once
    with choice.use('torch'):
        assert choice.name == 'torch' and checked == ['natten', 'torch']
    assert choice.name == 'natten'
    monkeypatch.setenv('DAT_NEIGHBORHOOD_IMPL', 'bogus')
    with pytest.raises(ConfigError, match="DAT_NEIGHBORHOOD_IMPL='bogus' is unknown; use one of torch, natten"):
        ImplChoice('thing', ('torch', 'natten'), 'DAT_NEIGHBORHOOD_IMPL', 'torch')


@pytest.mark.parametrize('env,expect', [
    ({'DAT_NEIGHBORHOOD_IMPL': 'natten'}, 'natten 0.21.7 has no relative position bias'),
    ({'FLATTEN_ATTENTION_IMPL': 'bogus'}, "FLATTEN_ATTENTION_IMPL='bogus' is unknown; use one of reference, fast"),
])
def test_bad_implementation_choice_is_one_error_line_from_main(tmp_path, env, expect, startup_server):
    """main.py with an unusable implementation chosen by environment variable: exit 2, one ERROR line, no
    output folder. A stand-in natten 0.21 (no bias) shadows any installed natten. A fresh start of main.py
    (forked past the torch and timm imports)."""
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fake = tmp_path / 'site' / 'natten'
    fake.mkdir(parents=True)
    (fake / '__init__.py').write_text("__version__ = '0.21.7'\n")
    (fake / 'functional.py').write_text('def na2d(query, key, value, kernel_size, dilation=1):\n    pass\n')
    out = tmp_path / 'out'
    cfg = os.path.join(root, 'cfgs', 'demo', 'dat_digits.yaml')
    res = startup_server.run([os.path.join(root, 'main.py'), '--cfg', cfg,
                              '--data-path', str(tmp_path), '--output', str(out), '--device', 'cpu'],
                             dict(env, PYTHONPATH=os.pathsep.join([str(tmp_path / 'site'), root])), cwd=root)
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert res.code == 2 and len(lines) == 1 and lines[0].startswith('ERROR: '), res.err[-2000:]
    assert expect in lines[0] and not out.exists()
