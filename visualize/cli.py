"""``python -m visualize``: attention maps of one block of a model on one image, written as PNGs.

Outputs in --output (``<site>`` is the attention module path, e.g. ``layers.0.blocks.1.attn``):
  <site>_r<row>_c<col>.png    one overlay per query, --size x --size pixels
  <site>_grid.png             the first --max-grid queries in one figure
  compare_<site>_*.png        with --compare-cfg: the same files for the second model, and
  compare_grid.png            the same queries side by side, one row per model
Every user error is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms.functional import normalize, pil_to_tensor

from config import ConfigError, load_config
from models import build_model
from .capture import (AttentionMaps, AttentionSite, SelectionError, attention_maps, attention_sites, capture,
                      describe_sites, query_lattice, select_site)
from .layout import LayoutError
from .render import grid_shape, overlay, save_grid

logger = logging.getLogger('visualize')

try:
    from checkpoint import CheckpointError
except ImportError:                       # checkpoint.py absent: --checkpoint reports it as an InputError
    class CheckpointError(RuntimeError):  # type: ignore[no-redef]
        """Placeholder so that the error tuple below is always valid."""


class InputError(ValueError):
    """An unreadable image or a malformed option value."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m visualize',
                                description='Attention maps of one block (hooked, no model edits) on an image.')
    p.add_argument('--cfg', required=True, help='model config YAML, e.g. cfgs/flatten_swin_t.yaml')
    p.add_argument('--opts', nargs='+', default=[], metavar='KEY VALUE', help='config overrides')
    p.add_argument('--checkpoint', default='', help='weights (.pth); default: a randomly initialised model')
    p.add_argument('--ema', action='store_true', help="use the checkpoint's EMA weights")
    p.add_argument('--image', default='', help='input image (any format Pillow reads); required unless --list')
    p.add_argument('--stage', type=int, default=0, help='stage index, from 0 (default 0)')
    p.add_argument('--block', type=int, default=0, help='block index within the stage, from 0 (default 0)')
    p.add_argument('--module', default='', help='attention module path instead of --stage/--block, '
                                                'e.g. layers.1.blocks.0.attn')
    p.add_argument('--list', action='store_true', help='print the attention blocks of the model and exit')
    p.add_argument('--queries', nargs='+', default=[], metavar='ROW,COL', help='query cells on the token grid')
    p.add_argument('--query-stride', type=int, default=0,
                   help='every k-th cell along each axis (default: about 4 x 4 queries)')
    p.add_argument('--head', default='mean', help="head index or 'mean' (default)")
    p.add_argument('--dwc-channel', default='0',
                   help="linear blocks: dwc kernel channel folded into the matrix (official: 0) or 'mean'")
    p.add_argument('--no-dwc', action='store_true', help='linear blocks: phi(q) phi(k)^T only, no dwc')
    p.add_argument('--output', default='output/visualize', help='folder for the PNGs')
    p.add_argument('--size', type=int, default=224, help='side of each overlay in pixels (default 224)')
    p.add_argument('--cmap', default='jet', help='matplotlib colormap (default jet)')
    p.add_argument('--alpha', type=float, default=0.5, help='opacity of the map over the image (default 0.5)')
    p.add_argument('--smooth', action='store_true', help='bilinear upsampling instead of one cell per token')
    p.add_argument('--max-grid', type=int, default=16, help='queries shown in the grid figures (default 16)')
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
        return int(value)
    except ValueError:
        raise InputError(f"{flag} must be an integer or 'mean', got {value!r}") from None


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


def load_image(path: str) -> Image.Image:
    """The centred square crop of the image at ``path`` (RGB)."""
    try:
        with Image.open(path) as f:
            image = f.convert('RGB')
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise InputError(f"cannot read image '{path}': {e}") from None
    w, h = image.size
    s = min(w, h)
    return image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))


def to_input(image: Image.Image, size: int) -> torch.Tensor:
    """(1, 3, size, size) ImageNet-normalised model input of a square RGB image."""
    x = pil_to_tensor(image.resize((size, size), Image.BICUBIC)).float() / 255.0
    return normalize(x, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD).unsqueeze(0)


def load_model(cfg: str, opts: Sequence[str], checkpoint: str, ema: bool, seed: int,
               device: torch.device) -> Tuple[nn.Module, object]:
    """Config -> model (seeded random init), then the checkpoint's weights through checkpoint.py."""
    config = load_config(cfg, list(opts))
    torch.manual_seed(seed)
    model = build_model(config)
    if checkpoint:
        try:
            from checkpoint import extract_model_state, load_checkpoint, load_model_state
        except ImportError as e:
            raise InputError(f'cannot load --checkpoint: checkpoint.py is not usable ({e})') from None
        load_model_state(model, extract_model_state(load_checkpoint(checkpoint), prefer_ema=ema), checkpoint)
    return model.to(device).eval(), config


@dataclass
class Rendered:
    """One model's maps for the selected queries; ``about``: model name, weights, module, attention kind."""
    about: Tuple[str, str, str, str]
    site: AttentionSite
    maps: AttentionMaps

    @property
    def title(self) -> str:
        return '{} ({})\n{} ({})'.format(*self.about)


def compute(args: argparse.Namespace, model: nn.Module, config, module: str, image: Image.Image,
            device: torch.device, checkpoint: str) -> Rendered:
    """Select the block, capture its attention on ``image`` and reduce it to per-query maps."""
    site = select_site(attention_sites(model), args.stage, args.block, module or None)
    size = config.DATA.IMG_SIZE
    cap = capture(model, site, to_input(image, size).to(device))
    maps = attention_maps(site, cap, (size, size), head=_reduce_arg(args.head, '--head'),
                          fold_dwc=not args.no_dwc, dwc_channel=_reduce_arg(args.dwc_channel, '--dwc-channel'))
    kind = 'focused linear' + ('' if args.no_dwc else ' + dwc') if maps.kind == 'linear' else 'softmax'
    weights = os.path.basename(checkpoint) if checkpoint else f'random init, seed {args.seed}'
    return Rendered((config.MODEL.NAME, weights, site.name, kind), site, maps)


def list_sites(model: nn.Module) -> str:
    """The blocks a selection may name, one attention module a line."""
    sites = attention_sites(model)
    return '\n'.join([describe_sites(sites)] + [
        f'  --stage {s.stage} --block {s.block}: {s.name} ({type(s.module).__name__})' for s in sites])


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
        titles = [[f'query ({r}, {c})' for r, c in shown[i * nc:(i + 1) * nc]] for i in range(nr)]
        path = f'{prefix}_grid.png'
        save_grid(panels, titles, path, title=res.title)
        written.append(path)
    if len(results) > 1:
        path = os.path.join(args.output, 'compare_grid.png')
        titles = [[f'query ({r}, {c})' for r, c in shown]] * len(results)
        save_grid(rows, titles, path, row_labels=['\n'.join(r.about) for r in results])
        written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        if args.device != 'cpu' and not (args.device.startswith('cuda') and torch.cuda.is_available()):
            raise InputError(f"--device {args.device!r} is not available here; use --device cpu")
        device = torch.device(args.device)
        if not args.list:
            if not args.image:
                raise InputError('--image is required (a photo to draw the attention maps on)')
            image = load_image(args.image)
            queries = parse_queries(args.queries)
        model, config = load_model(args.cfg, args.opts, args.checkpoint, args.ema, args.seed, device)
        if args.list:
            sys.stdout.write(list_sites(model) + '\n')
            return 0
        from .deformable import cli_render      # DAT++ 'D' / 'N' blocks: key positions, not a map
        written = cli_render(args, model, config, image, device, queries)
        if written is not None:
            logger.info('wrote %d PNGs to %s', len(written), args.output)
            return 0
        results = [compute(args, model, config, args.module, image, device, args.checkpoint)]
        if args.compare_cfg:
            opts = args.opts if args.compare_opts is None else args.compare_opts
            model, config = load_model(args.compare_cfg, opts, args.compare_checkpoint, args.ema, args.seed, device)
            results.append(compute(args, model, config, args.compare_module or args.module, image, device,
                                   args.compare_checkpoint))
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
        written = render_all(args, image, results, queries)
    except (ConfigError, SelectionError, LayoutError, InputError, CheckpointError) as e:
        sys.stderr.write(f'visualize: error: {e}\n')
        return 2
    logger.info('wrote %d PNGs to %s', len(written), args.output)
    return 0
