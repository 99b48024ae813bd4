"""Drawing: attention maps over the image (Pillow) and figure grids (matplotlib, Agg canvas, no pyplot)."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

QUERY_COLOUR = (255, 255, 255)


def overlay(image: Image.Image, amap: torch.Tensor, query: Tuple[int, int], size: int, cmap: str = 'jet',
            alpha: float = 0.5, smooth: bool = False) -> Image.Image:
    """The (H, W) map scaled to [0, 1] by its maximum, upsampled to size x size (nearest: one cell per
    token, or bilinear with ``smooth``), coloured, blended over the image; the query cell is outlined."""
    H, W = amap.shape
    values = amap.double().clamp(min=0)
    values = (values / values.max().clamp(min=1e-12)).float()[None, None]
    values = torch.nn.functional.interpolate(values, size=(size, size),
                                             mode='bilinear' if smooth else 'nearest')[0, 0].numpy()
    heat = colormaps[cmap](values)[..., :3] * 255.0
    base = np.asarray(image.convert('RGB').resize((size, size), Image.BICUBIC), dtype=np.float64)
    out = Image.fromarray((base * (1 - alpha) + heat * alpha).round().clip(0, 255).astype(np.uint8))
    r, c = query
    ch, cw = size / H, size / W
    box = (c * cw, r * ch, max(c * cw, (c + 1) * cw - 1), max(r * ch, (r + 1) * ch - 1))   # cells < 1 px: a dot
    draw = ImageDraw.Draw(out)
    draw.rectangle(box, outline=QUERY_COLOUR, width=max(1, size // 128))
    cx, cy, arm = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, max(cw, ch) * 0.75 + 2
    draw.line((cx - arm, cy, cx - cw / 2, cy), fill=QUERY_COLOUR, width=max(1, size // 128))
    draw.line((cx + cw / 2, cy, cx + arm, cy), fill=QUERY_COLOUR, width=max(1, size // 128))
    return out


def save_grid(panels: Sequence[Sequence[Image.Image]], titles: Sequence[Sequence[str]], path: str,
              row_labels: Optional[Sequence[str]] = None, title: str = '', panel_inches: float = 2.0,
              dpi: int = 100) -> None:
    """A rows x cols figure of image panels with per-panel titles and optional row labels, saved as PNG."""
    rows, cols = len(panels), max(len(r) for r in panels)
    width = max(cols * panel_inches + (1.0 if row_labels else 0), 3.5)
    fig = Figure(figsize=(width, rows * (panel_inches + 0.3) + (0.5 if title else 0)), dpi=dpi)
    FigureCanvasAgg(fig)
    for i, row in enumerate(panels):
        for j in range(cols):
            ax = fig.add_subplot(rows, cols, i * cols + j + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(row):
                ax.axis('off')
                continue
            ax.imshow(row[j])
            ax.set_title(titles[i][j], fontsize=8)
            if row_labels and j == 0:
                ax.set_ylabel(row_labels[i], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


def grid_shape(count: int) -> Tuple[int, int]:
    """(rows, cols) of a near-square grid for ``count`` panels."""
    cols = max(1, math.ceil(math.sqrt(count)))
    return math.ceil(count / cols), cols
