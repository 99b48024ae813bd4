"""The normalised linear-attention core as Triton kernels (forward and backward), for CUDA.

Computes, per (batch, head), with feature-mapped queries Q (N, d), keys K (n, d) and values V (n, d):

    KV = K^T V / n,  m = mean_j K_j,  out_i = (Q_i KV) / (Q_i . m + 1e-6)

i.e. the same function as ``models.focused_attention.linear_attention`` on per-head buffers. Two launches
forward (K^T [V, 1] reduced over keys; then one pass over query blocks), two backward (one pass over query
blocks that also reduces [dKV, dm]; then one pass over key blocks). Accumulation is float32 whatever the
input dtype; float32 inputs use IEEE float32 products (no TF32), so results match the PyTorch path.

Status: written and tested for correctness on CPU with ``TRITON_INTERPRET=1`` (tests/test_fast_attention.py).
It has NOT been timed on a GPU yet, so it is opt-in: ``set_attention_impl('triton')`` (or
``FLATTEN_ATTENTION_IMPL=triton``) and ``tools/benchmark.py --attention-impl triton`` measures it.
Importing this module never needs a GPU; without Triton, :func:`triton_core_for` returns None and the
PyTorch core is used.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import torch

_logger = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:                     # pragma: no cover - Triton ships with CUDA builds of torch
    triton = tl = None
    HAS_TRITON = False

EPS = 1e-6
BLOCK = 64                              # tokens per program step


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``, set before importing triton)."""
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


if HAS_TRITON:
    @triton.jit
    def _kv_fwd(K, V, KV, KS, n, inv_n, D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
        """One program per (batch, head): KV = K^T V / n (D, D), KS = sum_j K_j / n (D,), float32."""
        bh = tl.program_id(0)
        offs_d = tl.arange(0, D)
        acc = tl.zeros((D, D), dtype=tl.float32)
        ks = tl.zeros((D,), dtype=tl.float32)
        for start in range(0, n, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            mask = offs_n[:, None] < n
            ptr = bh * n * D + offs_n[:, None] * D + offs_d[None, :]
            k = tl.load(K + ptr, mask=mask, other=0.)
            v = tl.load(V + ptr, mask=mask, other=0.).to(k.dtype)
            acc += tl.dot(tl.trans(k), v, input_precision=PREC)
            ks += tl.sum(k.to(tl.float32), axis=0)
        tl.store(KV + bh * D * D + offs_d[:, None] * D + offs_d[None, :], acc * inv_n)
        tl.store(KS + bh * D + offs_d, ks * inv_n)

    @triton.jit
    def _out_fwd(Q, KV, KS, O, DEN, N, eps, D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
        """Program (bh, block): O = (Q KV) / (Q . KS + eps) for BLOCK_N queries; DEN keeps the denominator."""
        bh = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        mask = offs_n[:, None] < N
        ptr = bh * N * D + offs_n[:, None] * D + offs_d[None, :]
        q = tl.load(Q + ptr, mask=mask, other=0.)
        kv = tl.load(KV + bh * D * D + offs_d[:, None] * D + offs_d[None, :])
        ks = tl.load(KS + bh * D + offs_d)
        t = tl.dot(q, kv.to(q.dtype), input_precision=PREC)
        den = tl.sum(q.to(tl.float32) * ks[None, :], axis=1) + eps
        tl.store(O + ptr, (t / den[:, None]).to(O.dtype.element_ty), mask=mask)
        tl.store(DEN + bh * N + offs_n, den, mask=offs_n < N)

    @triton.jit
    def _q_bwd(Q, DO, KV, KS, DEN, DQ, G, DM, N, D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
        """One program per (batch, head), looping over query blocks (deterministic reduction):
        z = 1/den, s_i = z_i dO_i . (Q_i KV);  dQ = z dO KV^T - z s m;  G = Q^T (z dO);  dm = -Q^T (z s)."""
        bh = tl.program_id(0)
        offs_d = tl.arange(0, D)
        kv = tl.load(KV + bh * D * D + offs_d[:, None] * D + offs_d[None, :])
        ks = tl.load(KS + bh * D + offs_d)
        g = tl.zeros((D, D), dtype=tl.float32)
        dm = tl.zeros((D,), dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            mask = offs_n[:, None] < N
            ptr = bh * N * D + offs_n[:, None] * D + offs_d[None, :]
            q = tl.load(Q + ptr, mask=mask, other=0.)
            do = tl.load(DO + ptr, mask=mask, other=0.).to(tl.float32)
            z = 1. / tl.load(DEN + bh * N + offs_n, mask=offs_n < N, other=1.)
            t = tl.dot(q, kv.to(q.dtype), input_precision=PREC)
            zs = z * z * tl.sum(do * t, axis=1)                                  # z * s
            wz = do * z[:, None]
            dq = tl.dot(wz.to(q.dtype), tl.trans(kv).to(q.dtype), input_precision=PREC) - zs[:, None] * ks[None, :]
            tl.store(DQ + ptr, dq.to(DQ.dtype.element_ty), mask=mask)
            g += tl.dot(tl.trans(q), wz.to(q.dtype), input_precision=PREC)
            dm -= tl.sum(q.to(tl.float32) * zs[:, None], axis=0)
        tl.store(G + bh * D * D + offs_d[:, None] * D + offs_d[None, :], g)
        tl.store(DM + bh * D + offs_d, dm)

    @triton.jit
    def _kv_bwd(K, V, G, DM, DK, DV, n, inv_n, D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
        """Program (bh, block): dK = (V G^T + dm) / n, dV = K G / n for BLOCK_N keys."""
        bh = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        mask = offs_n[:, None] < n
        ptr = bh * n * D + offs_n[:, None] * D + offs_d[None, :]
        k = tl.load(K + ptr, mask=mask, other=0.)
        v = tl.load(V + ptr, mask=mask, other=0.).to(k.dtype)
        g = tl.load(G + bh * D * D + offs_d[:, None] * D + offs_d[None, :]).to(k.dtype)
        dm = tl.load(DM + bh * D + offs_d)
        dk = (tl.dot(v, tl.trans(g), input_precision=PREC) + dm[None, :]) * inv_n
        dv = tl.dot(k, g, input_precision=PREC) * inv_n
        tl.store(DK + ptr, dk.to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + ptr, dv.to(DV.dtype.element_ty), mask=mask)


def _precision(dtype: torch.dtype) -> str:
    return 'ieee' if dtype == torch.float32 else 'tf32'     # 'tf32' is ignored for 16-bit inputs


class TritonLinearCore(torch.autograd.Function):
    """phi_q (B, h, N, d), phi_k, v (B, h, n, d) -> (B, h, N, d) in phi_q's dtype, via the kernels above."""

    @staticmethod
    def forward(ctx, phi_q, phi_k, v):
        B, h, N, d = phi_q.shape
        n = phi_k.shape[2]
        q, k, vv = (t.contiguous() for t in (phi_q, phi_k, v))
        f32 = dict(dtype=torch.float32, device=q.device)
        kv, ks = torch.empty(B * h, d, d, **f32), torch.empty(B * h, d, **f32)
        out, den = torch.empty_like(q), torch.empty(B * h, N, **f32)
        prec = _precision(q.dtype)
        _kv_fwd[(B * h,)](k, vv, kv, ks, n, 1.0 / n, D=d, BLOCK_N=BLOCK, PREC=prec)
        _out_fwd[(B * h, triton.cdiv(N, BLOCK))](q, kv, ks, out, den, N, EPS, D=d, BLOCK_N=BLOCK, PREC=prec)
        ctx.save_for_backward(q, k, vv, kv, ks, den)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, vv, kv, ks, den = ctx.saved_tensors
        B, h, N, d = q.shape
        n = k.shape[2]
        do = do.contiguous()
        f32 = dict(dtype=torch.float32, device=q.device)
        g, dm = torch.empty(B * h, d, d, **f32), torch.empty(B * h, d, **f32)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(vv)
        prec = _precision(q.dtype)
        _q_bwd[(B * h,)](q, do, kv, ks, den, dq, g, dm, N, D=d, BLOCK_N=BLOCK, PREC=prec)
        _kv_bwd[(B * h, triton.cdiv(n, BLOCK))](k, vv, g, dm, dk, dv, n, 1.0 / n, D=d, BLOCK_N=BLOCK, PREC=prec)
        return dq, dk, dv


def triton_linear_core(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                       residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ``core`` plug of ``fast_focused_linear_attention``: per-head inputs -> merged (B, N, h*d)."""
    out = TritonLinearCore.apply(phi_q, phi_k, v.to(phi_q.dtype))
    if residual is not None:
        out = out + residual
    B, h, N, d = out.shape
    return out.transpose(1, 2).reshape(B, N, h * d)


_warned = set()


def triton_core_for(x: torch.Tensor, head_dim: int) -> Optional[Callable]:
    """The Triton core when it can run on ``x``'s device and head size, else None (PyTorch core; a warning
    is logged once per reason).

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests). Needs Triton and a head
    dim that is a power of two >= 16 (every FLatten model: 32 or 64).
    """
    reason = None
    if not supports_head_dim(head_dim):
        reason = f'head dim {head_dim} is not a power of two >= 16'
    elif not HAS_TRITON:
        reason = 'triton is not installed'
    elif x.device.type != 'cuda' and not interpreting():
        reason = f'tensors are on {x.device.type}, not CUDA (set TRITON_INTERPRET=1 to run the interpreter)'
    if reason is None:
        return triton_linear_core
    if reason not in _warned:
        _warned.add(reason)
        _logger.warning('attention implementation "triton" unavailable (%s); using the PyTorch fast path', reason)
    return None


def supports_head_dim(d: int) -> bool:
    """tl.dot needs tile sides that are powers of two and at least 16."""
    return d >= 16 and d & (d - 1) == 0
