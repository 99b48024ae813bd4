"""The fast focused linear attention (and its Triton core) is the same function as the reference.

References: the float64 quadratic-form ``naive_focused_linear_attention`` (tests/reference.py, written from
the definition), numerical finite differences (``gradcheck``) for the hand-written backward passes, and the
plain-formula path ('reference') for whole-model gradients.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from models.focused_attention import (_FocusedKernelFn, _LinearCoreFn, attention_impl, get_attention_impl,
                                      set_attention_impl)
from reference import naive_focused_kernel, naive_focused_linear_attention
from test_focused_attention import _module as random_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(dim, heads, n_kv, p, g, kernel_size=3, dtype=torch.float32):
    """test_focused_attention's random non-zero module, with a 3x3 dwc by default here."""
    return random_module(dim, heads, n_kv, p, g, kernel_size=kernel_size, dtype=dtype)


def _rel(a, b):
    """max |a - b| / max |b| (just max |a - b| when b is all zeros)."""
    scale = b.double().abs().max().clamp(min=1e-300)
    return ((a.double() - b.double()).abs().max() / scale).item()


def _qkv(B, N, C, g, magnitude=1.0, dtype=torch.float32):
    """q, k, v as strided views of one (B, N, 3C) projection output, as the families produce them."""
    qkv = magnitude * torch.randn(B, N, 3 * C, generator=g, dtype=torch.float64)
    return qkv.to(dtype).view(B, N, 3, C).unbind(2)


def test_fast_is_the_default_and_selectable():
    assert get_attention_impl() == 'fast'
    with attention_impl('reference'):
        assert get_attention_impl() == 'reference'
    assert get_attention_impl() == 'fast'
    with pytest.raises(ValueError, match='unknown; use one of reference, fast, triton'):
        set_attention_impl('flash')


@pytest.mark.parametrize('magnitude', [1e-3, 1.0, 30.0, 1e4])
@pytest.mark.parametrize('p', [1, 3, 4.5])
def test_fast_matches_float64_reference_float32(p, magnitude, rng):
    B, H, W, C, heads = 2, 4, 5, 24, 3
    m = _module(C, heads, H * W, p, rng)
    q, k, v = _qkv(B, H * W, C, rng, magnitude)
    out = m.attend(q, k, v, hw=(H, W))
    ref = naive_focused_linear_attention(q, k, v, m.scale, m.positional_encoding, p, heads,
                                         m.dwc.weight, m.dwc.bias, (H, W))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-5


def test_fast_cross_attention_without_dwc(rng):
    B, N, n, C, heads, p = 2, 10, 7, 16, 2, 3                       # PVT-style reduced keys
    m = _module(C, heads, n, p, rng, dtype=torch.float64)
    q = torch.randn(B, N, C, generator=rng, dtype=torch.float64)
    k, v = (torch.randn(B, n, C, generator=rng, dtype=torch.float64) for _ in range(2))
    ref = naive_focused_linear_attention(q, k, v, m.scale, m.positional_encoding, p, heads)
    assert _rel(m.attend(q, k, v), ref) < 1e-12


@pytest.mark.parametrize('magnitude', [1e6, 1e9])
def test_fast_large_query_key_magnitudes(magnitude, rng):
    """q, k ~ 1e9 (their cube ~ 1e27): the power is taken after dividing by ||y||, the core stays finite."""
    B, N, C, heads, p = 1, 9, 8, 2, 3
    m = _module(C, heads, N, p, rng)
    q, k, v = _qkv(B, N, C, rng)
    q, k = q * magnitude, k * magnitude
    out = m.attend(q, k, v)
    ref = naive_focused_linear_attention(q, k, v, m.scale, m.positional_encoding, p, heads)
    assert torch.isfinite(out).all() and _rel(out, ref) < 1e-5


def test_focused_kernel_backward_gradcheck(rng):
    x = torch.randn(2, 5, 6, generator=rng, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(1, 5, 6, generator=rng, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(6, generator=rng, dtype=torch.float64) + 0.5).requires_grad_()
    for p, heads in ((3, 2), (2.5, 3), (1, 1)):
        assert torch.autograd.gradcheck(lambda x, pos, s: _FocusedKernelFn.apply(x, pos, s, p, heads), (x, pos, s))
    assert torch.autograd.gradcheck(lambda x, s: _FocusedKernelFn.apply(x, None, s, 3, 2), (x, s))


def test_linear_core_backward_gradcheck(rng):
    q = torch.rand(2, 3, 5, 4, generator=rng, dtype=torch.float64, requires_grad=True)
    k = torch.rand(2, 3, 7, 4, generator=rng, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 7, 4, generator=rng, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 5, 4, generator=rng, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_LinearCoreFn.apply, (q, k, v, r))
    assert torch.autograd.gradcheck(lambda q, k, v: _LinearCoreFn.apply(q, k, v, None), (q, k, v))


def test_fast_gradients_match_reference_path(rng):
    """Gradients of every input and parameter through attend(+dwc), strided qkv views, float64."""
    B, H, W, C, heads, p = 2, 3, 4, 12, 3, 3
    m = _module(C, heads, H * W, p, rng, dtype=torch.float64)
    qkv0 = torch.randn(B, H * W, 3 * C, generator=rng, dtype=torch.float64)
    w = torch.randn(B, H * W, C, generator=rng, dtype=torch.float64)
    grads = {}
    for impl in ('reference', 'fast'):
        m.zero_grad()
        qkv = qkv0.clone().requires_grad_()
        with attention_impl(impl):
            (m.attend(*qkv.view(B, H * W, 3, C).unbind(2), hw=(H, W)) * w).sum().backward()
        grads[impl] = [qkv.grad] + [t.grad.clone() for t in m.parameters()]
    for a, b in zip(grads['fast'], grads['reference']):
        assert _rel(a, b) < 1e-10


def test_fast_under_bfloat16_autocast_is_finite_and_close(rng):
    B, N, C, heads, p = 2, 64, 32, 4, 3
    m = _module(C, heads, N, p, rng, kernel_size=5)
    proj = nn.Linear(C, 3 * C)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(proj.weight.shape, generator=rng) * C ** -0.5)
        x = 3 * torch.randn(B, N, C, generator=rng)
        with attention_impl('reference'):
            ref = m.attend(*proj(x).chunk(3, dim=-1), hw=(8, 8))             # all float32
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = m.attend(*proj(x).chunk(3, dim=-1), hw=(8, 8))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.double() - ref.double()).norm() / ref.double().norm() < 1e-2


def test_fast_float16_inputs_do_not_overflow(rng):
    # relu(q) / softplus(scale) ~ 1e3: its cube overflows float16 (max 65504), the maths must not
    B, N, C, heads, p = 1, 16, 8, 2, 3
    m = _module(C, heads, N, p, rng)
    with torch.no_grad():
        m.scale.fill_(-3.0)                                                  # softplus ~ 0.05
    q, k, v = (100 * torch.rand(B, N, C, generator=rng) for _ in range(3))
    out = m.attend(q.half(), k.half(), v.half())             # (CPU has no float16 convolution: no dwc)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    ref = naive_focused_linear_attention(q.half(), k.half(), v.half(), m.scale, m.positional_encoding, p, heads)
    assert _rel(out, ref) < 2e-3


def test_hooked_tap_sees_feature_maps_and_changes_nothing(rng):
    """A hook on the tap sees phi(q), phi(k + pos), v as (B, N, C); the output is bit-identical."""
    B, H, W, C, heads, p = 1, 4, 4, 8, 2, 3
    m = _module(C, heads, H * W, p, rng)
    q, k, v = _qkv(B, H * W, C, rng)
    fast = m.attend(q, k, v, hw=(H, W))
    seen = []
    handle = m.tap.register_forward_hook(lambda mod, inp, out: seen.append(inp))
    hooked = m.attend(q, k, v, hw=(H, W))
    handle.remove()
    assert torch.equal(hooked, fast)
    (phi_q, phi_k, v_seen), = seen
    assert _rel(phi_q, naive_focused_kernel(q, m.scale, p)) < 1e-6
    assert _rel(phi_k, naive_focused_kernel(k + m.positional_encoding, m.scale, p)) < 1e-6
    assert torch.equal(v_seen, v)


def test_model_forward_and_gradients_fast_equal_reference():
    """The demo FLatten-Swin built from its config: logits and parameter gradients, fast vs reference."""
    from config import load_config
    from models import build_model
    torch.manual_seed(0)
    config = load_config(os.path.join(ROOT, 'cfgs', 'demo', 'flatten_swin_digits.yaml'))
    model = build_model(config).double().eval()                     # eval: no stochastic depth
    with torch.no_grad():                               # non-trivial scale / positional encodings
        for name, prm in model.named_parameters():
            if name.endswith(('.scale', '.positional_encoding')):
                prm.normal_(0, 0.5)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = {}
    for impl in ('reference', 'fast'):
        model.zero_grad()
        with attention_impl(impl):
            logits = model(x)
            logits.square().sum().backward()
        results[impl] = [logits.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(results['fast']) == len(results['reference'])
    for a, b in zip(results['fast'], results['reference']):
        assert _rel(a, b) < 1e-9


TRITON_SCRIPT = textwrap.dedent('''
    import os, sys
    DEVICE = {device!r}
    if DEVICE == 'cpu':
        os.environ['TRITON_INTERPRET'] = '1'        # before triton is imported
    sys.path[:0] = [{root!r}, {tests!r}]
    import torch
    from models.triton_linear_attention import TritonLinearCore, triton_core_for
    from models.focused_attention import FocusedLinearAttentionBase, attention_impl
    from reference import naive_focused_linear_attention
    g = torch.Generator().manual_seed(0)

    def rel(a, b):
        return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()

    # the core, forward and backward, against float64 autograd of the plain formula (masked tail blocks:
    # N = 40 and n = 72 are not multiples of the 64-token block)
    B, h, N, n, d = 1, 2, 40, 72, 16
    q = torch.rand(B, h, N, d, generator=g).to(DEVICE).requires_grad_()
    k = torch.rand(B, h, n, d, generator=g).to(DEVICE).requires_grad_()
    v = torch.randn(B, h, n, d, generator=g).to(DEVICE).requires_grad_()
    out = TritonLinearCore.apply(q, k, v)
    go = torch.randn(out.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad(out, (q, k, v), go)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    z = 1 / (q64 @ k64.mean(2, keepdim=True).transpose(-2, -1) + 1e-6)
    ref = (q64 @ (k64.transpose(-2, -1) @ v64 / n)) * z
    refs = torch.autograd.grad(ref, (q64, k64, v64), go.double())
    errs = [rel(out, ref)] + [rel(a, b) for a, b in zip(grads, refs)]
    assert max(errs) < 1e-5, errs

    # the whole attention with the Triton core plugged in, against the float64 quadratic form
    C, heads, H, W = 32, 2, 6, 6
    m = FocusedLinearAttentionBase(C, heads, H * W, 3, 3)
    with torch.no_grad():
        m.scale.normal_(generator=g); m.positional_encoding.normal_(0, 0.5, generator=g)
    m.to(DEVICE)
    assert triton_core_for(torch.zeros(1, device=DEVICE), C // heads) is not None
    x = torch.randn(2, H * W, 3 * C, generator=g).to(DEVICE)
    qq, kk, vv = x.view(2, H * W, 3, C).unbind(2)
    with attention_impl('triton'):
        got = m.attend(qq, kk, vv, hw=(H, W))
    want = naive_focused_linear_attention(qq, kk, vv, m.scale, m.positional_encoding, 3, heads,
                                          m.dwc.weight, m.dwc.bias, (H, W))
    assert rel(got, want) < 1e-5, rel(got, want)
    print('TRITON-OK', errs)
''')


def _run_triton_script(tmp_path, device: str, env: dict) -> None:
    script = tmp_path / 'triton_check.py'
    script.write_text(TRITON_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, 'tests'), device=device))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0 and 'TRITON-OK' in res.stdout, res.stdout + res.stderr[-3000:]


def test_triton_core_under_interpreter(tmp_path):
    pytest.importorskip('triton')
    _run_triton_script(tmp_path, 'cpu', dict(os.environ, TRITON_INTERPRET='1', OMP_NUM_THREADS='1'))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_triton_core_compiled_on_cuda(tmp_path):
    """The same checks with the kernels compiled for the GPU (float32 'ieee' dots), not interpreted."""
    pytest.importorskip('triton')
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    _run_triton_script(tmp_path, 'cuda', env)


def test_triton_falls_back_cleanly_on_cpu_without_interpreter(rng, monkeypatch):
    pytest.importorskip('triton')
    from models import triton_linear_attention as tla
    monkeypatch.setattr(tla, 'interpreting', lambda: False)
    assert tla.triton_core_for(torch.zeros(1), 32) is None
    assert tla.triton_core_for(torch.zeros(1), 24) is None and not tla.supports_head_dim(24)
    m = _module(16, 2, 16, 3, rng)
    q, k, v = _qkv(1, 16, 16, rng)
    with attention_impl('triton'):
        out = m.attend(q, k, v, hw=(4, 4))                       # the PyTorch fast path, same function
    ref = naive_focused_linear_attention(q, k, v, m.scale, m.positional_encoding, 3, 2, m.dwc.weight,
                                         m.dwc.bias, (4, 4))
    assert _rel(out, ref) < 1e-5
