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
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-6


class AttentionTap(nn.Module):
    """Identity on its arguments: a hook point that exposes an attention block's internals.

    Focused linear blocks call it as ``tap(phi_q, phi_k, v)``; softmax blocks as ``tap(attn_probs)``.
    It holds no state, so state_dicts are unchanged.
    """

    def forward(self, *tensors: torch.Tensor):
        return tensors if len(tensors) > 1 else tensors[0]


def focused_kernel(x: torch.Tensor, scale: torch.Tensor, focusing_factor: float) -> torch.Tensor:
    """phi(x) for x (..., C): ReLU kernel, learned per-channel scale, focusing power with norm restoring."""
    x = (F.relu(x) + EPS) / F.softplus(scale)
    norm = x.norm(dim=-1, keepdim=True)
    x = x ** focusing_factor
    return x / x.norm(dim=-1, keepdim=True) * norm


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C / heads)."""
    B, N, C = x.shape
    return x.reshape(B, N, num_heads, C // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    B, h, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, h * d)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Normalised linear attention in O(N d^2).

    q: (B, N, C) feature-mapped queries; k, v: (B, n, C) feature-mapped keys and values.
    Returns (B, N, C). The 1/n factors match the official order of operations, which keeps
    K^T V of moderate size for long sequences.
    """
    n = k.shape[1]
    q, k, v = (split_heads(t, num_heads) for t in (q, k, v))
    z = 1.0 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + EPS)       # (B, h, N, 1)
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


class FocusedLinearAttentionBase(nn.Module):
    """Owns the focused-linear parameters and maths; subclasses own the projections and token layout.

    Args:
        dim: channels C of q, k, v.
        num_heads: heads; the dwc kernel has head_dim = C / heads channels and is shared by all heads.
        num_kv_tokens: n, the key length the positional encoding is learned for.
        focusing_factor: the power p.
        kernel_size: the dwc kernel size (odd).
    """

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
        self.tap = AttentionTap()

    def dwc_last(self) -> None:
        """Move ``dwc`` behind the modules a subclass added, so that ``state_dict()`` and ``parameters()``
        list keys in the official order (own parameters, projections, then dwc): official optimizer
        states, matched by position, then line up too. Subclasses call it at the end of ``__init__``."""
        self._modules['dwc'] = self._modules.pop('dwc')

    def feature_map(self, q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """phi(q), phi(k + positional encoding); q (B, N, C), k (B, n, C)."""
        return (focused_kernel(q, self.scale, self.focusing_factor),
                focused_kernel(k + self.positional_encoding, self.scale, self.focusing_factor))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Focused linear attention of raw projections q (B, N, C), k, v (B, n, C) -> (B, N, C).

        Computed in at least float32 even under autocast (the focusing power p can overflow float16);
        float64 inputs stay float64. Returns v's dtype.
        """
        dtype = v.dtype
        compute = torch.promote_types(dtype, torch.float32)
        with torch.autocast(device_type=v.device.type, enabled=False):
            q, k, v = q.to(compute), k.to(compute), v.to(compute)
            q, k = self.feature_map(q, k)
            q, k, v = self.tap(q, k, v)
            out = linear_attention(q, k, v, self.num_heads)
        return out.to(dtype)

    def rank_restoration(self, v: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """The dwc branch: v (B, H*W, C) as per-head images (B*heads, head_dim, H, W) -> (B, H*W, C)."""
        B, N, C = v.shape
        H, W = hw
        maps = split_heads(v, self.num_heads).reshape(B * self.num_heads, H, W, C // self.num_heads)
        out = self.dwc(maps.permute(0, 3, 1, 2))                                  # (B*h, d, H, W)
        return out.reshape(B, C, N).transpose(1, 2)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, focusing_factor={self.focusing_factor}, '
                f'kv_tokens={self.positional_encoding.shape[1]}, kernel_size={self.dwc.kernel_size[0]}')
