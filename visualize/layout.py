"""Where each attention token sits in the image: the only family-specific knowledge of ``visualize``.

An attention tap sees tokens grouped as (B', N, ...) with B' = batch * groups (Swin windows, CSwin
stripes) in a family-specific order. :func:`token_layout` maps every (group, token) back to a flat index
of the block's (H, W) token grid:

  * FLatten-Swin blocks (:class:`models.flatten_swin.SwinBlock`): cyclic shift by ``-shift`` then window
    partition; a window that covers the map is the identity.
  * Any other block whose attention covers the whole image (one group per image and as many keys as
    queries: PVT with sr 1, CSwin where the split equals the resolution): the identity on an (H, W) grid
    of the input's aspect ratio.
  * Anything else (spatially reduced keys, stripes) raises :class:`LayoutError`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn as nn

from models.flatten_swin import SwinBlock, window_partition


class LayoutError(ValueError):
    """The block's token grouping cannot be mapped back to image positions."""


@dataclass(frozen=True)
class TokenLayout:
    """grid: the block's (H, W) token grid; positions: (groups, N) long, flat grid index (row * W + col)
    of every query token of every group (keys share it: every supported block has n == N); window: the
    (h, w) spatial shape of one group, the image the depth-wise conv runs on."""
    grid: Tuple[int, int]
    positions: torch.Tensor
    window: Tuple[int, int]

    def locate(self, row: int, col: int) -> Tuple[int, int]:
        """(group, token) of grid cell (row, col)."""
        hit = (self.positions == row * self.grid[1] + col).nonzero()
        return int(hit[0, 0]), int(hit[0, 1])


def swin_layout(block: SwinBlock) -> TokenLayout:
    """Shifted-window layout of a FLatten-Swin block (window clamped to the map by the block itself)."""
    H, W = block.resolution
    index = torch.arange(H * W).view(1, H, W, 1)
    if block.shift:
        index = torch.roll(index, shifts=(-block.shift, -block.shift), dims=(1, 2))
    positions = window_partition(index, block.window).squeeze(-1)
    return TokenLayout((H, W), positions, (block.window, block.window))


def token_layout(block: nn.Module, name: str, groups: int, n_query: int, n_key: int, batch: int,
                 image_hw: Tuple[int, int]) -> TokenLayout:
    """The layout of block ``name`` whose tap saw (groups, n_query) queries and n_key keys for ``batch``
    images of size ``image_hw``. Raises LayoutError when the grouping is not one this module knows."""
    if isinstance(block, SwinBlock):
        layout = swin_layout(block)
    elif groups == batch and n_query == n_key:
        h_img, w_img = image_hw
        H = round(math.sqrt(n_query * h_img / w_img))
        W = n_query // max(H, 1)
        if H * W != n_query:
            raise LayoutError(f'{name}: {n_query} tokens do not form a grid of the image aspect {h_img}x{w_img}')
        layout = TokenLayout((H, W), torch.arange(n_query).unsqueeze(0), (H, W))
    elif n_key != n_query:
        raise LayoutError(f'{name}: keys are spatially reduced ({n_query} queries, {n_key} keys); supported are '
                          f'Swin blocks and whole-image blocks (PVT with sr ratio 1, CSwin split = resolution)')
    else:
        raise LayoutError(f'{name}: attention runs in {groups // max(batch, 1)} windows/stripes per image; '
                          f'supported are Swin blocks and whole-image blocks (PVT with sr ratio 1, CSwin split '
                          f'= resolution)')
    if layout.positions.shape != (groups // batch, n_query) or n_key != n_query:
        raise LayoutError(f'{name}: tap saw {groups} groups of {n_query} queries / {n_key} keys, but the '
                          f'block layout expects {tuple(layout.positions.shape)} per image')
    return layout
