"""DAT++ deformable attention drawn as in the DAT README figure: for a chosen query, the key positions the
block sampled (reference points + learned offsets), over the photo, each point sized (and coloured) by the
attention weight the query gives it; the reference grid and the query are marked too. A neighbourhood
('N') block is drawn the same way: its k x k window of keys (shifted inward at the borders), sized by weight.

The deformable module's tap (``models.dat.DeformableAttention``, ``attn_kind == 'deformable'``) is called as
``tap(pos (B, g, Hk, Wk, 2), reference (B, g, Hk, Wk, 2), probs (B*heads, H*W, Hk*Wk))`` with (y, x)
positions in align-corners coordinates of the block's H x W map; a forward hook reads them. The
neighbourhood module's tap (``attn_kind == 'neighborhood'``) is called as ``tap(probs (B, heads, H, W, k*k))``.

    python -m visualize --cfg cfgs/dat_tiny.yaml --checkpoint dat_pp_tiny_in1k_224.pth --image photo.jpg \
        --stage 2 --block 1 --queries 7,7 --output vis/
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from .capture import SelectionError

ATTN_KIND = 'deformable'
NEIGHBORHOOD_KIND = 'neighborhood'


def is_deformable(module: nn.Module) -> bool:
    return getattr(module, 'attn_kind', None) == ATTN_KIND


def is_drawn(module: nn.Module) -> bool:
    """Blocks drawn as keys over the photo: deformable ('D') and neighbourhood ('N')."""
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
    (B, heads, H*W, Hk*Wk) on CPU and the block's map size ``hw``."""
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
    """A PIL image: a path, or 'china' / 'flower' for scikit-learn's packaged photos; centre-cropped square."""
    if isinstance(image, str):
        if image in ('china', 'flower'):
            from sklearn.datasets import load_sample_image
            image = Image.fromarray(load_sample_image(f'{image}.jpg'))
        else:
            with Image.open(image) as f:
                image = f.convert('RGB')
    w, h = image.size
    s = min(w, h)
    return image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))


def deformable_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every block this module draws: deformable and neighbourhood attention."""
    return [(name, m) for name, m in model.named_modules() if is_drawn(m)]


def select_module(model: nn.Module, stage: Optional[int] = None, block: Optional[int] = None,
                  module: str = '') -> Tuple[str, nn.Module]:
    """The deformable or neighbourhood module named ``module``, or at ``stages.{stage}.attns.{block}``."""
    found = dict(deformable_modules(model))
    name = module[:-len('.tap')] if module.endswith('.tap') else module
    if not name:
        name = f'stages.{stage or 0}.attns.{block or 0}'
    if name not in found:
        raise SelectionError(f"no deformable or neighbourhood attention at '{name}'; valid: "
                             f"{', '.join(found) or 'none'}")
    return name, found[name]


def render_deformable(model: nn.Module, path: str, image: Union[str, Image.Image] = 'china',
                      stage: Optional[int] = None, block: Optional[int] = None, module: str = '',
                      query: Union[Tuple[int, int], Tuple[float, float]] = (0.5, 0.5), size: int = 224,
                      head: Union[int, str] = 'mean', out_size: int = 448, device: Any = 'cpu') -> Dict[str, Any]:
    """Draw one query of one deformable (or neighbourhood) block of ``model`` on ``image`` into ``path``.
    ``query``: a (row, col)
    cell of the block's grid (ints) or fractions of the image height/width (floats). ``size``: model input.
    Returns the points (pixel x, y), their weights and the block name."""
    from torchvision.transforms.functional import normalize, pil_to_tensor
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    photo = _photo(image)
    name, attn = select_module(model, stage, block, module)
    x = pil_to_tensor(photo.resize((size, size), Image.BICUBIC)).float() / 255.0
    x = normalize(x, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD).unsqueeze(0).to(device)
    neighborhood = attn.attn_kind == NEIGHBORHOOD_KIND
    if neighborhood:
        probs = capture_neighborhood(model.eval(), attn, x)
        hw = tuple(probs.shape[2:4])
    else:
        cap = capture_deformable(model.eval(), attn, x)
        hw = _block_hw(cap['probs'], (size, size))
    if all(isinstance(v, float) for v in query):
        query = (min(int(query[0] * hw[0]), hw[0] - 1), min(int(query[1] * hw[1]), hw[1] - 1))
    if neighborhood:
        points, weights = window_points(probs, query, attn.kernel_size, head=head)
        reference, what = points[:0], f'{attn.kernel_size}x{attn.kernel_size} neighbourhood keys'
    else:
        points, weights, reference = query_points(cap, query, hw, head=head)
        what = f'{len(points)} sampled keys'
    px, ref_px = to_pixels(points, hw, out_size), to_pixels(reference, hw, out_size)
    qxy = ((query[1] + 0.5) * out_size / hw[1], (query[0] + 0.5) * out_size / hw[0])
    draw(photo, px, weights.numpy(), ref_px, qxy, path,
         title=f'{name}: query {query} of {hw[0]}x{hw[1]}, {what} (size = attention weight)', size=out_size)
    return dict(name=name, query=query, points=torch.from_numpy(px), weights=weights, grid=hw)


def cli_render(args: Any, model: nn.Module, config: Any, image: Image.Image, device: Any,
               queries: Sequence[Tuple[int, int]]) -> Optional[List[str]]:
    """``python -m visualize`` hook: if the selected block is deformable or neighbourhood attention, draw its
    keys for each query (default: the centre cell) into ``--output`` and return the written paths; else None."""
    found = dict(deformable_modules(model))
    name = args.module[:-len('.tap')] if args.module.endswith('.tap') else args.module
    name = name or f'stages.{args.stage}.attns.{args.block}'
    if name not in found:
        return None
    os.makedirs(args.output, exist_ok=True)
    written = []
    head = int(args.head) if str(args.head).isdigit() else 'mean'
    for q in (queries or [(0.5, 0.5)]):
        info = render_deformable(model, os.path.join(args.output, 'tmp.png'), image, module=name, query=q,
                                 size=config.DATA.IMG_SIZE, head=head, out_size=max(args.size, 224),
                                 device=device)
        path = os.path.join(args.output, f'{name}_{found[name].attn_kind}_r{info["query"][0]}_c{info["query"][1]}.png')
        os.replace(os.path.join(args.output, 'tmp.png'), path)
        written.append(path)
    return written
