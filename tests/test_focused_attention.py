"""The shared focused linear attention maths against the float64 quadratic-form reference."""
import pytest
import torch
import torch.nn as nn

from models.focused_attention import (EPS, FocusedLinearAttentionBase, equivalent_attention, focused_kernel,
                                      interpolate_tokens, linear_attention)
from reference import (naive_depthwise_conv, naive_focused_kernel, naive_focused_linear_attention,
                       naive_focused_similarity, naive_interpolate_tokens)


def _module(dim, heads, n_kv, p, g, kernel_size=5, dtype=torch.float32):
    """A FocusedLinearAttentionBase with random non-zero scale, positional encoding and dwc."""
    m = FocusedLinearAttentionBase(dim, heads, n_kv, focusing_factor=p, kernel_size=kernel_size)
    with torch.no_grad():
        m.scale.copy_(torch.randn(m.scale.shape, generator=g))
        m.positional_encoding.copy_(0.5 * torch.randn(m.positional_encoding.shape, generator=g))
        m.dwc.weight.copy_(0.2 * torch.randn(m.dwc.weight.shape, generator=g))
        m.dwc.bias.copy_(torch.randn(m.dwc.bias.shape, generator=g))
    return m.to(dtype)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize('p', [1, 2, 3, 4.5])
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_attend_matches_quadratic_reference(p, dtype, tol, rng):
    B, N, n, C, heads = 2, 10, 12, 24, 3                      # N != n: cross attention (PVT's reduced keys)
    m = _module(C, heads, n, p, rng, dtype=dtype)
    q = torch.randn(B, N, C, generator=rng, dtype=dtype)
    k = torch.randn(B, n, C, generator=rng, dtype=dtype)
    v = torch.randn(B, n, C, generator=rng, dtype=dtype)
    out = m.attend(q, k, v)
    assert out.dtype == dtype and out.shape == (B, N, C)
    ref = naive_focused_linear_attention(q, k, v, m.scale, m.positional_encoding, p, heads)
    assert _rel(out, ref) < tol


def test_attend_plus_dwc_matches_reference(rng):
    B, H, W, C, heads, p = 2, 4, 5, 16, 2, 3
    m = _module(C, heads, H * W, p, rng, kernel_size=3, dtype=torch.float64)
    q, k, v = (torch.randn(B, H * W, C, generator=rng, dtype=torch.float64) for _ in range(3))
    out = m.attend(q, k, v) + m.rank_restoration(v, (H, W))
    ref = naive_focused_linear_attention(q, k, v, m.scale, m.positional_encoding, p, heads,
                                         m.dwc.weight, m.dwc.bias, (H, W))
    assert _rel(out, ref) < 1e-10


def test_rank_restoration_shares_one_kernel_across_heads(rng):
    B, H, W, C, heads = 1, 6, 3, 12, 4
    m = _module(C, heads, H * W, 3, rng, kernel_size=5, dtype=torch.float64)
    v = torch.randn(B, H * W, C, generator=rng, dtype=torch.float64)
    ref = naive_depthwise_conv(v, m.dwc.weight, m.dwc.bias, heads, (H, W))
    assert _rel(m.rank_restoration(v, (H, W)), ref) < 1e-12
    # the branch is local: a token far from the changed one (Chebyshev distance > 2) is unaffected
    v2 = v.clone()
    v2[0, 0] += 1.0
    diff = (m.rank_restoration(v2, (H, W)) - m.rank_restoration(v, (H, W))).abs().sum(-1)[0].view(H, W)
    assert diff[3:, :].abs().max() == 0 and diff[:3, :3].min() > 0


def test_focused_kernel_properties(rng):
    x = torch.randn(3, 7, 16, generator=rng, dtype=torch.float64)
    scale = torch.randn(1, 1, 16, generator=rng, dtype=torch.float64)
    for p in (1, 3):
        phi = focused_kernel(x, scale, p)
        assert torch.allclose(phi, naive_focused_kernel(x, scale, p), rtol=1e-12, atol=0)
        assert (phi > 0).all()
        # the norm of relu(x) + eps (over the full channel dim, after the scale) is restored
        base = (x.clamp(min=0) + EPS) / torch.nn.functional.softplus(scale)
        assert torch.allclose(phi.norm(dim=-1), base.norm(dim=-1), rtol=1e-12)
    # p = 1 is the plain ReLU kernel
    assert torch.allclose(focused_kernel(x, scale, 1), (x.clamp(min=0) + EPS) / torch.log1p(scale.exp()))


def test_equivalent_attention_rows_and_product(rng):
    B, N, n, C, heads = 2, 9, 11, 12, 3
    q = torch.rand(B, N, C, generator=rng, dtype=torch.float64) * 0.01     # small: the eps term shows
    k = torch.rand(B, n, C, generator=rng, dtype=torch.float64) * 0.01
    v = torch.randn(B, n, C, generator=rng, dtype=torch.float64)
    A = equivalent_attention(q, k, heads)
    assert A.shape == (B, heads, N, n)
    # Derivation: per head, with S_ij = q_i . k_j (feature-mapped inputs),
    #   linear_attention_i = (q_i (K^T V) / n) / (q_i . mean_j k_j + eps) = sum_j S_ij v_j / (sum_j S_ij + n eps)
    # so row i of A sums to s_i / (s_i + n eps) = 1 - n eps / (s_i + n eps), with s_i = sum_j S_ij.
    d = C // heads
    for h in range(heads):
        s = (q[..., h * d:(h + 1) * d] @ k[..., h * d:(h + 1) * d].transpose(1, 2)).sum(-1)
        expected = 1 - n * EPS / (s + n * EPS)
        assert torch.allclose(A[:, h].sum(-1), expected, rtol=0, atol=1e-13)
    assert (A.sum(-1) < 1).all() and (1 - A.sum(-1)).max() > 1e-4       # the eps term is visible here
    # A @ v, merged over heads, is the fast linear attention
    Av = (A @ v.view(B, n, heads, d).transpose(1, 2)).transpose(1, 2).reshape(B, N, C)
    assert _rel(linear_attention(q, k, v, heads), Av) < 1e-12


def test_equivalent_attention_matches_reference_similarity(rng):
    B, N, C, heads, p = 1, 8, 8, 2, 3
    m = _module(C, heads, N, p, rng, dtype=torch.float64)
    q, k = (torch.randn(B, N, C, generator=rng, dtype=torch.float64) for _ in range(2))
    S = naive_focused_similarity(q, k, m.scale, m.positional_encoding, p, heads)
    A = equivalent_attention(*m.feature_map(q, k), heads)
    assert _rel(A, S / (S.sum(-1, keepdim=True) + N * EPS)) < 1e-12


def test_tap_sees_feature_maps(rng):
    B, N, C, heads, p = 1, 5, 8, 2, 3
    m = _module(C, heads, N, p, rng, dtype=torch.float64)
    seen = []
    m.tap.register_forward_hook(lambda mod, inp, out: seen.append(inp))
    q, k, v = (torch.randn(B, N, C, generator=rng, dtype=torch.float64) for _ in range(3))
    m.attend(q, k, v)
    (phi_q, phi_k, v_seen), = seen
    assert torch.allclose(phi_q, naive_focused_kernel(q, m.scale, p), rtol=1e-12)
    assert torch.allclose(phi_k, naive_focused_kernel(k + m.positional_encoding, m.scale, p), rtol=1e-12)
    assert torch.equal(v_seen, v)


def test_interpolate_tokens_hand_derived():
    # n = 2 -> length 4, half-pixel centres: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1)
    v = torch.tensor([[[1.0, -2.0, 10.0, 0.0], [5.0, 2.0, 30.0, 4.0]]])               # (1, 2, 4)
    expected = torch.tensor([[[1.0, -2.0, 10.0, 0.0], [2.0, -1.0, 15.0, 1.0],
                              [4.0, 1.0, 25.0, 3.0], [5.0, 2.0, 30.0, 4.0]]])
    for heads in (1, 2, 4):                         # interpolation is per channel: heads do not matter
        assert torch.allclose(interpolate_tokens(v, heads, 4), expected)
    # n = 3 -> length 3 is the identity
    w = torch.randn(2, 3, 6)
    assert torch.allclose(interpolate_tokens(w, 3, 3), w)


@pytest.mark.parametrize('n,length', [(4, 16), (49, 196), (5, 7)])
def test_interpolate_tokens_matches_reference(n, length, rng):
    v = torch.randn(2, n, 12, generator=rng, dtype=torch.float64)
    out = interpolate_tokens(v, 3, length)
    assert out.shape == (2, length, 12)
    assert _rel(out, naive_interpolate_tokens(v, length)) < 1e-12


def test_attend_under_bfloat16_autocast_is_finite_and_close(rng):
    B, N, C, heads, p = 2, 64, 32, 4, 3
    m = _module(C, heads, N, p, rng)
    proj = nn.Linear(C, 3 * C)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(proj.weight.shape, generator=rng) * C ** -0.5)
        proj.bias.copy_(0.1 * torch.randn(proj.bias.shape, generator=rng))
        x = 3 * torch.randn(B, N, C, generator=rng)
        ref = m.attend(*proj(x).chunk(3, dim=-1))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            q, k, v = proj(x).chunk(3, dim=-1)
            assert v.dtype == torch.bfloat16
            out = m.attend(q, k, v)
        ref_rounded = m.attend(q.float(), k.float(), v.float())   # fp32 maths on the same bf16 inputs
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    # only the output is rounded to bf16 (8 significant bits) when attend's maths runs in fp32
    assert _rel(out, ref_rounded) < 8e-3
    # against the all-fp32 path, bf16 projections (errors ~0.4%, amplified by the power p) dominate
    err = (out.double() - ref.double()).norm() / ref.double().norm()
    assert err < 3e-2


def test_attend_float16_inputs_do_not_overflow(rng):
    # relu(q) / softplus(scale) ~ 100 -> a cube of ~1e6 overflows float16 (max 65504); the maths runs in fp32
    B, N, C, heads, p = 1, 16, 8, 2, 3
    m = _module(C, heads, N, p, rng)
    q, k, v = (100 * torch.rand(B, N, C, generator=rng) for _ in range(3))
    out = m.attend(q.half(), k.half(), v.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    ref = naive_focused_linear_attention(q.half(), k.half(), v.half(), m.scale, m.positional_encoding, p, heads)
    assert _rel(out, ref) < 2e-3
