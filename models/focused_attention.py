"""Focused linear attention (FLatten, ICCV 2023): the maths, written once.

Every family (Swin windows, PVT spatial reduction, CSwin stripes) produces q, k, v token tensors and
calls :class:`FocusedLinearAttentionBase` for the rest:

  1. focused kernel      phi(x) = f_p(relu(x) + 1e-6) / softplus(scale), where
                         f_p(x) = x**p / ||x**p|| * ||x||   (norms over the full channel dim)
                         and keys get a learnable positional encoding before phi;
  2. linear product      out_i = sum_j (q_i . k_j) v_j / (sum_j q_i . k_j + n * 1e-6), computed per head
                         in the linear order (K^T V first), O(N d^2);
  3. rank restoration    a depth-wise conv (one kernel shared by all heads) on V laid out as an image,
                         added to the output.

Parameter names and shapes are those of the official release: ``scale`` (1, 1, dim),
``positional_encoding`` (1, n_kv, dim), ``dwc`` Conv2d(head_dim, head_dim, k, groups=head_dim).

For tools (``visualize``), each attention module owns a parameter-free :class:`AttentionTap` called on
the tensors that define its attention; a forward hook on ``module.tap`` reads them without model edits.

The same function has three implementations (``set_attention_impl``): 'reference' (the plain formulas
below), 'fast' (default: fused in-place kernel map, normaliser folded into K^T [V, 1], hand-written
backward) and 'triton' (the product as Triton kernels on CUDA, opt-in; models/triton_linear_attention.py).
While a tool traces, exports or counts operators (fvcore, ONNX, torch.export / torch.compile, fx,
FlopCounterMode: :func:`models.impl_choice.operators_observed`) the reference formulas run whatever is
selected: the fast paths' autograd Functions would hide their matmuls from those tools. timm's fx tracer
(feature extraction with ``feature_cls='fx'``, timm's fx tests) keeps every focused-linear attention module
as one leaf (``register_notrace_module``), so the traced model runs the selected implementation itself.
"""

import contextlib
import inspect
import math
from typing import Callable, ContextManager, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.nn.modules import module as _module

from .impl_choice import ImplChoice, operators_observed

EPS = 1e-6


class AttentionTap(nn.Module):
    """Identity on its argument: a hook point that exposes an attention block's internals.

    Softmax blocks call it as ``tap(attn_probs)``; :class:`AttentionTap3` takes three tensors (focused
    linear blocks: ``tap(phi_q, phi_k, v)``). It holds no state, so state_dicts are unchanged. (One class
    per arity: TorchScript compiles fixed signatures, no ``*args``.)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def hooked(self) -> bool:
        """True when a (module or global) forward hook would see this tap's tensors, or while the model is
        traced by ``torch.jit.trace`` or exported: softmax blocks then compute explicit probabilities
        instead of the fused ``scaled_dot_product_attention`` (same maths). Traced, so that FLOP counters
        (fvcore has no handle for the fused op) see its two matmuls; exported, because the ONNX exporter's
        decomposition of the fused op mis-tracks the output's strides and fails on the head merge after it.
        Always False in a TorchScript-compiled model (its hooks are not read)."""
        if torch.jit.is_scripting():
            return False
        return bool(self._forward_hooks or self._forward_pre_hooks or _module._global_forward_hooks
                    or _module._global_forward_pre_hooks or torch.jit.is_tracing() or torch.compiler.is_exporting())


class AttentionTap3(AttentionTap):
    """An :class:`AttentionTap` on three tensors, returned unchanged."""

    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor  # type: ignore[override]
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return a, b, c


# The two attention kinds a module declares with its ``attn_kind`` class attribute (what its tap receives):
ATTN_LINEAR = 'linear'      # tap(phi_q (B', N, C), phi_k (B', n, C), v (B', n, C))
ATTN_SOFTMAX = 'softmax'    # tap(probs (B', heads, N, n))


def focused_kernel(x: torch.Tensor, scale: torch.Tensor, focusing_factor: float, eps: float = EPS) -> torch.Tensor:
    """phi(x) for x (..., C): ReLU kernel, learned per-channel scale, focusing power with norm restoring.
    (``eps`` is an argument so that TorchScript, which reads no Python globals, sees the constant.)"""
    x = (F.relu(x) + eps) / F.softplus(scale)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    x = x ** focusing_factor
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True) * norm


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C / heads)."""
    B, N, C = x.shape
    return x.reshape(B, N, num_heads, C // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    B, h, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, h * d)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                     eps: float = EPS) -> torch.Tensor:
    """Normalised linear attention in O(N d^2).

    q: (B, N, C) feature-mapped queries; k, v: (B, n, C) feature-mapped keys and values.
    Returns (B, N, C). The 1/n factors match the official order of operations, which keeps
    K^T V of moderate size for long sequences.
    """
    n = k.shape[1]
    q, k, v = split_heads(q, num_heads), split_heads(k, num_heads), split_heads(v, num_heads)
    z = 1.0 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + eps)       # (B, h, N, 1)
    kv = (k.transpose(-2, -1) * n ** -0.5) @ (v * n ** -0.5)                  # (B, h, d, d)
    return merge_heads((q @ kv) * z)


def equivalent_attention(q: torch.Tensor, k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The dense (B, heads, N, n) matrix A with ``linear_attention(q, k, v) == A @ v`` per head.

    Quadratic: for analysis, tests and visualisation, never for the forward pass.
    """
    n = k.shape[1]
    qk = split_heads(q, num_heads) @ split_heads(k, num_heads).transpose(-2, -1)
    return qk / (qk.sum(dim=-1, keepdim=True) + n * EPS)


def interpolate_tokens(v: torch.Tensor, num_heads: int, length: int) -> torch.Tensor:
    """Stretch (B, n, C) tokens to (B, length, C) by 1-D linear interpolation per head channel over the
    flattened token order, as the official PVT code does before its dwc branch when keys are spatially
    reduced. (This treats the flattened 2-D grid as a 1-D signal; the published weights were trained so.)"""
    B, n, C = v.shape
    v = split_heads(v, num_heads).transpose(-2, -1).reshape(B * num_heads, C // num_heads, n)
    v = F.interpolate(v, size=length, mode='linear')
    return merge_heads(v.reshape(B, num_heads, C // num_heads, length).transpose(-2, -1))


# ----------------------------------------------------------------------------- fast path
# The same function as ``focused_kernel`` + ``linear_attention`` (+ the dwc branch), computed with fewer
# full-size temporaries: the kernel map, focusing power and norm restoration run in place on one buffer laid
# out per head (B, heads, N, d), the normaliser rides along the query-side product as one extra column of
# K^T [V, 1], the dwc runs on channels-last images of V (a view of the same per-head buffer), and the
# output is written straight into the (B, N, C) layout the projection reads. Both steps are autograd
# Functions with hand-derived backward passes (checked against the reference in the tests).
#
# Implementations: 'reference' (the plain formulas above), 'fast' (default) and 'triton' (the core as a
# Triton kernel on CUDA, see models/triton_linear_attention.py; opt-in until measured on a GPU).
IMPLEMENTATIONS = ('reference', 'fast', 'triton')
_IMPL = ImplChoice('attention implementation', IMPLEMENTATIONS, 'FLATTEN_ATTENTION_IMPL', 'fast')


def set_attention_impl(name: str) -> None:
    """Select how every focused linear attention computes: 'reference', 'fast' or 'triton'."""
    _IMPL.set(name)


def get_attention_impl() -> str:
    """The implementation selected by :func:`set_attention_impl` (or $FLATTEN_ATTENTION_IMPL; default 'fast')."""
    return _IMPL.name


def attention_impl(name: str) -> ContextManager[None]:
    """Context manager: ``with attention_impl('reference'): model(x)``."""
    return _IMPL.use(name)


def _token_norm(y: torch.Tensor) -> torch.Tensor:
    """||y|| over the full channel dim of a per-head buffer y (B, h, N, d) -> (B, N). (Reducing the
    contiguous last dim first is several times faster than one reduction over dims (1, 3).)"""
    return torch.linalg.vector_norm(y, dim=-1).square_().sum(1).sqrt_()


def kernel_input(x: torch.Tensor, pos: Optional[torch.Tensor], heads: int, dtype: torch.dtype) -> torch.Tensor:
    """relu(x + pos) as a new per-head buffer (B, h, N, d) of ``dtype``; x (B, N, C) may be any strided view."""
    B, N, C = x.shape
    xh = x.unflatten(-1, (heads, C // heads)).transpose(1, 2)
    y = torch.empty(B, heads, N, C // heads, dtype=dtype, device=x.device)
    if pos is None:
        y.copy_(xh)
    else:
        torch.add(xh, pos.unflatten(-1, (heads, C // heads)).transpose(1, 2), out=y)
    return y.clamp_min_(0)


def _pow_headroom(p: float) -> float:
    """2^-k with k = floor(40 / p): dividing values in (0, 1] by it before the power p scales the powers by
    2^(kp) <= 2^40 (exactly: a power of two), so their squares stay far from both float32 limits."""
    return math.ldexp(1.0, -int(40 // p)) if p >= 1 else 1.0


class _FocusedKernelFn(torch.autograd.Function):
    """phi(x + pos) per head: x (B, N, C), pos (1, N, C) or None, s = softplus(scale) (C,) -> (B, h, N, d).

    Forward: y = (relu(x + pos) + eps) / s, a = ||y||, u = (y / a)^p, phi = u * a / ||u||. Dividing by
    a first keeps every power in (0, 1], so the power cannot overflow whatever the magnitude of x. The
    division is by a * 2^-k instead (:func:`_pow_headroom`): u is then scaled by the power of two 2^(kp),
    which cancels exactly in u / ||u|| and keeps the squares inside ||u|| out of the float32 subnormal range
    (the zeros of the ReLU, eps / s / a ~ 1e-7, cubed and squared are ~1e-42: subnormal arithmetic runs ~50x
    slower on x86 and made this kernel 2-3x slower than the official formulas).
    Backward (b = ||u||, y^ = y / a, g = dL/dphi, c = g . u per token):
        dL/dy = (p y^^(p-1) (g - c u / b^2) + c y^) / b,   dL/dx = dL/dy / s * [x + pos > 0],
        dL/ds = -sum_tokens dL/dy * y / s.
    """

    @staticmethod
    def forward(ctx, x, pos, s, p, heads):
        B, N, C = x.shape
        sh = s.view(1, heads, 1, C // heads)
        y = kernel_input(x, pos, heads, s.dtype).add_(EPS).div_(sh)
        a = _token_norm(y)
        y.div_(a.view(B, 1, N, 1) * _pow_headroom(p)).pow_(p)
        y.mul_((a / _token_norm(y)).view(B, 1, N, 1))
        ctx.save_for_backward(x, pos, s)
        ctx.p, ctx.heads = p, heads
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, pos, s = ctx.saved_tensors
        p, heads = ctx.p, ctx.heads
        B, N, C = x.shape
        sh = s.view(1, heads, 1, C // heads)
        yhat = kernel_input(x, pos, heads, s.dtype).add_(EPS).div_(sh)            # y for now
        a = _token_norm(yhat).view(B, 1, N, 1)
        yhat.div_(a)
        u = yhat.div(_pow_headroom(p)).pow_(p)                                     # 2^(kp) (y / a)^p
        b = _token_norm(u).view(B, 1, N, 1)                                         # (scaled alike)
        tmp = g * u
        c = tmp.sum(-1).sum(1).view(B, 1, N, 1)
        dy = u.mul_(-c / b.square()).add_(g)                                        # g - c u / b^2
        # c and b carry the factor 2^(kp) of u: (p y^^(p-1) (g - c u / b^2) 2^(kp) + c y^) / b is dL/dy
        dy.mul_(torch.pow(yhat, p - 1, out=tmp)).mul_(p * _pow_headroom(p) ** -p).addcmul_(yhat, c).div_(b)
        ds = None
        if ctx.needs_input_grad[2]:
            ds = -torch.mul(dy, yhat, out=tmp).mul_(a).sum((0, 2)).reshape(C) / s
        dx = torch.empty(B, N, C, dtype=s.dtype, device=x.device)
        torch.div(dy, sh, out=dx.view(B, N, heads, C // heads).transpose(1, 2))
        dx.mul_((x if pos is None else x + pos) > 0)
        dpos = dx.sum(0, keepdim=True) if pos is not None and ctx.needs_input_grad[1] else None
        return dx.to(x.dtype), dpos, ds, None, None


class _LinearCoreFn(torch.autograd.Function):
    """Normalised linear attention per head with the normaliser folded into K^T [V, 1], written merged.

    phi_q (B, h, N, d), phi_k, v (B, h, n, d), residual (B, h, N, d)-shaped or None -> (B, N, h*d):
        kv' = K^T [V, 1] / n  (d, d + 1);  t = Q kv';  out = t[:, :d] / (t[:, d] + eps) (+ residual).
    Backward (z = 1 / (t[:, d] + eps), s_i = z_i g_i . t_i, w = [z g, -z s]):
        dQ = w kv'^T;  [dKV, dm] = Q^T w;  dK = [V, 1] [dKV, dm]^T / n;  dV = K dKV / n.
    """

    @staticmethod
    def forward(ctx, phi_q, phi_k, v, residual):
        B, h, N, d = phi_q.shape
        n = phi_k.shape[2]
        q, k, vf = phi_q.reshape(B * h, N, d), phi_k.reshape(B * h, n, d), v.reshape(B * h, n, d)
        kv = torch.cat([torch.bmm(k.transpose(1, 2), vf), k.sum(1).unsqueeze(-1)], dim=-1).div_(n)
        t = torch.bmm(q, kv)                                                     # (B*h, N, d + 1)
        den = t[..., d:] + EPS
        out = torch.empty(B, N, h * d, dtype=t.dtype, device=t.device)
        outh = out.view(B, N, h, d).transpose(1, 2)
        torch.div(t[..., :d].view(B, h, N, d), den.view(B, h, N, 1), out=outh)
        if residual is not None:
            outh.add_(residual)
        ctx.save_for_backward(q, k, vf, kv, t, den)
        ctx.shape = (B, h, N, d, n)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        q, k, vf, kv, t, den = ctx.saved_tensors
        B, h, N, d, n = ctx.shape
        gh = g.view(B, N, h, d).transpose(1, 2)
        z = den.reciprocal()                                                     # (B*h, N, 1)
        w = torch.empty(B * h, N, d + 1, dtype=t.dtype, device=t.device)
        torch.mul(gh, z.view(B, h, N, 1), out=w[..., :d].view(B, h, N, d))
        w[..., d:] = -z * torch.linalg.vecdot(w[..., :d], t[..., :d]).unsqueeze(-1)
        dq = torch.bmm(w, kv.transpose(1, 2)).view(B, h, N, d)
        grad = torch.bmm(q.transpose(1, 2), w)                                   # [dKV, dm] (B*h, d, d + 1)
        dk = torch.baddbmm(grad[..., d:].transpose(1, 2), vf, grad[..., :d].transpose(1, 2)).div_(n)
        dv = torch.bmm(k, grad[..., :d]).div_(n)
        dres = gh if ctx.needs_input_grad[3] else None
        return dq, dk.view(B, h, n, d), dv.view(B, h, n, d), dres


def fast_focused_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                                  pos: Optional[torch.Tensor], focusing_factor: float, num_heads: int,
                                  dwc: Optional[nn.Conv2d] = None, hw: Optional[Tuple[int, int]] = None,
                                  core: Optional[Callable] = None, tap: Optional[Callable] = None,
                                  feature_map: Optional[Callable] = None) -> torch.Tensor:
    """``linear_attention(phi(q), phi(k + pos), v) (+ dwc branch on v laid out as hw)``, the fast way.

    q (B, N, C), k, v (B, n, C), any strides (e.g. views of one qkv projection); scale (1, 1, C) raw;
    pos (1, n, C) or None. Returns (B, N, C) in v's dtype. The maths runs in at least float32 (the power p
    overflows float16 otherwise); the dwc convolution runs in v's dtype, as in the reference.
    ``core(phi_q, phi_k, v, residual)`` replaces the product (the Triton kernel plugs in here);
    ``feature_map(x, pos, s, p, heads)`` replaces the focused kernel (tools/latency.py times the rest); ``tap``, when
    given, is called on (phi_q, phi_k, v) in the (B, n, C) layout for observation (its result is not used).
    """
    B, N, C = q.shape
    h, d = num_heads, C // num_heads
    dtype = v.dtype
    compute = torch.promote_types(dtype, torch.float32)
    vh = v.unflatten(-1, (h, d)).transpose(1, 2).contiguous()                    # (B, h, n, d)
    residual = None
    if dwc is not None:
        H, W = hw
        maps = vh.view(B * h, H, W, d).permute(0, 3, 1, 2)                      # channels-last images
        residual = dwc(maps).permute(0, 2, 3, 1).reshape(B, h, N, d)             # a view when channels-last
    with torch.autocast(device_type=v.device.type, enabled=False):
        s = F.softplus(scale.to(compute)).reshape(C)
        phi = feature_map or _FocusedKernelFn.apply
        phi_q = phi(q, None, s, focusing_factor, h)
        phi_k = phi(k, None if pos is None else pos.to(compute), s, focusing_factor, h)
        if tap is not None:
            tap(merge_heads(phi_q), merge_heads(phi_k), v.to(compute))
        vc = vh.to(compute)
        if core is not None and dtype == torch.bfloat16:
            # bfloat16 has float32's range: the Triton core reads bf16 operands and accumulates in float32
            phi_q, phi_k, vc = phi_q.to(dtype), phi_k.to(dtype), vh
        out = (core or _LinearCoreFn.apply)(phi_q, phi_k, vc, None if residual is None else residual.to(compute))
    return out.to(dtype)


def _triton_core(q: torch.Tensor, head_dim: int) -> Optional[Callable]:
    from .triton_linear_attention import triton_core_for      # imports Triton: only when selected
    return triton_core_for(q, head_dim)


class FocusedLinearAttentionBase(nn.Module):
    """Owns the focused-linear parameters and maths; subclasses own the projections and token layout.

    Args:
        dim: channels C of q, k, v.
        num_heads: heads; the dwc kernel has head_dim = C / heads channels and is shared by all heads.
        num_kv_tokens: n, the key length the positional encoding is learned for.
        focusing_factor: the power p.
        kernel_size: the dwc kernel size (odd).
    """

    attn_kind = ATTN_LINEAR
    focusing_factor: float      # TorchScript: a float attribute even when built with an int (p = 3)

    def __init_subclass__(cls, **kwargs) -> None:
        # A leaf for timm's fx tracer: the graph calls the module, which then runs the implementation that
        # eager mode runs (bitwise the same outputs), instead of tracing its reference formulas.
        super().__init_subclass__(**kwargs)
        register_notrace_module(cls)
        # TorchScript types attributes from the annotations of ONE class (the first in the MRO that has any):
        # give each subclass those of all its bases (mixins too), e.g. ``focusing_factor: float``.
        cls.__annotations__ = {name: ann for base in reversed(cls.__mro__) if not issubclass(nn.Module, base)
                               for name, ann in inspect.get_annotations(base).items()}

    def __init__(self, dim: int, num_heads: int, num_kv_tokens: int, focusing_factor: float = 3,
                 kernel_size: int = 5) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.dim = dim
        self.num_heads = num_heads
        self.focusing_factor = focusing_factor
        head_dim = dim // num_heads
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size=kernel_size, groups=head_dim,
                             padding=kernel_size // 2)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        self.positional_encoding = nn.Parameter(torch.zeros(1, num_kv_tokens, dim))
        self.tap = AttentionTap3()

    def dwc_last(self) -> None:
        """Move ``dwc`` behind the modules a subclass added, so that ``state_dict()`` and ``parameters()``
        list keys in the official order (own parameters, projections, then dwc): official optimizer
        states, matched by position, then line up too. Subclasses call it at the end of ``__init__``."""
        self._modules['dwc'] = self._modules.pop('dwc')

    def kv_positional_encoding(self, n: int) -> torch.Tensor:
        """The (1, n, C) encoding added to n keys. Here the learned one; families that run at other input
        sizes (``dynamic_img_size``) override it to resample the encoding to the current key grid."""
        return self.positional_encoding

    def feature_map(self, q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """phi(q), phi(k + positional encoding); q (B, N, C), k (B, n, C)."""
        return (focused_kernel(q, self.scale, self.focusing_factor),
                focused_kernel(k + self.kv_positional_encoding(k.shape[1]), self.scale, self.focusing_factor))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Focused linear attention of raw projections q (B, N, C), k, v (B, n, C) -> (B, N, C); with
        ``hw`` (the (H, W) layout of v's n tokens) the dwc branch is included: ``+ rank_restoration(v, hw)``.

        Computed in at least float32 even under autocast (the focusing power p can overflow float16);
        float64 inputs stay float64. Returns v's dtype. Runs the implementation chosen with
        :func:`set_attention_impl` (the reference formulas while a tool traces or counts operators:
        :func:`~models.impl_choice.operators_observed`). A hooked ``tap``
        sees (phi_q, phi_k, v) as (B, n, C) tensors either way (the fast path then merges copies of its
        per-head buffers for it; results are unchanged).
        """
        if torch.jit.is_scripting():        # TorchScript compiles the reference formulas only
            out = self.reference_attention(q, k, v)
        else:
            impl = get_attention_impl()
            # While operators are observed (fvcore / jit.trace, fx, torch.compile / export, FlopCounterMode)
            # the plain formulas run instead: the fast path's autograd Functions hide their matmuls from
            # tracers and counters, and inductor fuses the plain formulas itself (faster than the eager fast
            # path on CPU).
            if impl != 'reference' and not operators_observed():
                core = _triton_core(q, self.dim // self.num_heads) if impl == 'triton' else None
                return fast_focused_linear_attention(q, k, v, self.scale, self.kv_positional_encoding(k.shape[1]),
                                                     self.focusing_factor, self.num_heads,
                                                     None if hw is None else self.dwc, hw, core,
                                                     self.tap if self.tap.hooked() else None)
            # a plain fx trace (not timm's) sees a Proxy for the device: the graph records no autocast region
            no_autocast = (contextlib.nullcontext() if is_fx_symbolic_tracing()
                           else torch.autocast(device_type=v.device.type, enabled=False))
            with no_autocast:
                out = self.reference_attention(q, k, v)
        return out if hw is None else out + self.rank_restoration(v, hw)

    def reference_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The plain formulas of :meth:`attend` without the dwc branch, in at least float32; returns v's
        dtype. (The caller turns autocast off around it.)"""
        dtype = v.dtype
        compute = torch.promote_types(dtype, torch.float32)
        qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
        qc, kc = self.feature_map(qc, kc)
        qc, kc, vc = self.tap(qc, kc, vc)
        return linear_attention(qc, kc, vc, self.num_heads).to(dtype)

    def rank_restoration(self, v: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """The dwc branch: v (B, H*W, C) as per-head images (B*heads, head_dim, H, W) -> (B, H*W, C)."""
        B, N, C = v.shape
        H, W = hw
        maps = split_heads(v, self.num_heads).reshape(B * self.num_heads, H, W, C // self.num_heads)
        out = self.dwc(maps.permute(0, 3, 1, 2))                   # (B*h, d, H, W), channels-last memory
        return merge_heads(out.permute(0, 2, 3, 1).reshape(B, self.num_heads, N, C // self.num_heads))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, focusing_factor={self.focusing_factor}, '
                f'kv_tokens={self.positional_encoding.shape[1]}, kernel_size={self.dwc.kernel_size[0]}')


# ----------------------------------------------------------------------------- experiment config
def _check_attn_type(value: str) -> Optional[str]:
    if not value or set(value) - {'L', 'S'}:
        return (f"must be letters 'L' (focused linear) or 'S' (softmax), one per stage, e.g. 'LLSS'; "
                f"got {value!r}")
    return None


def _check_sr_ratios(value: str) -> Optional[str]:
    if len(value) != 4 or not value.isdigit() or '0' in value:
        return f"must be 4 non-zero digits, one per stage (e.g. '8421' or '1111'); got {value!r}"
    return None


def _check_split(value: str) -> Optional[str]:
    parts = str(value).split('-')
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        return f"must be 4 positive integers joined by '-', e.g. '56-28-14-7'; got {value!r}"
    return None


def _check_kernel(value: int) -> Optional[str]:
    return None if value > 0 and value % 2 else f'must be a positive odd number, got {value}'


def _build_section():
    from .config_adapter import ConfigKey, ConfigSection, config_section
    return config_section(ConfigSection('LA', (
        ConfigKey('FOCUSING_FACTOR', 3, 'focusing_factor'),
        ConfigKey('KERNEL_SIZE', 5, 'kernel_size', check=_check_kernel),
        ConfigKey('ATTN_TYPE', 'LLLL', 'attn_type', check=_check_attn_type, doc="one letter per stage"),
        ConfigKey('PVT_LA_SR_RATIOS', '1111', 'la_sr_ratios', check=_check_sr_ratios,
                  doc='one digit per stage (an integer like 8421 is accepted)'),
        ConfigKey('CSWIN_LA_SPLIT_SIZE', '56-28-14-7', 'la_split', check=_check_split,
                  convert=lambda v: tuple(int(s) for s in str(v).split('-'))),
        # read by MODEL.ATTENTION: focused_linear (models/attention_convert.py), not passed to the families
        ConfigKey('BLOCKS', [], doc='block indices to convert; [] = every block'),
        ConfigKey('DWC', True, doc='the DWC branch (False: Table 4 without DWC)'),
        ConfigKey('FOCUSED', True, doc='the focusing function (False: vanilla linear attention, Table 4)'),
    ), shared=True))


# MODEL.LA: the focused linear attention keys of the official configs, read by every FLatten family (each
# reads the keys it uses; shared=True: e.g. the official Swin YAMLs also set PVT_LA_SR_RATIOS).
LA_SECTION = _build_section()
