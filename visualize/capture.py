"""Capture a block's attention through a forward hook on its ``tap`` (no model edits) and turn it into
per-query maps over the block's token grid.

  * softmax blocks: their attention probabilities (B', heads, N, n);
  * focused linear blocks: the equivalent matrix phi(q) phi(k)^T, row-normalised
    (:func:`models.focused_attention.equivalent_attention`), with the depth-wise conv folded in: the dwc
    acts on V over each group's (h, w) grid, i.e. V -> D V with a sparse (N, N) matrix D per kernel, so
    the block mixes V with A + D per head. As in the official visualisation the folded matrix is shown
    as |A + D|, row-normalised (the kernel can be negative); the dwc bias is not a token mixing and is left out.

Prefix tokens (class, distillation, register tokens: ``TokenGroups.prefix``, read by :mod:`.layout`) have no
grid position: their rows and columns are dropped from the drawn maps after the row normalisation (a grid
query's map keeps its weights over the grid tokens, which then sum to 1 minus the share it gives the prefix
tokens; that share is kept in ``AttentionMaps.prefix_share``). The dwc runs on the grid tokens only, so its
matrix has no prefix rows or columns.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import SelectionError

from .layout import token_layout

if TYPE_CHECKING:          # the model library is imported when a model is, never by ``import visualize``
    from models.layers import TokenGroups

logger = logging.getLogger(__name__)

Reduce = Union[int, str]           # an index, or 'mean'
MAP_KINDS = ('linear', 'softmax')  # the attn_kind values whose tap gives a query x key matrix


@dataclass
class AttentionSite:
    """An attention module that owns a tap. ``stage`` counts the stages that hold attention from 0 in model
    order; ``block`` is the block's index inside its stage, as in the module path."""
    name: str                      # module path of the attention module, e.g. 'layers.1.blocks.0.attn'
    block_name: str                # its block, e.g. 'layers.1.blocks.0'
    stage: int
    block: int
    module: nn.Module
    block_module: nn.Module


def _split_block(name: str) -> Tuple[str, str, int]:
    """'layers.1.blocks.0.attn' -> ('layers.1.blocks.0', 'layers.1.blocks', 0): the block is the path up to
    the last integer component that is not the module's own last component."""
    parts = name.split('.')
    idx = [i for i, p in enumerate(parts[:-1]) if p.isdigit()]
    if not idx:
        return name, '', 0
    i = idx[-1]
    return '.'.join(parts[:i + 1]), '.'.join(parts[:i]), int(parts[i])


def _stage_modules(model: nn.Module) -> List[str]:
    """The stage module paths the model declares in timm's ``feature_info`` (longest first)."""
    info = getattr(model, 'feature_info', None)
    names = [f.get('module') for f in info if isinstance(f, dict)] if isinstance(info, (list, tuple)) else []
    return sorted({n for n in names if isinstance(n, str) and n}, key=len, reverse=True)


def _locate(name: str, stages: Sequence[str]) -> Tuple[str, str, int]:
    """(block path, stage path, block index) of attention module ``name``. Under a stage of the model's
    ``feature_info``, the block is the first indexed module below the stage (the attention module itself when
    the stage indexes its attention modules directly, ``<stage>.attns.<i>``); elsewhere the last indexed
    module above the attention module (:func:`_split_block`). A ``feature_info`` module that is itself an
    indexed module holding its attention module directly (timm's ViT lists every ``blocks.<i>``) is a block
    of one stage, its parent."""
    for stage in stages:
        if name.startswith(stage + '.'):
            rest = name[len(stage) + 1:].split('.')
            for i, part in enumerate(rest):
                if part.isdigit():
                    return '.'.join([stage] + rest[:i + 1]), stage, int(part)
            if stage.rsplit('.', 1)[-1].isdigit():
                break
            return name, stage, 0
    return _split_block(name)


def attention_sites(model: nn.Module) -> List[AttentionSite]:
    """Every attention module of ``model`` (a module with an AttentionTap child), in model order."""
    from models.focused_attention import AttentionTap   # here: `import visualize` leaves the model library unloaded
    modules = dict(model.named_modules())
    stage_modules = _stage_modules(model)
    sites, stages = [], {}
    for name, mod in modules.items():
        if not isinstance(mod, AttentionTap) or '.' not in name:
            continue
        attn_name = name.rsplit('.', 1)[0]
        block_name, stage_name, block = _locate(attn_name, stage_modules)
        stage = stages.setdefault(stage_name, len(stages))
        sites.append(AttentionSite(attn_name, block_name, stage, block, modules[attn_name], modules[block_name]))
    return sites


def selection(site: AttentionSite, sites: Sequence[AttentionSite]) -> str:
    """The options that select ``site``: ``--stage S --block B``, or ``--module PATH`` when its block holds
    several attention modules."""
    shared = sum(s.stage == site.stage and s.block == site.block for s in sites)
    return f'--stage {site.stage} --block {site.block}' if shared == 1 else f'--module {site.name}'


def list_sites(sites: Sequence[AttentionSite]) -> str:
    """One line per attention module: the options that select it, its path, class and attention kind."""
    return '\n'.join(f'{selection(s, sites)}: {s.name} ({type(s.module).__name__}, '
                     f"{getattr(s.module, 'attn_kind', None) or 'unknown'} attention)" for s in sites)


def describe_sites(sites: Sequence[AttentionSite]) -> str:
    """'stage 0: blocks 0-1 (layers.0.blocks.*); stage 1: ...' for error messages."""
    out = []
    for s in sorted({x.stage for x in sites}):
        blocks = sorted({x.block for x in sites if x.stage == s})
        first = next(x for x in sites if x.stage == s)
        if len(blocks) == 1:
            out.append(f'stage {s}: block {blocks[0]} ({first.block_name})')
            continue
        listed = (f'{blocks[0]}-{blocks[-1]}' if blocks == list(range(blocks[0], blocks[-1] + 1))
                  else ', '.join(map(str, blocks)))
        out.append(f"stage {s}: blocks {listed} ({first.block_name.rsplit('.', 1)[0]}.*)")
    return '; '.join(out)


def select_site(sites: Sequence[AttentionSite], stage: Optional[int] = None, block: Optional[int] = None,
                module: Optional[str] = None) -> AttentionSite:
    """The site at (stage, block), or at module path ``module`` (attention module, its block or its tap)."""
    if not sites:
        raise SelectionError('the model has no attention module with a tap (an AttentionTap child through which '
                             'a hook reads the attention), so there is no attention to draw')
    if module:
        path = module[:-len('.tap')] if module.endswith('.tap') else module
        hits = [s for s in sites if path in (s.name, s.block_name)]
        if not hits:
            raise SelectionError(f"no attention module at '{module}'; valid: {', '.join(s.name for s in sites)}")
    else:
        stage = 0 if stage is None else stage
        block = 0 if block is None else block
        hits = [s for s in sites if s.stage == stage and s.block == block]
        if not hits:
            raise SelectionError(f'no block at --stage {stage} --block {block}; valid: {describe_sites(sites)} '
                                 f'(--list prints each with its module path)')
    if len(hits) > 1:
        raise SelectionError(f"block {hits[0].block_name} has {len(hits)} attention modules; choose one with "
                             f"--module ({', '.join(s.name for s in hits)})")
    return hits[0]


@dataclass
class Capture:
    """What the tap of one site saw in one forward pass (batch of images)."""
    kind: str                              # the module's attn_kind: 'linear' or 'softmax'
    tensors: Tuple[torch.Tensor, ...]      # (phi_q, phi_k, v) or (probs,)
    output: torch.Tensor                   # the model output of that forward pass


@torch.no_grad()
def capture(model: nn.Module, site: AttentionSite, images: torch.Tensor) -> Capture:
    """Run ``model(images)`` with a forward hook on ``site.module.tap``; the hook only copies its inputs
    (to CPU) and returns nothing, so the forward pass is unchanged."""
    declared = getattr(site.module, 'attn_kind', None)
    if declared not in MAP_KINDS + (None,):
        raise SelectionError(f"{site.name} is {declared!r} attention (no query x key matrix over the token grid); "
                             f"attention maps are drawn for {' and '.join(map(repr, MAP_KINDS))} attention")
    seen: List[Tuple[torch.Tensor, ...]] = []

    def hook(_mod: nn.Module, inputs: Tuple[torch.Tensor, ...], _out) -> None:
        seen.append(tuple(t.detach().to('cpu', copy=True) for t in inputs))   # maps are built on CPU

    handle = site.module.tap.register_forward_hook(hook)
    try:
        output = model(images)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise RuntimeError(f'{site.name}.tap was called {len(seen)} times in one forward pass (expected once)')
    tensors = seen[0]
    if len(tensors) not in (1, 3):
        raise RuntimeError(f'{site.name}.tap got {len(tensors)} tensors; expected (phi_q, phi_k, v) or (probs,)')
    kind = getattr(site.module, 'attn_kind', None) or ('linear' if len(tensors) == 3 else 'softmax')
    if (kind == 'linear') != (len(tensors) == 3):
        raise RuntimeError(f'{site.name}.tap got {len(tensors)} tensors, which does not fit its attn_kind {kind!r}')
    return Capture(kind, tensors, output)


def dwc_matrix(kernel: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """The (N, N) matrix D of a zero-padded 'same' 2-D cross-correlation with ``kernel`` (k, k) on an
    (h, w) grid flattened row-major: conv(x).flatten() == D @ x.flatten()."""
    h, w = hw
    k = kernel.shape[-1]
    p = k // 2
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    rows, cols = rows.flatten(), cols.flatten()
    dr = rows[None, :] - rows[:, None] + p                      # kernel row for (output i, input j)
    dc = cols[None, :] - cols[:, None] + p
    valid = (dr >= 0) & (dr < k) & (dc >= 0) & (dc < k)
    taps = kernel[dr.clamp(0, k - 1), dc.clamp(0, k - 1)]
    return torch.where(valid, taps, torch.zeros((), dtype=kernel.dtype))


def _pick(x: torch.Tensor, how: Reduce, dim: int, what: str) -> torch.Tensor:
    if how == 'mean':
        return x.mean(dim=dim)
    if not 0 <= int(how) < x.shape[dim]:
        raise SelectionError(f'{what} {how} does not exist; valid: 0-{x.shape[dim] - 1} or mean')
    return x.select(dim, int(how))


def dwc_kernel(module: nn.Module, channel: Reduce = 0) -> torch.Tensor:
    """One (k, k) kernel of ``module.dwc`` (per-channel kernels, shared by all heads): a channel index
    (the official visualisation uses channel 0) or 'mean' over channels."""
    return _pick(module.dwc.weight.detach().cpu()[:, 0], channel, 0, 'dwc channel')


def linear_attention_matrix(phi_q: torch.Tensor, phi_k: torch.Tensor, num_heads: int,
                            dwc: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(B', heads, N, n) rows summing to 1: equivalent attention of phi_q (B', N, C), phi_k (B', n, C),
    with the dwc's (N, N) matrix (:func:`dwc_matrix`) folded in as |A + D| row-normalised."""
    from models.focused_attention import equivalent_attention
    attn = equivalent_attention(phi_q.to(dtype), phi_k.to(dtype), num_heads)
    if dwc is not None:
        attn = (attn + dwc.to(dtype)).abs()
    return attn / attn.sum(dim=-1, keepdim=True)


@dataclass
class AttentionMaps:
    """Per-image attention of one site, reduced over heads: matrix (groups, N, N) over the grid tokens of
    each group (prefix tokens dropped; rows sum to 1 without them), the layout that places those tokens on the
    (H, W) grid, and prefix_share (groups, N): the attention each grid query gives the prefix tokens (None
    when there are none)."""
    kind: str
    matrix: torch.Tensor
    layout: TokenGroups
    prefix_share: Optional[torch.Tensor] = None

    @property
    def grid(self) -> Tuple[int, int]:
        return self.layout.grid

    def query_map(self, row: int, col: int) -> torch.Tensor:
        """(H, W) attention of grid cell (row, col) over the grid (zero outside its window)."""
        H, W = self.grid
        if not (0 <= row < H and 0 <= col < W):
            raise SelectionError(f'query ({row}, {col}) is outside the {H}x{W} token grid of this block')
        g, t = self.layout.locate(row, col)
        out = torch.zeros(H * W, dtype=self.matrix.dtype)
        out[self.layout.positions[g]] = self.matrix[g, t]
        return out.view(H, W)

    def query_prefix_share(self, row: int, col: int) -> Optional[float]:
        """The share of grid cell (row, col)'s attention that goes to the prefix tokens (None without any)."""
        if self.prefix_share is None:
            return None
        g, t = self.layout.locate(row, col)
        return float(self.prefix_share[g, t])


def attention_maps(site: AttentionSite, cap: Capture, image_hw: Tuple[int, int], image: int = 0,
                   head: Reduce = 'mean', fold_dwc: bool = True, dwc_channel: Reduce = 0) -> AttentionMaps:
    """Turn one capture into maps for image ``image`` of the batch; ``head`` an index or 'mean'."""
    batch = cap.output.shape[0]
    if cap.kind == 'linear':
        phi_q, phi_k, _ = cap.tensors
        groups, n_query, n_key = phi_q.shape[0], phi_q.shape[1], phi_k.shape[1]
    else:
        groups, _, n_query, n_key = cap.tensors[0].shape
    layout = token_layout(site.block_module, site.name, groups, n_query, n_key, batch, image_hw, site.module)
    per_image = slice(image * (groups // batch), (image + 1) * (groups // batch))
    if cap.kind == 'softmax':
        return _grid_maps(cap.kind, _pick(cap.tensors[0][per_image].double(), head, 1, 'head'), layout)
    heads = getattr(site.module, 'num_heads', None)
    if not isinstance(heads, int) or heads < 1 or phi_q.shape[-1] % heads:
        raise SelectionError(f'{site.name} ({type(site.module).__name__}) has no usable num_heads attribute '
                             f'({heads!r}): linear attention maps split phi_q/phi_k ({phi_q.shape[-1]} channels) into '
                             f'heads; give the attention module its head count as self.num_heads')
    if head != 'mean' and not 0 <= int(head) < heads:
        raise SelectionError(f'head {head} does not exist; valid: 0-{heads - 1} or mean')
    fold_dwc = fold_dwc and isinstance(getattr(site.module, 'dwc', None), nn.Module)   # not every linear module has one
    dwc = dwc_matrix(dwc_kernel(site.module, dwc_channel).double(), layout.window) if fold_dwc else None
    if dwc is not None and layout.prefix:        # the dwc mixes the grid tokens only
        dwc = F.pad(dwc, (layout.prefix, 0, layout.prefix, 0))
    d = phi_q.shape[-1] // heads
    chosen = range(heads) if head == 'mean' else [int(head)]
    total = 0
    for h in chosen:                      # one head at a time: (N, N) float64 matrices get large
        channels = slice(h * d, (h + 1) * d)
        total = total + linear_attention_matrix(phi_q[per_image, :, channels], phi_k[per_image, :, channels], 1,
                                                dwc)[:, 0]
    return _grid_maps(cap.kind, total / len(chosen), layout)


def _grid_maps(kind: str, matrix: torch.Tensor, layout: TokenGroups) -> AttentionMaps:
    """AttentionMaps of a (groups, P + N, P + N) matrix whose first P = layout.prefix tokens are unpositioned:
    their rows and columns dropped, the grid queries' share of attention on them kept."""
    P = layout.prefix
    if not P:
        return AttentionMaps(kind, matrix, layout)
    return AttentionMaps(kind, matrix[:, P:, P:], layout, matrix[:, P:, :P].sum(dim=-1))


def query_lattice(grid: Tuple[int, int], stride: int) -> List[Tuple[int, int]]:
    """Every ``stride``-th cell along each axis, centred: (stride//2 + i*stride, stride//2 + j*stride)."""
    if stride < 1:
        raise SelectionError(f'--query-stride must be >= 1, got {stride}')
    H, W = grid
    off = min(stride // 2, H - 1), min(stride // 2, W - 1)
    return [(r, c) for r in range(off[0], H, stride) for c in range(off[1], W, stride)]
