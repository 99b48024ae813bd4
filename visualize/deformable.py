"""Key-position drawings, for attention modules whose tap gives no query x key matrix over the token grid;
chosen by the module's declared kind (``attn_kind``), whatever model it sits in:

* ``'deformable'``: for a chosen query, the key positions the module sampled (reference points + learned
  offsets) over the photo, each point sized (and coloured) by the attention weight the query gives it; the
  reference grid and the query are marked too.
* ``'neighborhood'``: the query's k x k window of keys (shifted inward at the borders), each key sized by
  its weight.

Tap contracts (a forward hook reads them): a deformable module calls ``tap(pos (B, g, Hk, Wk, 2),
reference (B, g, Hk, Wk, 2), probs (B*heads, H*W, Hk*Wk))`` with (y, x) positions in align-corners
coordinates of the block's H x W map; a neighbourhood module calls ``tap(probs (B, heads, H, W, k*k))`` and
has a ``kernel_size`` attribute.

    python -m visualize --cfg CFG --checkpoint W.pth --image photo.jpg --stage 2 --block 1 --queries 7,7 --output vis/
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from errors import SelectionError

from .capture import AttentionSite, attention_sites, query_lattice, select_site
from .photo import centre_square, load_photo, to_input

ATTN_KIND = 'deformable'
NEIGHBORHOOD_KIND = 'neighborhood'


def is_drawn(module: nn.Module) -> bool:
    """Modules drawn as keys over the photo: deformable and neighbourhood attention."""
    return getattr(module, 'attn_kind', None) in (ATTN_KIND, NEIGHBORHOOD_KIND)


@torch.no_grad()
def _tap_inputs(model: nn.Module, module: nn.Module, images: torch.Tensor, what: str) -> Tuple[torch.Tensor, ...]:
    """The float32 CPU copies of what ``module.tap`` received during one ``model(images)``."""
    seen: List[Tuple[torch.Tensor, ...]] = []
    handle = module.tap.register_forward_hook(
        lambda _m, inputs, _out: seen.append(tuple(t.detach().float().cpu() for t in inputs)))
    try:
        model(images)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise RuntimeError(f'the {what} tap was called {len(seen)} times in one forward pass (expected once)')
    return seen[0]


def capture_neighborhood(model: nn.Module, module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Run ``model(images)`` with a hook on ``module.tap``; returns probs (B, heads, H, W, k*k) on CPU."""
    return _tap_inputs(model, module, images, 'neighbourhood')[0]


def window_points(probs: torch.Tensor, query: Tuple[int, int], kernel_size: int, image: int = 0,
                  head: Union[int, str] = 'mean') -> Tuple[torch.Tensor, torch.Tensor]:
    """For query cell (row, col) of a neighbourhood block: its k*k key positions (y, x) in align-corners
    coordinates of the H x W map (window start clamp(i - k//2, 0, L - k) per axis, row-major) and their
    attention weights (one head, or the mean over heads)."""
    _, H, W, _ = probs[image].shape
    r, c = query
    if not (0 <= r < H and 0 <= c < W):
        raise SelectionError(f'query ({r}, {c}) is outside the {H}x{W} token grid of this block')
    top = min(max(r - kernel_size // 2, 0), H - kernel_size)
    left = min(max(c - kernel_size // 2, 0), W - kernel_size)
    rows, cols = torch.meshgrid(torch.arange(top, top + kernel_size), torch.arange(left, left + kernel_size),
                                indexing='ij')
    pos = torch.stack([rows.flatten() / max(H - 1, 1) * 2 - 1, cols.flatten() / max(W - 1, 1) * 2 - 1], dim=1)
    row = probs[image, :, r, c]                                                   # (heads, k*k)
    weights = row.mean(0) if head == 'mean' else row[int(head)]
    return pos, weights / weights.sum()


def capture_deformable(model: nn.Module, module: nn.Module, images: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Run ``model(images)`` with a hook on ``module.tap``; returns pos, reference (B, g, Hk, Wk, 2), probs
    (B, heads, H*W, Hk*Wk) on CPU."""
    pos, reference, probs = _tap_inputs(model, module, images, 'deformable')
    B = pos.shape[0]
    probs = probs.reshape(B, -1, *probs.shape[-2:])
    return dict(pos=pos, reference=reference, probs=probs)


def _block_hw(probs: torch.Tensor, image_hw: Tuple[int, int]) -> Tuple[int, int]:
    """The (H, W) query grid of the block: H*W queries in the aspect ratio of the input."""
    n = probs.shape[-2]
    h_img, w_img = image_hw
    H = round((n * h_img / w_img) ** 0.5)
    return H, n // H


def query_points(cap: Dict[str, torch.Tensor], query: Tuple[int, int], hw: Tuple[int, int], image: int = 0,
                 head: Union[int, str] = 'mean') -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For query cell (row, col): sampled positions (groups*Hk*Wk, 2) (y, x) in [-1, 1], their attention
    weights (heads of a group share its points; ``head`` an index or 'mean': the chosen heads' weights are
    summed per point and normalised to sum 1), and the reference points."""
    pos, ref, probs = cap['pos'][image], cap['reference'][image], cap['probs'][image]     # (g, Hk, Wk, 2), (h, HW, n)
    groups, heads = pos.shape[0], probs.shape[0]
    H, W = hw
    r, c = query
    if not (0 <= r < H and 0 <= c < W):
        raise SelectionError(f'query ({r}, {c}) is outside the {H}x{W} token grid of this block')
    row = probs[:, r * W + c]                                                  # (heads, n)
    weights = torch.zeros(groups, row.shape[-1])
    per_group = heads // groups
    chosen = range(heads) if head == 'mean' else [int(head)]
    for h in chosen:
        weights[h // per_group] += row[h]
    weights = weights / weights.sum()
    return pos.reshape(-1, 2), weights.reshape(-1), ref.reshape(-1, 2)


def to_pixels(points: torch.Tensor, hw: Tuple[int, int], size: int) -> np.ndarray:
    """(y, x) align-corners coordinates of an H x W map -> (x, y) pixel coordinates of a size x size image
    (map cell i covers pixels [i, i + 1) * size / H)."""
    H, W = hw
    y = ((points[:, 0] + 1) / 2 * (H - 1) + 0.5) * size / H
    x = ((points[:, 1] + 1) / 2 * (W - 1) + 0.5) * size / W
    return np.stack([x.numpy(), y.numpy()], axis=1)


def draw(image: Image.Image, points: np.ndarray, weights: np.ndarray, reference: np.ndarray,
         query_xy: Tuple[float, float], path: str, title: str = '', size: int = 448) -> None:
    """Photo with sampled points (area proportional to weight, colour by weight), reference grid (small
    crosses) and the query (star); written to ``path``."""
    fig = Figure(figsize=(5, 5.3), dpi=max(72, size // 5))
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0, 0, 1, 0.94])
    ax.imshow(np.asarray(image.convert('RGB').resize((size, size), Image.BICUBIC)))
    ax.scatter(reference[:, 0], reference[:, 1], s=12, marker='+', c='white', linewidths=0.8, alpha=0.7)
    w = weights / max(float(weights.max()), 1e-12)
    order = np.argsort(w)
    ax.scatter(points[order, 0], points[order, 1], s=10 + 400 * w[order], c=w[order], cmap='autumn_r',
               vmin=0, vmax=1, edgecolors='black', linewidths=0.5, alpha=0.85)
    ax.scatter([query_xy[0]], [query_xy[1]], s=260, marker='*', c='deepskyblue', edgecolors='white', linewidths=1)
    ax.set_xlim(0, size)
    ax.set_ylim(size, 0)
    ax.axis('off')
    if title:
        fig.suptitle(title, fontsize=7)
    fig.savefig(path)


def _photo(image: Union[str, Image.Image]) -> Image.Image:
    """A square RGB photo: a path (read by :func:`visualize.photo.load_photo`), 'china' / 'flower' for
    scikit-learn's packaged photos, or a PIL image; centre-cropped square."""
    if isinstance(image, str):
        if image not in ('china', 'flower'):
            return load_photo(image)
        from sklearn.datasets import load_sample_image
        image = Image.fromarray(load_sample_image(f'{image}.jpg'))
    return centre_square(image.convert('RGB'))


def select_drawn(model: nn.Module, stage: Optional[int] = None, block: Optional[int] = None,
                 module: str = '') -> AttentionSite:
    """The deformable or neighbourhood attention module at ``--stage/--block`` (or module path ``module``),
    numbered as :func:`visualize.capture.attention_sites` numbers every attention module."""
    site = select_site(attention_sites(model), stage, block, module or None)
    if not is_drawn(site.module):
        raise SelectionError(f"{site.name} is {getattr(site.module, 'attn_kind', None)!r} attention; key positions "
                             f"are drawn for {ATTN_KIND!r} and {NEIGHBORHOOD_KIND!r} attention")
    return site


@dataclass
class KeyCapture:
    """What a drawn module's tap saw for a batch: its kind, the block's (H, W) query grid, the tap's tensors
    (``probs``; deformable also ``pos``, ``reference``) and the module."""
    kind: str
    grid: Tuple[int, int]
    data: Dict[str, torch.Tensor]
    module: nn.Module

    @property
    def heads(self) -> int:
        return self.data['probs'].shape[1]

    def points(self, query: Tuple[int, int], head: Union[int, str] = 'mean', image: int = 0
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
        """Key positions (n, 2) (y, x) in [-1, 1], their weights (sum 1), the reference points and a caption."""
        if head != 'mean' and not 0 <= int(head) < self.heads:
            raise SelectionError(f'head {head} does not exist; valid: 0-{self.heads - 1} or mean')
        if self.kind == NEIGHBORHOOD_KIND:
            k = self.module.kernel_size
            points, weights = window_points(self.data['probs'], query, k, image, head)
            return points, weights, points[:0], f'{k}x{k} neighbourhood keys'
        points, weights, reference = query_points(self.data, query, self.grid, image, head)
        return points, weights, reference, f'{len(points)} sampled keys'


def capture_keys(model: nn.Module, module: nn.Module, images: torch.Tensor) -> KeyCapture:
    """One ``model(images)`` with a hook on ``module.tap`` (a deformable or neighbourhood module)."""
    if module.attn_kind == NEIGHBORHOOD_KIND:
        probs = capture_neighborhood(model, module, images)
        return KeyCapture(NEIGHBORHOOD_KIND, tuple(probs.shape[2:4]), dict(probs=probs), module)
    cap = capture_deformable(model, module, images)
    return KeyCapture(ATTN_KIND, _block_hw(cap['probs'], tuple(images.shape[-2:])), cap, module)


def draw_query(photo: Image.Image, keys: KeyCapture, query: Tuple[int, int], path: str, name: str,
               head: Union[int, str] = 'mean', out_size: int = 448) -> Dict[str, Any]:
    """Draw the keys of grid cell ``query`` over ``photo`` into ``path``; returns the points (pixel x, y),
    their weights, the query and the grid."""
    hw = keys.grid
    points, weights, reference, what = keys.points(query, head)
    px, ref_px = to_pixels(points, hw, out_size), to_pixels(reference, hw, out_size)
    qxy = ((query[1] + 0.5) * out_size / hw[1], (query[0] + 0.5) * out_size / hw[0])
    draw(photo, px, weights.numpy(), ref_px, qxy, path,
         title=f'{name}: query {tuple(query)} of {hw[0]}x{hw[1]}, {what} (size = attention weight)', size=out_size)
    return dict(name=name, query=tuple(query), points=torch.from_numpy(px), weights=weights, grid=hw)


def render_deformable(model: nn.Module, path: str, image: Union[str, Image.Image] = 'china',
                      stage: Optional[int] = None, block: Optional[int] = None, module: str = '',
                      query: Union[Tuple[int, int], Tuple[float, float]] = (0.5, 0.5), size: int = 224,
                      head: Union[int, str] = 'mean', out_size: int = 448, device: Any = 'cpu') -> Dict[str, Any]:
    """Draw one query of one deformable (or neighbourhood) block of ``model`` on ``image`` into ``path``.
    ``query``: a (row, col) cell of the block's grid (ints) or fractions of the image height/width (floats).
    ``size``: model input. Returns the points (pixel x, y), their weights, the query, the grid and the block name."""
    photo = _photo(image)
    site = select_drawn(model, stage, block, module)
    keys = capture_keys(model.eval(), site.module, to_input(photo, size).to(device))
    hw = keys.grid
    if all(isinstance(v, float) for v in query):
        query = (min(int(query[0] * hw[0]), hw[0] - 1), min(int(query[1] * hw[1]), hw[1] - 1))
    return draw_query(photo, keys, query, path, site.name, head, out_size)


def render_keys(targets: Sequence[Tuple[nn.Module, int, AttentionSite]], photo: Image.Image, output: str,
                queries: Sequence[Tuple[int, int]] = (), query_stride: Optional[int] = None,
                head: Union[int, str] = 'mean', out_size: int = 448, device: Any = 'cpu') -> List[str]:
    """``python -m visualize`` on drawn blocks: for each (model, input size, site) target, one PNG per query
    (``--queries``, else the ``--query-stride`` lattice, else the centre cell) into ``output``, named
    ``<site>_<kind>_r<row>_c<col>.png`` (prefixed ``compare_`` for the second target)."""
    os.makedirs(output, exist_ok=True)
    written = []
    for k, (model, size, site) in enumerate(targets):
        keys = capture_keys(model, site.module, to_input(photo, size).to(device))
        H, W = keys.grid
        chosen = (list(queries) or (query_lattice(keys.grid, query_stride) if query_stride else [(H // 2, W // 2)]))
        for r, c in chosen:
            path = os.path.join(output, f"{'compare_' if k else ''}{site.name}_{keys.kind}_r{r}_c{c}.png")
            draw_query(photo, keys, (r, c), path, site.name, head, out_size)
            written.append(path)
    return written
