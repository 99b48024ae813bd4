"""2-D neighbourhood attention with natten 0.14.6's semantics, in plain PyTorch (no natten needed).

Definition (dilation 1, kernel k odd, r = k // 2), per axis of length L >= k: query i attends to the k
keys s(i) .. s(i) + k - 1 with s(i) = clamp(i - r, 0, L - k). Near a border the window is *shifted*
inward, never shrunk or padded, so every query has exactly k^2 keys. The bias added for key (y, x) of
query (i, j) is ``rpb[head, y - i + k - 1, x - j + k - 1]`` (the true offset, so border queries read the
outer part of the (2k-1, 2k-1) table). Attention entries are ordered row-major over the window.

Two implementations:
  * :func:`neighborhood_attention_naive`: gathers the k^2 keys of every query (natten's (B, heads, H, W,
    k^2) attention layout, memory O(N k^2 d)); simple, used for visualisation and as the slow baseline.
  * :func:`neighborhood_attention`: the fast path. Queries are cut into T x T tiles (:func:`auto_tile`); the windows of a
    tile's queries all lie in one (T+k-1) x (T+k-1) key region (clamped into the map), so each tile is
    a small dense attention over its region with an additive mask that holds the bias inside each query's
    window and -inf outside it (one batched matmul / SDPA call for all tiles). It is wrapped in an
    autograd Function (:class:`NeighborhoodAttention2D`) whose backward recomputes the tile attention.
    While a tool traces or counts operators (fvcore / ``torch.jit.trace``, the ONNX exporters,
    ``torch.export``, ``FlopCounterMode``) the gather path runs instead: the same attention in plain
    operators whose products are exactly natten's FLOP count (:func:`natten_flops`).

An installed ``natten`` that still has relative position bias (0.14 to 0.17) can serve the fast path instead:
``set_neighborhood_impl('natten')`` or ``DAT_NEIGHBORHOOD_IMPL=natten`` (an option, never a requirement;
default 'torch'). natten 0.20+ dropped the bias that DAT++'s 'N' blocks use, so it is refused with an error.
"""

import inspect
import math
from functools import lru_cache
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from errors import ConfigError

from .impl_choice import ImplChoice, OpBenchmark, operators_observed, register_op_benchmark

__all__ = ['window_starts', 'neighborhood_attention', 'neighborhood_attention_naive', 'neighborhood_probs',
           'neighborhood_av',
           'NeighborhoodAttention2D', 'natten_flops', 'DEFAULT_TILE', 'NEIGHBORHOOD_IMPLS',
           'set_neighborhood_impl', 'get_neighborhood_impl', 'neighborhood_impl', 'natten_functions']

DEFAULT_TILE = 8


def window_starts(length: int, kernel_size: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """(length,) int64: the first key index s(i) = clamp(i - k//2, 0, length - k) of each query."""
    if length < kernel_size:
        raise ValueError(f'neighbourhood attention needs a map side >= kernel_size={kernel_size}, got {length} '
                         f'(pad the map first, as NeighborhoodAttention does)')
    i = torch.arange(length, device=device)
    return (i - kernel_size // 2).clamp(0, length - kernel_size)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor, kernel_size: int) -> None:
    if q.dim() != 5 or q.shape != k.shape or q.shape[:-1] != v.shape[:-1]:
        raise ValueError(f'q, k, v must be (B, heads, H, W, head_dim) of one shape; got {tuple(q.shape)}, '
                         f'{tuple(k.shape)}, {tuple(v.shape)}')
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f'kernel_size={kernel_size} must be a positive odd number')
    want = (q.shape[1], 2 * kernel_size - 1, 2 * kernel_size - 1)
    if tuple(rpb.shape) != want:
        raise ValueError(f'rpb must be (heads, 2k-1, 2k-1) = {want}, got {tuple(rpb.shape)}')


# ----------------------------------------------------------------------------- naive (gather) path
def _window_index(H: int, W: int, kernel_size: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """key rows (H, k), key cols (W, k) of every query's window, and the flat key index (H*W, k*k)."""
    ar = torch.arange(kernel_size, device=device)
    rows = window_starts(H, kernel_size, device)[:, None] + ar
    cols = window_starts(W, kernel_size, device)[:, None] + ar
    flat = (rows[:, None, :, None] * W + cols[None, :, None, :]).reshape(H * W, kernel_size * kernel_size)
    return rows, cols, flat


def _window_bias(rpb: torch.Tensor, H: int, W: int, kernel_size: int) -> torch.Tensor:
    """(heads, H, W, k*k) bias of every query's window entries, indexed by the true offset."""
    rows, cols, _ = _window_index(H, W, kernel_size, rpb.device)
    dy = rows - torch.arange(H, device=rpb.device)[:, None] + kernel_size - 1       # (H, k)
    dx = cols - torch.arange(W, device=rpb.device)[:, None] + kernel_size - 1       # (W, k)
    bias = rpb[:, dy[:, None, :, None], dx[None, :, None, :]]                      # (h, H, W, k, k)
    return bias.reshape(rpb.shape[0], H, W, kernel_size * kernel_size)


def neighborhood_probs(q: torch.Tensor, k: torch.Tensor, rpb: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Attention probabilities in natten's layout: (B, heads, H, W, k*k), softmax over the window.

    q (already scaled) and k: (B, heads, H, W, head_dim); rpb (heads, 2k-1, 2k-1)."""
    B, h, H, W, d = q.shape
    _, _, flat = _window_index(H, W, kernel_size, q.device)
    keys = k.reshape(B, h, H * W, d)[:, :, flat]                                   # (B, h, HW, k*k, d)
    # the bias enters the product as one more channel, logits = [q, 1] . [k_j, rpb_ij]: natten's own FLOP
    # rule (QK + RPB: k^2 (d + 1) multiply-adds per query and head), so counters that see this product agree
    bias = _window_bias(rpb, H, W, kernel_size).to(q.dtype).reshape(1, h, H * W, kernel_size * kernel_size, 1)
    keys = torch.cat([keys, bias.expand(B, -1, -1, -1, -1)], dim=-1)               # (B, h, HW, k*k, d + 1)
    q1 = torch.cat([q.reshape(B, h, H * W, 1, d), q.new_ones([B, h, H * W, 1, 1])], dim=-1)
    logits = q1 @ keys.transpose(-2, -1)          # a matmul, not einsum: fvcore prices einsum to 4 digits
    return logits.reshape(B, h, H, W, -1).softmax(dim=-1)


def neighborhood_av(attn: torch.Tensor, v: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Weighted sum of each query's window values: attn (B, heads, H, W, k*k), v (B, heads, H, W, d) -> like v."""
    B, h, H, W, d = v.shape
    _, _, flat = _window_index(H, W, kernel_size, v.device)
    values = v.reshape(B, h, H * W, d)[:, :, flat]                                 # (B, h, HW, k*k, d)
    out = attn.reshape(B, h, H * W, 1, -1) @ values
    return out.reshape(B, h, H, W, d)


def neighborhood_attention_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor,
                                 kernel_size: int) -> torch.Tensor:
    """Gather-based neighbourhood attention: (B, heads, H, W, head_dim) -> same shape. q is pre-scaled."""
    _check(q, k, v, rpb, kernel_size)
    return neighborhood_av(neighborhood_probs(q, k, rpb, kernel_size), v, kernel_size)


# ----------------------------------------------------------------------------- fast (tiled) path
def auto_tile(length: int, kernel_size: int) -> int:
    """Tile side for one axis: the whole axis when it is short (<= 2k + 2: one dense tile beats several
    overlapping regions), else DEFAULT_TILE."""
    return length if length <= 2 * kernel_size + 2 else DEFAULT_TILE


@lru_cache(maxsize=64)
def _axis_plan(length: int, kernel_size: int, tile: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor]:
    """Cached :func:`_build_axis_plan`, always built as normal tensors: an index made under
    ``torch.inference_mode`` and cached would break every later training step that saves it for backward."""
    with torch.inference_mode(False):
        return _build_axis_plan(length, kernel_size, tile)


def _build_axis_plan(length: int, kernel_size: int, tile: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                        torch.Tensor]:
    """Per axis: query index (n, T) (the last tile repeats the last query), key region index (n, L),
    window membership (n, T, L) and bias-table index (n, T, L) of each (query, region key)."""
    tile = min(tile, length)
    n = math.ceil(length / tile)
    region = min(tile + kernel_size - 1, length)
    queries = torch.arange(n * tile).clamp(max=length - 1).view(n, tile)
    starts = window_starts(length, kernel_size)[queries]                          # (n, T)
    first = starts[:, 0].clamp(max=length - region)                                # region start per tile
    keys = first[:, None] + torch.arange(region)                                   # (n, L)
    inside = (keys[:, None, :] >= starts[:, :, None]) & (keys[:, None, :] < starts[:, :, None] + kernel_size)
    table = (keys[:, None, :] - queries[:, :, None] + kernel_size - 1).clamp(0, 2 * kernel_size - 2)
    return queries, keys, inside, table


def _plans(H: int, W: int, kernel_size: int, tile: Optional[int], device: torch.device) -> List[torch.Tensor]:
    th, tw = (tile, tile) if tile else (auto_tile(H, kernel_size), auto_tile(W, kernel_size))
    return [t.to(device) for t in _axis_plan(H, kernel_size, th) + _axis_plan(W, kernel_size, tw)]


def _tile_mask(rpb: torch.Tensor, plans: List[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """(heads, nH*nW, T_h*T_w, L_h*L_w) additive mask: the bias inside each query's window, -inf outside."""
    _, _, in_h, tb_h, _, _, in_w, tb_w = plans
    nh, th, lh = in_h.shape
    nw, tw, lw = in_w.shape
    bias = rpb.to(dtype)[:, tb_h[:, None, :, None, :, None], tb_w[None, :, None, :, None, :]]
    inside = in_h[:, None, :, None, :, None] & in_w[None, :, None, :, None, :]      # (nh, nw, th, tw, lh, lw)
    bias = bias.masked_fill(~inside, float('-inf'))
    return bias.reshape(rpb.shape[0], nh * nw, th * tw, lh * lw)


def _to_tiles(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(B, h, H, W, d) gathered at rows (n_h, a) x cols (n_w, b) -> (B, h, n_h*n_w, a*b, d)."""
    B, h, _, _, d = x.shape
    nh, a = rows.shape
    nw, b = cols.shape
    x = x[:, :, rows.reshape(-1)][:, :, :, cols.reshape(-1)]                       # (B, h, nh*a, nw*b, d)
    x = x.view(B, h, nh, a, nw, b, d).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(B, h, nh * nw, a * b, d)


def _tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor, kernel_size: int,
                     tile: Optional[int], dropout_p: float = 0.) -> torch.Tensor:
    B, h, H, W, d = q.shape
    plans = _plans(H, W, kernel_size, tile, q.device)
    q_rows, k_rows, _, _, q_cols, k_cols, _, _ = plans
    mask = _tile_mask(rpb, plans, q.dtype)                                         # (h, nT, T2, L2)
    qt = _to_tiles(q, q_rows, q_cols)                                              # (B, h, nT, T2, d)
    kt, vt = _to_tiles(k, k_rows, k_cols), _to_tiles(v, k_rows, k_cols)           # (B, h, nT, L2, d)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, dropout_p=dropout_p, scale=1.0)
    nh, th = q_rows.shape
    nw, tw = q_cols.shape
    out = out.view(B, h, nh, nw, th, tw, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, h, nh * th, nw * tw, d)
    return out[:, :, :H, :W]


class NeighborhoodAttention2D(torch.autograd.Function):
    """softmax(q k^T + rpb) v over clamped windows as one op. Forward runs the tiled attention without
    keeping its intermediates; backward recomputes it with autograd (memory O(inputs), like a fused kernel).
    Tracers cannot see into it: :func:`neighborhood_attention` runs the plain form while they look."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor, kernel_size: int,
                tile: Optional[int]) -> torch.Tensor:
        ctx.save_for_backward(q, k, v, rpb)
        ctx.kernel_size, ctx.tile = kernel_size, tile
        with torch.no_grad():
            return _tiled_attention(q, k, v, rpb, kernel_size, tile)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, rpb = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(need) for t, need in zip((q, k, v, rpb), ctx.needs_input_grad[:4])]
        with torch.enable_grad():
            out = _tiled_attention(*inputs, ctx.kernel_size, ctx.tile)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
        return tuple(next(grads) if t.requires_grad else None for t in inputs) + (None, None)


# ----------------------------------------------------------------------------- optional natten backend
NEIGHBORHOOD_IMPLS = ('torch', 'natten')
NattenOps = Tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]


def natten_functions() -> NattenOps:
    """(qk_rpb(q, k, rpb, kernel_size), av(attn, v, kernel_size)) from the installed natten, dilation 1, in
    natten's unfused (B, heads, H, W, ...) layout -- ours too. Raises ConfigError naming the fix when natten
    is missing or has no relative position bias."""
    try:
        import natten
        import natten.functional as nf
    except ImportError as e:
        raise ConfigError(f"neighbourhood attention 'natten' was selected (DAT_NEIGHBORHOOD_IMPL or "
                          f"set_neighborhood_impl) but natten cannot be imported ({e}); "
                           "install natten 0.14-0.17 or select the built-in 'torch' implementation") from None
    version = getattr(natten, '__version__', '?')
    if hasattr(nf, 'na2d_qk') and 'rpb' in inspect.signature(nf.na2d_qk).parameters:     # natten 0.15-0.17
        return (lambda q, k, rpb, ks: nf.na2d_qk(q, k, ks, 1, rpb=rpb),
                lambda attn, v, ks: nf.na2d_av(attn, v, ks, 1))
    if hasattr(nf, 'natten2dqkrpb'):                                                  # natten 0.14 (DAT's pin)
        return (lambda q, k, rpb, ks: nf.natten2dqkrpb(q, k, rpb, ks, 1),
                lambda attn, v, ks: nf.natten2dav(attn, v, ks, 1))
    raise ConfigError(f"natten {version} has no relative position bias (natten 0.20 removed it) and DAT++'s "
                       "'N' blocks need it: install natten 0.14-0.17 or select the built-in 'torch' implementation")


_natten_ops: Optional[NattenOps] = None     # resolved once, when 'natten' is selected (not per forward)


def _check_backend(name: str) -> None:
    global _natten_ops
    if name == 'natten':
        _natten_ops = natten_functions()


_IMPL = ImplChoice('neighbourhood attention implementation', NEIGHBORHOOD_IMPLS, 'DAT_NEIGHBORHOOD_IMPL', 'torch',
                   check=_check_backend)


def set_neighborhood_impl(name: str) -> None:
    """Select the fast path of every neighbourhood attention: 'torch' (built in) or 'natten' (checked now)."""
    _IMPL.set(name)


def get_neighborhood_impl() -> str:
    """The implementation selected by :func:`set_neighborhood_impl` (or $DAT_NEIGHBORHOOD_IMPL; default 'torch')."""
    return _IMPL.name


def neighborhood_impl(name: str) -> ContextManager[None]:
    """Context manager: ``with neighborhood_impl('natten'): model(x)``."""
    return _IMPL.use(name)


def _natten_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor, kernel_size: int,
                      dropout_p: float) -> torch.Tensor:
    qk_rpb, av = _natten_ops
    attn = qk_rpb(q, k, rpb, kernel_size).softmax(dim=-1)
    return av(F.dropout(attn, dropout_p) if dropout_p > 0 else attn, v, kernel_size)


def _gather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor, kernel_size: int,
                      dropout_p: float) -> torch.Tensor:
    """The plain-operator form of :func:`neighborhood_attention` (the gather path, with attention dropout)."""
    attn = neighborhood_probs(q, k, rpb, kernel_size)
    return neighborhood_av(F.dropout(attn, dropout_p) if dropout_p > 0 else attn, v, kernel_size)


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor,
                           kernel_size: int, tile: Optional[int] = None, dropout_p: float = 0.) -> torch.Tensor:
    """Fast neighbourhood attention. q (pre-scaled), k, v: (B, heads, H, W, head_dim) with H, W >= kernel_size;
    rpb (heads, 2k-1, 2k-1). Returns (B, heads, H, W, head_dim). ``tile``: query tile side (default
    :func:`auto_tile` per axis). ``dropout_p`` > 0 (attention dropout, used
    in training only by the caller) takes the un-fused autograd path, where SDPA draws the dropout mask.
    With :func:`set_neighborhood_impl` ('natten') the installed natten computes it (``tile`` is ignored).
    While operators are traced or counted (not under torch.compile, which keeps the fused op: the plain
    path's O(N k^2 d) gathers would not fit training batches) the plain gather path runs, and so does
    TorchScript (which compiles neither the autograd Function nor natten)."""
    if torch.jit.is_scripting():
        return _gather_attention(q, k, v, rpb, kernel_size, dropout_p)
    _check(q, k, v, rpb, kernel_size)
    window_starts(q.shape[2], kernel_size), window_starts(q.shape[3], kernel_size)   # size check
    if operators_observed(under_compile=False):
        return _gather_attention(q, k, v, rpb, kernel_size, dropout_p)
    if _IMPL.name == 'natten':
        return _natten_attention(q, k, v, rpb, kernel_size, dropout_p)
    if dropout_p > 0:
        return _tiled_attention(q, k, v, rpb, kernel_size, tile, dropout_p)
    return NeighborhoodAttention2D.apply(q, k, v, rpb, kernel_size, tile)


# ----------------------------------------------------------------------------- FLOP counting
def natten_flops(batch: int, heads: int, height: int, width: int, head_dim: int, kernel_size: int) -> int:
    """natten 0.14.6's count (its flops.py): QK + RPB = B*h*H*W*k^2*(d + 1), AV = B*h*H*W*k^2*d."""
    n = batch * heads * height * width * kernel_size * kernel_size
    return n * (head_dim + 1) + n * head_dim


# ----------------------------------------------------------------------------- micro-benchmark
BENCH_KERNEL = 7


def _benchmark_cases(batch: int, device: torch.device) -> List[Tuple[Dict[str, Any], Tuple[torch.Tensor, ...]]]:
    """dat_tiny's 'N' blocks: k 7, head_dim 32, maps 56 / 28 / 14 with 2 / 4 / 8 heads."""
    cases = []
    for size, heads in ((56, 2), (28, 4), (14, 8)):
        q, k, v = (torch.randn(batch, heads, size, size, 32, device=device) for _ in range(3))
        rpb = torch.randn(heads, 2 * BENCH_KERNEL - 1, 2 * BENCH_KERNEL - 1, device=device)
        cases.append(({'map': size, 'heads': heads}, (q, k, v, rpb)))
    return cases


def _benchmark_impls() -> Tuple[Dict[str, Callable[..., torch.Tensor]], List[str]]:
    """The fused tiled path, the gather path, and natten where one with relative position bias is installed."""
    impls: Dict[str, Callable[..., torch.Tensor]] = {
        'fast': lambda q, k, v, rpb: neighborhood_attention(q, k, v, rpb, BENCH_KERNEL),
        'naive': lambda q, k, v, rpb: neighborhood_attention_naive(q, k, v, rpb, BENCH_KERNEL)}
    try:
        natten_functions()
    except ConfigError as e:                         # natten missing, or without relative position bias
        return impls, [f'no natten column: {e}']

    def natten_path(q, k, v, rpb):
        with neighborhood_impl('natten'):
            return neighborhood_attention(q, k, v, rpb, BENCH_KERNEL)
    impls['natten'] = natten_path
    return impls, []


register_op_benchmark('neighborhood_attention', OpBenchmark(
    "DAT++'s neighbourhood attention (k 7): fused tiled path vs the gather path (vs natten)",
    _benchmark_cases, _benchmark_impls))
