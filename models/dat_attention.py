"""DAT++'s attention kinds, each on an NCHW map -> same shape (the blocks of :class:`models.dat.DAT`):

* 'N' :class:`NeighborhoodAttention`: natten 0.14.6 semantics, run without natten
  (:mod:`models.neighborhood_attention`);
* 'D' :class:`DeformableAttention`: the official DAttentionBaseline, its half-cell reference-grid quirk kept;
* 'L' / 'S' :class:`DatWindowAttention`: window / shifted window, on the shared
  :class:`models.layers.WindowAttention`.

Parameter names are the official ones (:mod:`models.dat` lists the one rename, of 'L'/'S').
"""

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function, register_notrace_module, trunc_normal_

from .focused_attention import AttentionTap, AttentionTap3
from .layers import WindowAttention, shifted_window_mask, window_partition, window_reverse
from .neighborhood_attention import neighborhood_attention, neighborhood_av, neighborhood_probs

__all__ = ['ATTN_DEFORMABLE', 'ATTN_NEIGHBORHOOD', 'LayerNormProxy', 'NeighborhoodAttention', 'DeformableAttention',
           'DatWindowAttention', 'reference_points', 'query_grid', 'check_window_map']


# What each attention kind's tap receives:
#   deformable:   tap(pos (B, g, Hk, Wk, 2), reference (B, g, Hk, Wk, 2), probs (B*heads, H*W, Hk*Wk)), (y, x)
#   neighborhood: tap(probs (B, heads, H, W, k*k)) in natten's layout, called only when the tap is hooked
ATTN_DEFORMABLE = 'deformable'
ATTN_NEIGHBORHOOD = 'neighborhood'


class LayerNormProxy(nn.Module):
    """LayerNorm over the channels of an NCHW map; parameters ``norm.weight`` / ``norm.bias``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

# ----------------------------------------------------------------------------- 'N'
@register_notrace_module    # one fx node (timm's tracer): the graph runs the eager fast path, bitwise as eager
class NeighborhoodAttention(nn.Module):
    """Neighbourhood attention (natten 0.14.6 semantics, dilation 1) on an NCHW map -> same shape.

    Keys ``rpb`` (heads, 2k-1, 2k-1), ``qkv``, ``proj`` (Linear). A map smaller than the kernel is
    zero-padded at the bottom/right before ``qkv`` (padded tokens carry the qkv bias) and cropped after."""

    attn_kind = ATTN_NEIGHBORHOOD

    def __init__(self, dim: int, kernel_size: int, num_heads: int, attn_drop: float = 0.,
                 proj_drop: float = 0.) -> None:
        super().__init__()
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f'nat_ksizes={kernel_size}: the neighbourhood kernel must be odd and >= 3')
        if dim % num_heads:
            raise ValueError(f'heads={num_heads} must divide the stage width dims={dim}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.kernel_size = kernel_size
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.tap = AttentionTap()
        trunc_normal_(self.rpb, std=.02, a=-2., b=2.)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        B, H0, W0, C = x.shape
        k = self.kernel_size
        if H0 < k or W0 < k:
            x = F.pad(x, (0, 0, 0, max(0, k - W0), 0, max(0, k - H0)))
        H, W = x.shape[1:3]
        q, key, v = self.qkv(x).reshape(B, H, W, 3, self.num_heads, self.head_dim).permute(3, 0, 4, 1, 2, 5).unbind(0)
        q = q * self.scale
        if self.tap.hooked() and not torch.jit.is_tracing():   # probabilities are read: explicit path
            attn = self.attn_drop(self.tap(neighborhood_probs(q, key, self.rpb.to(q.dtype), k)))
            out = neighborhood_av(attn, v, k)
        else:
            drop = self.attn_drop.p if self.training else 0.
            out = neighborhood_attention(q, key, v, self.rpb.to(q.dtype), k, dropout_p=drop)
        out = out.permute(0, 2, 3, 1, 4).reshape(B, H, W, C)[:, :H0, :W0]
        return self.proj_drop(self.proj(out)).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, kernel_size={self.kernel_size}'


# ----------------------------------------------------------------------------- 'D'
def reference_points(Hk: int, Wk: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(Hk, Wk, 2) (y, x) key reference points, the official grid: cell centres (i + 0.5) divided by
    (n - 1), mapped to [-1, 1]; the last row/column lies outside [-1, 1] (the clamp pulls it back)."""
    ys = torch.linspace(0.5, Hk - 0.5, Hk, dtype=dtype, device=device) / (Hk - 1.0) * 2.0 - 1.0
    xs = torch.linspace(0.5, Wk - 0.5, Wk, dtype=dtype, device=device) / (Wk - 1.0) * 2.0 - 1.0
    # .to: a no-op in eager; under torch.jit.trace (the TorchScript-based ONNX exporter) the traced size
    # makes (n - 1.0) a float64 tensor, and the grid must stay in ``dtype``
    return torch.stack(torch.meshgrid([ys, xs], indexing='ij'), dim=-1).to(dtype)


def query_grid(H: int, W: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(H, W, 2) (y, x) query pixel centres in align-corners coordinates: index / (n - 1) * 2 - 1."""
    ys = torch.arange(H, dtype=dtype, device=device) / (H - 1.0) * 2.0 - 1.0
    xs = torch.arange(W, dtype=dtype, device=device) / (W - 1.0) * 2.0 - 1.0
    return torch.stack(torch.meshgrid([ys, xs], indexing='ij'), dim=-1).to(dtype)     # .to: see reference_points


@register_notrace_module    # one fx node (timm's tracer): sampling positions and key grid depend on the map size
class DeformableAttention(nn.Module):
    """Deformable multi-head attention (DAttentionBaseline) on an NCHW map -> same shape.

    Queries are all H x W positions; keys/values are the block input sampled (bilinearly, align-corners)
    at Hk x Wk points per offset group: reference points + offsets predicted from the queries by
    ``conv_offset`` (depth-wise ksize conv with ``stride`` -> LayerNorm -> GELU -> 1x1 conv to 2 channels,
    shared by the groups). The relative position bias is sampled from ``rpe_table`` (heads, 2*q_h-1,
    2*q_w-1) at the query-to-key displacement. Args follow the official names; ``q_size`` is the map size
    the table is built for."""

    attn_kind = ATTN_DEFORMABLE

    def __init__(self, dim: int, num_heads: int, groups: int, q_size: Tuple[int, int], stride: int, ksize: int,
                 offset_range_factor: float = -1, use_pe: bool = True, no_off: bool = False,
                 attn_drop: float = 0., proj_drop: float = 0.) -> None:
        super().__init__()
        if dim % num_heads or num_heads % groups:
            raise ValueError(f'groups={groups} must divide heads={num_heads}, which must divide dims={dim}')
        if stride < 1 or ksize < 1:
            raise ValueError(f'strides={stride} and ksizes={ksize} must be positive')
        self.dim, self.num_heads, self.groups = dim, num_heads, groups
        self.head_dim = dim // num_heads
        self.group_channels = dim // groups
        self.group_heads = num_heads // groups
        self.scale = self.head_dim ** -0.5
        self.q_size = q_size
        self.stride, self.ksize = stride, ksize
        self.offset_range_factor = offset_range_factor
        self.use_pe, self.no_off = use_pe, no_off
        gc = self.group_channels
        self.conv_offset = nn.Sequential(
            nn.Conv2d(gc, gc, ksize, stride, ksize // 2 if ksize != stride else 0, groups=gc),
            LayerNormProxy(gc),
            nn.GELU(),
            nn.Conv2d(gc, 2, 1, bias=False))
        if no_off:
            self.conv_offset.requires_grad_(False)
        self.proj_q = nn.Conv2d(dim, dim, 1)
        self.proj_k = nn.Conv2d(dim, dim, 1)
        self.proj_v = nn.Conv2d(dim, dim, 1)
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_drop = nn.Dropout(attn_drop)
        if use_pe and not no_off:
            self.rpe_table = nn.Parameter(torch.zeros(num_heads, 2 * q_size[0] - 1, 2 * q_size[1] - 1))
            trunc_normal_(self.rpe_table, std=.01)
        else:
            self.rpe_table = None
        self.tap = AttentionTap3()

    def sample_positions(self, q: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sampling positions and reference points, each (B*g, Hk, Wk, 2) (y, x) in [-1, 1] coordinates;
        the reference grid in ``dtype`` (the block input's, as officially)."""
        B, C, H, W = q.shape
        offset = self.conv_offset(q.reshape(B * self.groups, self.group_channels, H, W))   # (Bg, 2, Hk, Wk)
        Hk, Wk = offset.shape[-2:]
        if Hk < 2 or Wk < 2:
            raise ValueError(f'a deformable block on a {H}x{W} map with strides={self.stride} samples a '
                             f'{Hk}x{Wk} key grid; it needs at least 2x2 (use a larger image or smaller stride)')
        if self.offset_range_factor >= 0 and not self.no_off:
            limit = torch.tensor([1.0 / (Hk - 1.0), 1.0 / (Wk - 1.0)], dtype=offset.dtype, device=offset.device)
            offset = offset.tanh() * limit.view(1, 2, 1, 1) * self.offset_range_factor
        offset = offset.permute(0, 2, 3, 1)
        with torch.no_grad():
            reference = reference_points(Hk, Wk, dtype, q.device).expand(B * self.groups, Hk, Wk, 2)
        if self.no_off:
            offset = torch.zeros_like(offset)
        pos = offset + reference
        if self.offset_range_factor < 0:
            pos = pos.clamp(-1., 1.)
        return pos, reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if H < 2 or W < 2:
            raise ValueError(f'a deformable block needs a map of at least 2x2, got {H}x{W}')
        g, heads, d = self.groups, self.num_heads, self.head_dim
        q = self.proj_q(x)
        pos, reference = self.sample_positions(q, x.dtype)
        Hk, Wk = pos.shape[1:3]
        n = Hk * Wk
        if self.no_off:
            sampled = F.avg_pool2d(x, kernel_size=self.stride, stride=self.stride)
        else:
            sampled = F.grid_sample(x.reshape(B * g, self.group_channels, H, W), pos.flip(-1),
                                    mode='bilinear', align_corners=True)               # (Bg, gc, Hk, Wk)
        sampled = sampled.reshape(B, C, 1, n)
        q = q.reshape(B * heads, d, H * W)
        k = self.proj_k(sampled).reshape(B * heads, d, n)
        v = self.proj_v(sampled).reshape(B * heads, d, n)
        attn = torch.einsum('b c m, b c n -> b m n', q, k) * self.scale              # (B*heads, HW, n)
        rpe_table = self.rpe_table        # a local: TorchScript refines an Optional local, not an attribute
        if rpe_table is not None:
            displacement = (query_grid(H, W, x.dtype, x.device).reshape(1, H * W, 1, 2)
                            - pos.reshape(B * g, 1, n, 2)) * 0.5                      # (Bg, HW, n, 2) in [-1, 1]
            table = rpe_table.to(x.dtype)[None].expand(B, -1, -1, -1)
            table = table.reshape(B * g, self.group_heads, rpe_table.shape[-2], rpe_table.shape[-1])
            bias = F.grid_sample(table, displacement.flip(-1), mode='bilinear', align_corners=True)
            attn = attn + bias.reshape(B * heads, H * W, n)
        attn = attn.softmax(dim=2)
        pos_out, ref_out, attn = self.tap(pos.reshape(B, g, Hk, Wk, 2), reference.reshape(B, g, Hk, Wk, 2),
                                          attn)
        attn = self.attn_drop(attn)
        out = torch.einsum('b m n, b c n -> b c m', attn, v).reshape(B, C, H, W)
        return self.proj_drop(self.proj_out(out))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, groups={self.groups}, q_size={self.q_size}, '
                f'stride={self.stride}, ksize={self.ksize}, offset_range_factor={self.offset_range_factor}')


# ----------------------------------------------------------------------------- 'L' / 'S'
@register_notrace_function  # an fx leaf (timm's tracer and torch.fx): the check runs on the real map
def check_window_map(x: torch.Tensor, window: int, fmap_size: Optional[Tuple[int, int]]) -> torch.Tensor:
    """``x`` (B, C, H, W) unchanged; a ValueError when the windows do not tile the map, or when a shifted
    block (``fmap_size``: the map its mask is built for) gets another map size."""
    H, W = x.shape[-2:]
    if H % window or W % window:
        raise ValueError(f'window_sizes={window} must divide the {H}x{W} map of a window block')
    if fmap_size is not None and (H != fmap_size[0] or W != fmap_size[1]):
        raise ValueError(f"an 'S' block's mask is built for a {fmap_size} map (from img_size) but got "
                         f"{H}x{W}; set img_size to the input size")
    return x


torch.fx.wrap('check_window_map')


class DatWindowAttention(WindowAttention):
    """'L' (window) / 'S' (shifted window, shift ceil(w/2)) attention on an NCHW map, built on the shared
    :class:`WindowAttention`. The map must tile into windows; 'S' keeps the official ``attn_mask`` buffer,
    made for ``fmap_size``."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int = 0,
                 fmap_size: Optional[Tuple[int, int]] = None, attn_drop: float = 0., proj_drop: float = 0.) -> None:
        super().__init__(dim, window, num_heads, attn_drop=attn_drop, proj_drop=proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=.01)
        self.shift = shift
        self.fmap_size = fmap_size
        if shift:
            if not 0 < shift < window:
                raise ValueError(f'window_sizes={window}: the shift {shift} must lie in (0, window)')
            self.register_buffer('attn_mask', shifted_window_mask(fmap_size, window, shift))
        else:
            self.attn_mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        B, C, H, W = x.shape
        w = self.window
        x = check_window_map(x, w, self.fmap_size if self.shift else None)
        y = x.permute(0, 2, 3, 1)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = self.attend_windows(window_partition(y, w), self.attn_mask)
        y = window_reverse(windows, w, H, W)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        return y.permute(0, 3, 1, 2)
