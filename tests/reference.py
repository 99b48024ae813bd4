"""Slow, float64, loop-and-dense-matrix references for the attention maths, written independently of
``models/``: tests compare the fast paths against these.

All functions take and return torch tensors; they compute in float64 whatever the input dtype.
Shapes: B batch, N query tokens, n key/value tokens, C channels, h heads, d = C / h.

Focused linear attention (FLatten, ICCV 2023), per head, for query i and key j:
    phi(x)  = f_p(relu(x) + 1e-6) / softplus(scale) taken over the FULL channel dim C,
              with f_p(y) = y**p * ||y|| / ||y**p||   (keys get the positional encoding first)
    S_ij    = phi(q_i)_h . phi(k_j)_h
    out_i   = sum_j S_ij v_j / (sum_j S_ij + n * 1e-6)
plus, when a depth-wise kernel is given, the rank-restoring branch: one (d, 1, k, k) kernel shared by all
heads, convolved (zero padding k // 2, cross-correlation as in PyTorch) over v laid out as h images of
(d, H, W).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

EPS = 1e-6

__all__ = ['naive_focused_kernel', 'naive_focused_similarity', 'naive_focused_linear_attention',
           'naive_depthwise_conv', 'naive_interpolate_tokens', 'naive_relative_position_index',
           'naive_window_softmax_attention']


def _f64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(torch.float64)


def naive_focused_kernel(x: torch.Tensor, scale: torch.Tensor, p: float) -> torch.Tensor:
    """phi(x) for x (..., C), scale broadcastable to (..., C) (the raw parameter, before softplus)."""
    x, scale = _f64(x), _f64(scale)
    softplus = torch.log1p(torch.exp(scale))            # fine for the moderate values tests use
    y = (torch.clamp(x, min=0.0) + EPS) / softplus
    y_norm = torch.sqrt((y * y).sum(dim=-1, keepdim=True))
    yp = y ** p
    yp_norm = torch.sqrt((yp * yp).sum(dim=-1, keepdim=True))
    return yp * (y_norm / yp_norm)


def naive_focused_similarity(x_q: torch.Tensor, x_k: torch.Tensor, scale: torch.Tensor,
                             pos_enc: Optional[torch.Tensor], p: float, num_heads: int) -> torch.Tensor:
    """The (B, h, N, n) matrix S_ij = phi(q_i) . phi(k_j + pos_enc_j) per head.

    x_q: (B, N, C) raw query projections; x_k: (B, n, C) raw key projections;
    scale: (1, 1, C) raw scale parameter; pos_enc: (1, n, C) or None.
    """
    x_k = _f64(x_k)
    if pos_enc is not None:
        x_k = x_k + _f64(pos_enc)
    q = naive_focused_kernel(x_q, scale, p)
    k = naive_focused_kernel(x_k, scale, p)
    B, N, C = q.shape
    n = k.shape[1]
    d = C // num_heads
    S = torch.zeros(B, num_heads, N, n, dtype=torch.float64)
    for h in range(num_heads):
        S[:, h] = q[..., h * d:(h + 1) * d] @ k[..., h * d:(h + 1) * d].transpose(1, 2)
    return S


def naive_depthwise_conv(v: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         num_heads: int, hw: Tuple[int, int]) -> torch.Tensor:
    """The dwc branch by explicit sums over kernel offsets.

    v: (B, H*W, C) tokens in row-major order; weight: (d, 1, k, k); bias: (d,) or None.
    Head m's channels v[..., m*d:(m+1)*d] form a (d, H, W) image; every head uses the same kernel.
    Returns (B, H*W, C).
    """
    v, weight, bias = _f64(v), _f64(weight), _f64(bias)
    B, L, C = v.shape
    H, W = hw
    assert L == H * W, (L, hw)
    assert weight.shape[0] * num_heads == C, (weight.shape, C, num_heads)      # one (d, k, k) kernel per head
    ks = weight.shape[-1]
    pad = ks // 2
    img = v.reshape(B, H, W, C)
    padded = torch.zeros(B, H + 2 * pad, W + 2 * pad, C, dtype=torch.float64)
    padded[:, pad:pad + H, pad:pad + W] = img
    # the kernel for channel c of any head is weight[c % d]
    w = weight[:, 0].repeat(num_heads, 1, 1)            # (C, k, k): head-major channel order
    out = torch.zeros(B, H, W, C, dtype=torch.float64)
    for dy in range(ks):
        for dx in range(ks):
            out += padded[:, dy:dy + H, dx:dx + W] * w[:, dy, dx]
    if bias is not None:
        out += bias.repeat(num_heads)
    return out.reshape(B, L, C)


def naive_focused_linear_attention(x_q: torch.Tensor, x_k: torch.Tensor, x_v: torch.Tensor,
                                   scale: torch.Tensor, pos_enc: Optional[torch.Tensor], p: float,
                                   num_heads: int, dwc_weight: Optional[torch.Tensor] = None,
                                   dwc_bias: Optional[torch.Tensor] = None,
                                   hw: Optional[Tuple[int, int]] = None,
                                   dwc_input: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Focused linear attention in the quadratic form, float64, before the output projection.

    Args:
        x_q: (B, N, C) raw query projections.
        x_k, x_v: (B, n, C) raw key / value projections.
        scale: (1, 1, C) the raw ``scale`` parameter (softplus is applied here).
        pos_enc: (1, n, C) the ``positional_encoding`` added to keys, or None.
        p: focusing factor.
        num_heads: h.
        dwc_weight, dwc_bias: (d, 1, k, k) and (d,) of the shared depth-wise conv; None for no dwc branch.
        hw: (H, W) image layout of the dwc input's tokens (H * W tokens).
        dwc_input: (B, H*W, C) tokens the dwc branch convolves; defaults to x_v (PVT passes its
            interpolated values here).
    Returns:
        (B, N, C) float64: attention output (+ dwc branch).
    """
    S = naive_focused_similarity(x_q, x_k, scale, pos_enc, p, num_heads)     # (B, h, N, n)
    v = _f64(x_v)
    B, n, C = v.shape
    d = C // num_heads
    out = torch.zeros(B, S.shape[2], C, dtype=torch.float64)
    for h in range(num_heads):
        A = S[:, h] / (S[:, h].sum(dim=-1, keepdim=True) + n * EPS)
        out[..., h * d:(h + 1) * d] = A @ v[..., h * d:(h + 1) * d]
    if dwc_weight is not None:
        assert hw is not None, 'hw is needed for the dwc branch'
        out = out + naive_depthwise_conv(x_v if dwc_input is None else dwc_input, dwc_weight, dwc_bias,
                                         num_heads, hw)
    return out


def naive_interpolate_tokens(v: torch.Tensor, length: int) -> torch.Tensor:
    """1-D linear interpolation of (B, n, C) tokens to (B, length, C) along the token axis, half-pixel
    centres (``align_corners=False``): output i samples source position s = (i + 0.5) * n / length - 0.5,
    clamped to [0, n - 1], mixing tokens floor(s) and floor(s) + 1. Channels are independent, so
    the head split does not matter."""
    v = _f64(v)
    B, n, C = v.shape
    out = torch.zeros(B, length, C, dtype=torch.float64)
    for i in range(length):
        s = min(max((i + 0.5) * n / length - 0.5, 0.0), n - 1)
        i0 = int(math.floor(s))
        i1 = min(i0 + 1, n - 1)
        lam = s - i0
        out[:, i] = (1 - lam) * v[:, i0] + lam * v[:, i1]
    return out


def naive_relative_position_index(window: int) -> torch.Tensor:
    """(w*w, w*w) int64: token a = (ya, xa), b = (yb, xb) (row-major in the window) ->
    (ya - yb + w - 1) * (2w - 1) + (xa - xb + w - 1)."""
    N = window * window
    idx = torch.zeros(N, N, dtype=torch.int64)
    for a in range(N):
        for b in range(N):
            ya, xa, yb, xb = a // window, a % window, b // window, b % window
            idx[a, b] = (ya - yb + window - 1) * (2 * window - 1) + (xa - xb + window - 1)
    return idx


def naive_window_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                                   bias_table: Optional[torch.Tensor], window: int,
                                   mask: Optional[torch.Tensor] = None,
                                   qk_scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Window softmax attention with relative position bias, float64, before the output projection.

    Args:
        q, k, v: (B_, N, C) raw projections of B_ = B * nW windows of N = w*w tokens (windows ordered
            batch-major, then row-major over the window grid).
        bias_table: ((2w-1)^2, h) relative position bias table, or None.
        mask: (nW, N, N) additive mask (0 or a large negative) or None.
        qk_scale: defaults to d ** -0.5.
    Returns:
        out (B_, N, C) and attention probabilities (B_, h, N, N).
    """
    q, k, v = _f64(q), _f64(k), _f64(v)
    B_, N, C = q.shape
    d = C // num_heads
    assert N == window * window
    qk_scale = d ** -0.5 if qk_scale is None else qk_scale
    index = naive_relative_position_index(window)
    probs = torch.zeros(B_, num_heads, N, N, dtype=torch.float64)
    out = torch.zeros(B_, N, C, dtype=torch.float64)
    for b in range(B_):
        for h in range(num_heads):
            sl = slice(h * d, (h + 1) * d)
            logits = (q[b, :, sl] * qk_scale) @ k[b, :, sl].T
            if bias_table is not None:
                logits = logits + _f64(bias_table)[index, h]
            if mask is not None:
                logits = logits + _f64(mask)[b % mask.shape[0]]
            logits = logits - logits.max(dim=-1, keepdim=True).values
            e = torch.exp(logits)
            probs[b, h] = e / e.sum(dim=-1, keepdim=True)
            out[b, :, sl] = probs[b, h] @ v[b, :, sl]
    return out, probs
