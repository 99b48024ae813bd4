"""Where each attention token sits in the image, read off the model: no family knowledge here.

An attention tap sees tokens grouped as (B', N, ...) with B' = batch * groups (windows, stripes) in the
block's own order. A block that implements the token-layout protocol,
``block.token_groups(attn_module) -> models.layers.TokenGroups`` (grid, (groups, N) flat positions,
window shape, keys_reduced), says where every (group, token) sits on its (H, W) grid; a tap's layout is that
same type. For other blocks, one group per image with as many keys as queries is taken as the whole image
in row-major order, after the prefix tokens (class, distillation, register tokens) that the attention module
(or else its block) counts in an integer ``num_prefix_tokens`` attribute; prefix tokens have no grid position.
Spatially reduced keys, and a block that cannot place its tokens (its ``token_groups`` raises ValueError,
e.g. windows that pad the map), raise :class:`LayoutError`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Tuple

import torch.nn as nn

from errors import LayoutError

if TYPE_CHECKING:          # the model library is imported when a model is, never by ``import visualize``
    from models.layers import TokenGroups


def prefix_tokens(block: nn.Module, attn: Optional[nn.Module]) -> int:
    """How many unpositioned tokens lead each group: the attention module's ``num_prefix_tokens``, else the
    block's, else 0."""
    for owner in (attn, block):
        count = getattr(owner, 'num_prefix_tokens', None)
        if isinstance(count, int) and not isinstance(count, bool):
            return count
    return 0


def token_layout(block: nn.Module, name: str, groups: int, n_query: int, n_key: int, batch: int,
                 image_hw: Tuple[int, int], attn: Optional[nn.Module] = None) -> TokenGroups:
    """The layout of block ``name`` whose tap (on attention module ``attn``) saw (groups, n_query) queries
    and n_key keys for ``batch`` images of size ``image_hw``. Raises LayoutError when it cannot be placed."""
    from models.layers import TokenGroups, whole_grid      # here: `import visualize` leaves the library unloaded
    if hasattr(block, 'token_groups'):
        try:
            desc = block.token_groups(attn)
        except ValueError as e:           # the model's own one-line reason (it knows its padding rules)
            raise LayoutError(f'{name}: {e}') from None
        if desc.keys_reduced or n_key != n_query:
            raise LayoutError(f'{name}: keys are spatially reduced ({n_query} queries, {n_key} keys); maps need '
                              f'one key per token (a spatial-reduction ratio of 1)')
        layout = TokenGroups(tuple(desc.grid), desc.positions, tuple(desc.window), prefix=desc.prefix)
    elif groups == batch and n_query == n_key:
        prefix = prefix_tokens(block, attn)
        n_grid = n_query - prefix
        h_img, w_img = image_hw
        H = round(math.sqrt(max(n_grid, 0) * h_img / w_img))
        W = n_grid // max(H, 1)
        if n_grid <= 0 or H * W != n_grid:
            lead = f' after {prefix} prefix tokens' if prefix else ''
            raise LayoutError(f'{name}: {n_grid} tokens{lead} do not form a grid of the image aspect '
                              f'{h_img}x{w_img}; an attention module with class or register tokens says how many '
                              f'in num_prefix_tokens')
        layout = whole_grid((H, W), prefix=prefix)
    elif n_key != n_query:
        raise LayoutError(f'{name}: keys are spatially reduced ({n_query} queries, {n_key} keys); maps need '
                          f'one key per token')
    else:
        raise LayoutError(f'{name}: attention runs in {groups // max(batch, 1)} windows per image and the block '
                          f'does not describe its token layout (token_groups)')
    n_grid = n_query - layout.prefix
    if layout.positions.shape != (groups // batch, n_grid) or n_key != n_query:
        raise LayoutError(f'{name}: tap saw {groups} groups of {n_query} queries / {n_key} keys, but the '
                          f'block layout expects {tuple(layout.positions.shape)} per image'
                          + (f' after {layout.prefix} prefix tokens' if layout.prefix else '')
                          + ' (was the model run at its native input size?)')
    return layout
