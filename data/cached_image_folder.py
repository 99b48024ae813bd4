"""Image loading with clear errors, and the zip-mode dataset with in-memory caching.

Zip mode (``--zip``): ``<data-path>/train.zip`` + ``train_map.txt`` (and ``val.*``); each map line is
``<member path inside the zip><TAB><class index>``. Cache modes: 'no' reads members on demand, 'full'
keeps every member's bytes in memory, 'part' keeps only this rank's shard (index % world == rank), the
shard it reads with the matching sampler.
"""
from __future__ import annotations

import io
import logging
import os
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from errors import DataError

from .zipreader import ZipReader, is_zip_path

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
# ImageFile.LOAD_TRUNCATED_IMAGES stays False: a truncated file is an error, never silently padded.


# Modes with more than 8 bits per channel, PIL's convert('RGB') of which clips to 255 (destroying the data).
_HIGH_DEPTH_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F')
_warned_high_depth = [False]


def to_rgb(img: Image.Image, name: str = '<image>') -> Image.Image:
    """``img`` as 8-bit RGB. Single-channel images with more than 8 bits are rescaled, not clipped:
    16-bit integers (modes I;16*, and I with values in 0..65535) by 255/65535, floats (mode F) with
    values in [0, 1] by 255; other ranges are refused with a DataError. The first such image of the
    process logs a warning. (16-bit RGB PNGs are already reduced to 8 bits by PIL, correctly scaled.)"""
    if img.mode not in _HIGH_DEPTH_MODES:
        return img.convert('RGB')
    a = np.asarray(img, dtype=np.float64)
    if img.mode == 'F':
        if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
            raise DataError(f"cannot read image {name}: floating-point pixels outside [0, 1] (min {a.min():g}, "
                            f"max {a.max():g}) have no defined 8-bit scaling; save it as an 8- or 16-bit image")
        scale = 255.0
    else:
        if a.min() < 0 or a.max() > 65535:
            raise DataError(f"cannot read image {name}: 32-bit integer pixels outside 0..65535 have no defined "
                            f"8-bit scaling; save it as an 8- or 16-bit image")
        scale = 255.0 / 65535.0
    if not _warned_high_depth[0]:
        _warned_high_depth[0] = True
        logger.warning('image %s has more than 8 bits per channel (mode %s): scaled to 8 bits by %s (not clipped); '
                       'further such images are converted the same way without a warning', name, img.mode,
                       '255' if img.mode == 'F' else '255/65535')
    gray = Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8))   # 2-D uint8: mode L
    return gray.convert('RGB')


DATASET_FIX = 'replace or remove the file, or set DATA.SKIP_BAD_IMAGES True to skip unreadable images'


def load_image(source: Union[str, bytes], name: Optional[str] = None, fix: str = DATASET_FIX) -> Image.Image:
    """Decode an image fully (file path, zip path or bytes) as 8-bit RGB (:func:`to_rgb`: high bit depths
    are rescaled, not clipped): the one image reader of the training loader and ``visualize``. DataError
    naming the file if it is missing, unreadable or truncated; ``fix`` ends that message (what the caller
    can do about it)."""
    name = name or (source if isinstance(source, str) else '<bytes>')
    try:
        if isinstance(source, bytes):
            img = Image.open(io.BytesIO(source))
        elif is_zip_path(source):
            img = Image.open(io.BytesIO(ZipReader.read(source)))
        else:
            with open(source, 'rb') as f:
                img = Image.open(f)
                img.load()
        return to_rgb(img, name)
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, KeyError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot read image {name}: {reason}; {fix}") from None


def read_map_file(map_path: str, prefix: str) -> List[Tuple[str, int]]:
    """Parse a zip-mode map file into (zip path, class index) samples."""
    if not os.path.isfile(map_path):
        raise DataError(f"zip mode: map file {map_path} not found (expected next to the zip archive)")
    samples = []
    with open(map_path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip('\n').rsplit('\t', 1) if '\t' in line else line.split()
            try:
                member, label = parts[0].strip(), int(parts[-1])
            except (ValueError, IndexError):
                raise DataError(f"{map_path} line {n}: expected '<path><TAB><class index>', got {line.strip()!r}") from None
            if not member.lower().endswith(IMG_EXTENSIONS):
                raise DataError(f"{map_path} line {n}: {member!r} is not an image file name")
            samples.append((prefix + member, label))
    if not samples:
        raise DataError(f"zip mode: map file {map_path} lists no images")
    return samples


class CachedImageFolder(Dataset):
    """Samples from a zip archive + map file. ``samples[i]`` = (zip path, label); ``classes`` = sorted
    label indices. Returns (transform(image), label)."""

    def __init__(self, root: str, ann_file: str, prefix: str, transform: Optional[Callable] = None,
                 cache_mode: str = 'no', rank: int = 0, world_size: int = 1) -> None:
        self.root = root
        self.samples = read_map_file(os.path.join(root, ann_file), os.path.join(root, prefix))
        self.targets = [y for _, y in self.samples]
        self.classes = sorted(set(self.targets))
        self.transform = transform
        self.loader = load_image
        self._cache: List[Optional[bytes]] = [None] * len(self.samples)
        if cache_mode in ('full', 'part'):
            self._fill_cache(cache_mode, rank, world_size)

    def _fill_cache(self, mode: str, rank: int, world: int) -> None:
        n = len(self.samples)
        for i, (path, _) in enumerate(self.samples):
            if mode == 'full' or i % world == rank:
                try:
                    self._cache[i] = ZipReader.read(path)
                except (OSError, KeyError) as e:
                    raise DataError(f"zip mode: cannot read {path}: {e}") from None
            if (i + 1) % max(1, n // 10) == 0:
                logger.info('caching %s: %d/%d images', self.root, i + 1, n)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        cached = self._cache[index]
        image = load_image(cached, path) if cached is not None else load_image(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, target
