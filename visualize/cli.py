"""``python -m visualize``: attention maps of one block of a model on one image, written as PNGs.

Outputs in --output (``<site>`` is the attention module path, as ``--list`` prints it):
  <site>_r<row>_c<col>.png    one overlay per query, --size x --size pixels
  <site>_grid.png             the first --max-grid queries in one figure
  compare_<site>_*.png        with --compare-cfg: the same files for the second model, and
  compare_grid.png            the same queries side by side, one row per model
Deformable and neighbourhood attention (``attn_kind``) has no map over the token grid: its sampled keys are
drawn instead, one ``<site>_<kind>_r<row>_c<col>.png`` per query (see deformable.py).
Every user error (a :class:`errors.UserError`) is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from PIL import Image

from config import load_config
from errors import InputError, UserError, report
from models import build_model
from .capture import (AttentionMaps, AttentionSite, SelectionError, attention_maps, attention_sites,
                      capture, list_sites, query_lattice, select_site)
from .deformable import is_drawn, render_keys
from .photo import load_photo, to_input
from .render import grid_shape, overlay, save_grid

logger = logging.getLogger('visualize')

# Options that only shape the attention-map overlays (dest -> flag); their defaults are applied after the
# check that they were not given for a block drawn as key positions.
MAP_OPTIONS = {'cmap': ('--cmap', 'jet'), 'alpha': ('--alpha', 0.5), 'max_grid': ('--max-grid', 16),
               'dwc_channel': ('--dwc-channel', '0'), 'smooth': ('--smooth', False), 'no_dwc': ('--no-dwc', False)}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m visualize',
                                description='Attention maps of one block (hooked, no model edits) on an image.')
    p.add_argument('--cfg', required=True, help='model config YAML, as for main.py')
    p.add_argument('--opts', nargs='+', default=[], metavar='KEY VALUE', help='config overrides')
    p.add_argument('--checkpoint', default='', help='weights (.pth); default: a randomly initialised model')
    p.add_argument('--ema', action='store_true', help="use the checkpoint's EMA weights")
    p.add_argument('--image', default='', help='input image (any format Pillow reads); required unless --list')
    p.add_argument('--stage', type=int, default=0, help='stage index, from 0 (default 0; --list prints them)')
    p.add_argument('--block', type=int, default=0, help='block index within the stage (default 0)')
    p.add_argument('--module', default='', help='attention module path instead of --stage/--block (--list prints '
                                                'them)')
    p.add_argument('--list', action='store_true', help='print the attention modules and the options that select '
                                                       'each, and exit')
    p.add_argument('--queries', nargs='+', default=[], metavar='ROW,COL', help='query cells on the token grid')
    p.add_argument('--query-stride', type=int, default=None,
                   help='every k-th cell along each axis (default: about 4 x 4 queries; drawn keys: the centre)')
    p.add_argument('--head', default='mean', help="head index or 'mean' (default)")
    p.add_argument('--dwc-channel', default=None,
                   help="linear blocks: dwc kernel channel folded into the matrix (official: 0) or 'mean'")
    p.add_argument('--no-dwc', action='store_true', default=None, help='linear blocks: phi(q) phi(k)^T only, no dwc')
    p.add_argument('--output', default='output/visualize', help='folder for the PNGs')
    p.add_argument('--size', type=int, default=224, help='side of each overlay in pixels (default 224)')
    p.add_argument('--cmap', default=None, help='matplotlib colormap (default jet)')
    p.add_argument('--alpha', type=float, default=None, help='opacity of the map over the image (default 0.5)')
    p.add_argument('--smooth', action='store_true', default=None,
                   help='bilinear upsampling instead of one cell per token')
    p.add_argument('--max-grid', type=int, default=None, help='queries shown in the grid figures (default 16)')
    p.add_argument('--compare-cfg', default='', help="a second model (e.g. the 'S' counterpart) shown side by side")
    p.add_argument('--compare-opts', nargs='+', default=None, metavar='KEY VALUE',
                   help='overrides for --compare-cfg (default: the --opts)')
    p.add_argument('--compare-checkpoint', default='', help='weights of the second model')
    p.add_argument('--compare-module', default='', help='attention module of the second model '
                                                        '(default: the same --stage/--block or --module)')
    p.add_argument('--seed', type=int, default=0, help='seed of randomly initialised models')
    p.add_argument('--device', default='cpu', help='cpu (default) or cuda')
    return p.parse_args(argv)


def _reduce_arg(value: str, flag: str):
    if value == 'mean':
        return 'mean'
    try:
        index = int(value)
    except ValueError:
        index = -1
    if index < 0:
        raise InputError(f"{flag} must be a non-negative integer or 'mean', got {value!r}")
    return index


def parse_queries(items: Sequence[str]) -> List[Tuple[int, int]]:
    """['3,4', '10,12'] -> [(3, 4), (10, 12)]."""
    out = []
    for item in items:
        try:
            r, c = (int(v) for v in item.split(','))
        except ValueError:
            raise InputError(f"--queries takes ROW,COL pairs like 3,4; got {item!r}") from None
        out.append((r, c))
    return out


def _colormap_names() -> List[str]:
    from matplotlib import colormaps
    return sorted(colormaps)


def check_args(args: argparse.Namespace) -> None:
    """Reject option values that cannot work, before any model is built (InputError, one line)."""
    if args.size < 1:
        raise InputError(f'--size is the side of each picture in pixels and must be >= 1, got {args.size}')
    if args.max_grid is not None and args.max_grid < 1:
        raise InputError(f'--max-grid is how many queries the grid figure shows and must be >= 1, '
                         f'got {args.max_grid}')
    if args.alpha is not None and not 0.0 <= args.alpha <= 1.0:
        raise InputError(f'--alpha is an opacity and must be in [0, 1], got {args.alpha}')
    if args.cmap is not None and args.cmap not in _colormap_names():
        close = difflib.get_close_matches(args.cmap, _colormap_names(), n=3)
        raise InputError(f"--cmap {args.cmap!r} is not a matplotlib colormap; "
                         f"{'did you mean ' + ', '.join(close) + '?' if close else 'e.g. jet, viridis, magma'}")
    if args.query_stride is not None and args.query_stride < 1:
        raise InputError(f'--query-stride must be >= 1, got {args.query_stride}')
    if args.queries and args.query_stride is not None:
        raise InputError('--queries and --query-stride both choose the queries; give one of them')
    for flag, value in (('--compare-opts', args.compare_opts), ('--compare-checkpoint', args.compare_checkpoint),
                        ('--compare-module', args.compare_module)):
        if value and not args.compare_cfg:
            raise InputError(f'{flag} describes the second model of --compare-cfg; add --compare-cfg or leave it out')
    if args.ema and not (args.checkpoint or args.compare_checkpoint):
        raise InputError('--ema picks the EMA weights of --checkpoint; add --checkpoint or leave --ema out')
    _reduce_arg(args.head, '--head')
    if args.dwc_channel is not None:
        _reduce_arg(args.dwc_channel, '--dwc-channel')
    parse_queries(args.queries)
    if args.device != 'cpu' and not (args.device.startswith('cuda') and torch.cuda.is_available()):
        raise InputError(f"--device {args.device!r} is not available here; use --device cpu")


def load_model(cfg: str, opts: Sequence[str], checkpoint: str, ema: bool, seed: int,
               device: torch.device) -> Tuple[nn.Module, object]:
    """Config -> model (seeded random init), then the checkpoint's weights through checkpoint.py."""
    config = load_config(cfg, list(opts))
    torch.manual_seed(seed)
    model = build_model(config)
    if checkpoint:
        from checkpoint import extract_model_state, load_checkpoint, load_model_state
        load_model_state(model, extract_model_state(load_checkpoint(checkpoint), prefer_ema=ema), checkpoint)
    return model.to(device).eval(), config


def model_sites(model: nn.Module, config) -> List[AttentionSite]:
    """The attention sites of ``model``; a one-line SelectionError naming the model when it has none."""
    sites = attention_sites(model)
    if not sites:
        raise SelectionError(f"{config.MODEL.TYPE} has no attention module with a tap (an AttentionTap child "
                             f"through which a hook reads the attention, see models/focused_attention.py), so "
                             f"there is no attention to draw; choose a --cfg whose model has one")
    return sites


@dataclass
class Target:
    """One model to draw: the model, its config, the selected attention site and the weights file."""
    model: nn.Module
    config: object
    site: AttentionSite
    checkpoint: str


@dataclass
class Rendered:
    """One model's maps for the selected queries; ``about``: model name, weights, module, attention kind."""
    about: Tuple[str, str, str, str]
    site: AttentionSite
    maps: AttentionMaps

    @property
    def title(self) -> str:
        return '{} ({})\n{} ({})'.format(*self.about)


def compute(args: argparse.Namespace, target: Target, image: Image.Image, device: torch.device) -> Rendered:
    """Capture the target block's attention on ``image`` and reduce it to per-query maps."""
    site, config = target.site, target.config
    size = config.DATA.IMG_SIZE
    cap = capture(target.model, site, to_input(image, size).to(device))
    maps = attention_maps(site, cap, (size, size), head=_reduce_arg(args.head, '--head'),
                          fold_dwc=not args.no_dwc, dwc_channel=_reduce_arg(args.dwc_channel, '--dwc-channel'))
    kind = 'focused linear' + ('' if args.no_dwc else ' + dwc') if maps.kind == 'linear' else 'softmax'
    weights = os.path.basename(target.checkpoint) if target.checkpoint else f'random init, seed {args.seed}'
    return Rendered((config.MODEL.NAME, weights, site.name, kind), site, maps)


def render_all(args: argparse.Namespace, image: Image.Image, results: Sequence[Rendered],
               queries: Sequence[Tuple[int, int]]) -> List[str]:
    """Write per-query overlays for each model, its grid figure, and the comparison figure."""
    os.makedirs(args.output, exist_ok=True)
    written = []
    shown = queries[:args.max_grid]
    rows = []
    for k, res in enumerate(results):
        prefix = os.path.join(args.output, ('compare_' if k else '') + res.site.name)
        tiles = []
        for r, c in queries:
            tile = overlay(image, res.maps.query_map(r, c), (r, c), args.size, args.cmap, args.alpha, args.smooth)
            path = f'{prefix}_r{r}_c{c}.png'
            tile.save(path)
            written.append(path)
            tiles.append(tile)
        rows.append(tiles[:len(shown)])
        nr, nc = grid_shape(len(shown))
        panels = [tiles[i * nc:(i + 1) * nc] for i in range(nr)]
        titles = [[_query_title(res.maps, r, c) for r, c in shown[i * nc:(i + 1) * nc]] for i in range(nr)]
        path = f'{prefix}_grid.png'
        save_grid(panels, titles, path, title=res.title)
        written.append(path)
    if len(results) > 1:
        path = os.path.join(args.output, 'compare_grid.png')
        titles = [[f'query ({r}, {c})' for r, c in shown]] * len(results)
        save_grid(rows, titles, path, row_labels=['\n'.join(r.about) for r in results])
        written.append(path)
    return written


def _query_title(maps: AttentionMaps, row: int, col: int) -> str:
    """'query (r, c)', with the share of its attention on the prefix tokens (not drawn) when the block has any."""
    share = maps.query_prefix_share(row, col)
    return f'query ({row}, {col})' + ('' if share is None else f', {100 * share:.0f}% on prefix tokens')


def _kind(site: AttentionSite) -> str:
    return getattr(site.module, 'attn_kind', None) or 'unknown'


def draw_keys(args: argparse.Namespace, targets: Sequence[Target], image: Image.Image, device: torch.device,
              queries: Sequence[Tuple[int, int]]) -> List[str]:
    """Deformable / neighbourhood blocks: their keys drawn per query; the map-only options do not apply."""
    given = [flag for dest, (flag, _) in MAP_OPTIONS.items() if getattr(args, dest) not in (None, False)]
    if given:
        site = targets[0].site
        raise InputError(f"{', '.join(given)} shape{'s' if len(given) == 1 else ''} attention-map overlays, but "
                         f"{site.name} is {_kind(site)} attention, drawn as key positions; leave "
                         f"{'it' if len(given) == 1 else 'them'} out")
    return render_keys([(t.model, t.config.DATA.IMG_SIZE, t.site) for t in targets], image, args.output,
                       queries, args.query_stride, _reduce_arg(args.head, '--head'), max(args.size, 224), device)


def draw_maps(args: argparse.Namespace, targets: Sequence[Target], image: Image.Image, device: torch.device,
              queries: Sequence[Tuple[int, int]]) -> List[str]:
    """Linear / softmax blocks: per-query overlays, grid figures and the comparison figure."""
    for dest, (_, default) in MAP_OPTIONS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    results = [compute(args, t, image, device) for t in targets]
    grid = results[0].maps.grid
    for res in results[1:]:
        if res.maps.grid != grid:
            raise SelectionError(f'the compared blocks have different token grids ({grid} vs '
                                 f'{res.maps.grid}); choose blocks of the same resolution')
    queries = queries or query_lattice(grid, args.query_stride or max(1, grid[0] // 4))
    for r, c in queries:
        if not (0 <= r < grid[0] and 0 <= c < grid[1]):
            raise SelectionError(f'query ({r}, {c}) is outside the {grid[0]}x{grid[1]} token grid of this '
                                 f'block (rows 0-{grid[0] - 1}, cols 0-{grid[1] - 1})')
    return render_all(args, image, results, queries)


def run(args: argparse.Namespace) -> Optional[List[str]]:
    """The command: list the attention modules (None), or draw the selected block(s) (the written paths)."""
    check_args(args)
    device = torch.device(args.device)
    if not args.list:
        if not args.image:
            raise InputError('--image is required (a photo to draw the attention maps on)')
        image = load_photo(args.image)
        queries = parse_queries(args.queries)
    model, config = load_model(args.cfg, args.opts, args.checkpoint, args.ema, args.seed, device)
    sites = model_sites(model, config)
    if args.list:
        sys.stdout.write(list_sites(sites) + '\n')
        return None
    targets = [Target(model, config, select_site(sites, args.stage, args.block, args.module or None),
                      args.checkpoint)]
    if args.compare_cfg:
        opts = args.opts if args.compare_opts is None else args.compare_opts
        model, config = load_model(args.compare_cfg, opts, args.compare_checkpoint, args.ema, args.seed, device)
        module = args.compare_module or args.module
        targets.append(Target(model, config, select_site(model_sites(model, config), args.stage, args.block,
                                                         module or None), args.compare_checkpoint))
    drawn = [is_drawn(t.site.module) for t in targets]
    if any(drawn) != all(drawn):
        a, b = targets
        raise SelectionError(f'--compare-cfg: {a.site.name} is {_kind(a.site)} attention and {b.site.name} is '
                             f'{_kind(b.site)} attention; one is drawn as key positions, the other as a map, so they '
                             f'cannot be shown side by side: choose blocks of the same kind')
    if all(drawn):
        return draw_keys(args, targets, image, device, queries)
    return draw_maps(args, targets, image, device, queries)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        written = run(args)
    except UserError as e:
        return report(e)
    if written is not None:
        logger.info('wrote %d PNGs to %s', len(written), args.output)
    return 0
