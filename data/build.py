"""Datasets, transforms, samplers, loaders and Mixup/CutMix for ImageNet-layout data.

Folder mode: ``<data-path>/train/<class>/*`` and ``<data-path>/val/<class>/*`` (torchvision ImageFolder's
layout and labels; the walk follows symlinks once, and val uses train's class list, checked equal);
zip mode: ``train.zip`` + ``train_map.txt`` (see ``cached_image_folder``). Every image is decoded fully:
an unreadable or truncated file is a ``DataError`` naming it, or, with DATA.SKIP_BAD_IMAGES, is dropped
from its batch and reported by the loop (batches are ``(images, targets, bad_paths)``).
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch
from PIL import Image, ImageOps
from timm.data import Mixup, auto_augment, create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import str_to_pil_interp
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from yacs.config import CfgNode

from config import ConfigError
from errors import DataError
from utils import seed_host

from .cached_image_folder import DATASET_FIX, IMG_EXTENSIONS, CachedImageFolder, load_image
from .samplers import ExactEvalSampler, RepeatedAugSampler, ResumableSampler

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- transforms
def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize op, also for 0 bits: RandAugment 'inc1' asks for 0 bits at magnitude 10 (reached
    by m9 with mstd noise), which Pillow >= 12 rejects; older Pillow returned a black image, as here."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def patch_randaugment_posterize() -> bool:
    """Point timm's Posterize ops at ``_posterize`` (idempotent; returns whether anything changed).
    Called explicitly by the entry point (``runner.run``), never on import."""
    changed = False
    for name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
        if auto_augment.NAME_TO_OP.get(name) is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize
            changed = True
    return changed


LUMA = (0.299, 0.587, 0.114)          # ITU-R BT.601 weights of R, G, B


def to_grayscale(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) normalised RGB -> (1, H, W): the BT.601 luma of the normalised channels (MODEL.IN_CHANS 1)."""
    weights = torch.tensor(LUMA, dtype=image.dtype, device=image.device)
    return torch.einsum('chw,c->hw', image, weights).unsqueeze(0)


def build_transform(is_train: bool, config: CfgNode) -> Callable:
    """:func:`rgb_transform`, then :func:`to_grayscale` when the model takes one input channel."""
    from models.config_adapter import input_channels
    t = rgb_transform(is_train, config)
    return transforms.Compose([t, to_grayscale]) if input_channels(config)[0] == 1 else t


def rgb_transform(is_train: bool, config: CfgNode) -> Callable:
    """Training: timm ``create_transform`` (random resized crop of AUG.SCALE, flip with AUG.HFLIP,
    RandAugment, colour jitter, random erasing per AUG.*); at 32 px and below (CIFAR-style) a resize to
    IMG_SIZE (a no-op for images of that size) + RandomCrop(padding 4) replaces the random resized crop.
    Evaluation: resize to IMG_SIZE/TEST.CROP_PCT (square as official FLatten/Swin, or the shorter side with
    TEST.RESIZE_SHORT_SIDE as DeiT/ConvNeXt) + centre crop (TEST.CROP, above 32 px), or a direct resize to
    IMG_SIZE x IMG_SIZE (also at IMG_SIZE >= TEST.NO_CROP_MIN_SIZE when set: ConvNeXt/L2ViT's 384 rule)."""
    size, aug = config.DATA.IMG_SIZE, config.AUG
    resize = size > 32
    if is_train:
        t = create_transform(
            input_size=size, is_training=True,
            color_jitter=aug.COLOR_JITTER if aug.COLOR_JITTER > 0 else None,
            auto_augment=aug.AUTO_AUGMENT if aug.AUTO_AUGMENT not in ('', 'none', None) else None,
            re_prob=aug.REPROB, re_mode=aug.REMODE, re_count=aug.RECOUNT, hflip=aug.HFLIP,
            scale=tuple(aug.SCALE), interpolation=config.DATA.INTERPOLATION)
        if not resize:   # small images: resize to the size first (no-op when it matches), then pad-crop
            interp = str_to_pil_interp('bicubic' if config.DATA.INTERPOLATION == 'random' else config.DATA.INTERPOLATION)
            t.transforms[0:1] = [transforms.Resize((size, size), interpolation=interp),
                                 transforms.RandomCrop(size, padding=4)]
        return t
    interp = str_to_pil_interp('bicubic' if config.DATA.INTERPOLATION == 'random' else config.DATA.INTERPOLATION)
    steps: List[Any] = []
    no_crop_from = config.TEST.NO_CROP_MIN_SIZE
    if resize and config.TEST.CROP and not (no_crop_from and size >= no_crop_from):
        crop_from = int(size / config.TEST.CROP_PCT)      # = int(size * 256 / 224) at the default 0.875
        shape = crop_from if config.TEST.RESIZE_SHORT_SIDE else (crop_from, crop_from)
        steps += [transforms.Resize(shape, interpolation=interp), transforms.CenterCrop(size)]
    else:               # also at 32 px and below, where images of another size must be resized too
        steps.append(transforms.Resize((size, size), interpolation=interp))
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return transforms.Compose(steps)


# ----------------------------------------------------------------------------- datasets
@dataclass
class BadSample:
    """Stand-in for an image that could not be read (DATA.SKIP_BAD_IMAGES)."""
    path: str
    reason: str


class SampleDataset(Dataset):
    """Wraps an ImageFolder-like dataset (``samples``, ``classes``): an index may come with a seed
    ``(index, seed)`` that reseeds python/numpy/torch before the sample is loaded and augmented, making
    augmentation a function of (seed, epoch, index). Bad images raise DataError, or become BadSample."""

    def __init__(self, dataset: Dataset, skip_bad: bool = False) -> None:
        self.dataset, self.skip_bad = dataset, skip_bad

    @property
    def classes(self) -> list:
        return self.dataset.classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is not None:
            seed_host(seed)
        try:
            return self.dataset[index]
        except DataError as e:
            if not self.skip_bad:
                raise
            return BadSample(self.dataset.samples[index][0], str(e))


def collate(batch: list) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], List[str]]:
    """Default collation of the good samples; returns (images, targets, paths of skipped images)."""
    bad = [b.path for b in batch if isinstance(b, BadSample)]
    good = [b for b in batch if not isinstance(b, BadSample)]
    if not good:
        return None, None, bad
    images, targets = torch.utils.data.default_collate(good)
    return images, targets, bad


def find_classes(root: str) -> List[str]:
    """The class folders of a split (sorted names of its sub-folders, symlinks followed), as torchvision's
    ImageFolder; a label is the index of its folder in this list."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir())


@dataclass
class ScanReport:
    """What a folder scan left out: non-image files and directories reached a second time (symlink loops
    or several links to one folder, followed once)."""
    non_images: int = 0
    repeated_dirs: int = 0

    def describe(self) -> str:
        parts = []
        if self.non_images:
            parts.append(f'{self.non_images} non-image files (extensions other than {", ".join(IMG_EXTENSIONS)})')
        if self.repeated_dirs:
            parts.append(f'{self.repeated_dirs} directories reached again or upwards through a symlink (loops are followed once)')
        return '; '.join(parts)


def _walk_class(folder: str, report: ScanReport, seen: set) -> List[str]:
    """Image files under ``folder`` (symlinks followed, each real directory once, never up to a folder
    that contains ``folder``), in torchvision's order (sorted by directory path, then by file name)."""
    found: List[Tuple[str, List[str]]] = []

    def on_error(e: OSError) -> None:
        logger.warning('cannot list %s: %s', e.filename, e.strerror)

    top = os.path.realpath(folder)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=on_error):
        key = os.path.realpath(dirpath)
        # reached again (a loop, or a second link to one folder), or a link up to a folder above the class
        if key in seen or top.startswith(key.rstrip(os.sep) + os.sep):
            report.repeated_dirs += 1
            dirnames[:] = []
            continue
        seen.add(key)
        images = [f for f in filenames if f.lower().endswith(IMG_EXTENSIONS)]
        report.non_images += len(filenames) - len(images)
        found.append((dirpath, sorted(images)))
    return [os.path.join(d, f) for d, names in sorted(found) for f in names]


def scan_image_folder(root: str, classes: List[str], show_progress: bool = True
                      ) -> Tuple[List[Tuple[str, int]], ScanReport]:
    """(path, label) for every image under ``root/<class>/`` (label = index in ``classes``), with progress
    logged at a steady rate (about every 10 s, and every tenth of the classes) when ``show_progress``."""
    report = ScanReport()
    samples: List[Tuple[str, int]] = []
    last = start = time.time()
    step = max(1, len(classes) // 10)
    for label, name in enumerate(classes):
        files = _walk_class(os.path.join(root, name), report, set())
        if not files:
            raise DataError(f"class folder {os.path.join(root, name)} holds no image ({', '.join(IMG_EXTENSIONS)}); "
                            f"add its images or remove the folder from every split")
        samples.extend((f, label) for f in files)
        now = time.time()
        if show_progress and ((label + 1) % step == 0 or now - last >= 10) and label + 1 < len(classes):
            last = now
            logger.info('scanning %s: %d/%d classes, %d images (%.0f s)', root, label + 1, len(classes),
                        len(samples), now - start)
    return samples, report


class ImageFolderDataset(Dataset):
    """``root/<class>/**/<image>`` as (transform(image), label); ``samples``, ``targets``, ``classes`` and
    ``class_to_idx`` as torchvision's ImageFolder, with a loop-safe walk and a report of skipped files.
    ``classes`` fixes the label of each folder (the training split's list, so that val uses the same)."""

    def __init__(self, root: str, transform: Optional[Callable] = None, classes: Optional[List[str]] = None,
                 show_progress: bool = True) -> None:
        self.root, self.transform, self.loader = root, transform, load_image
        self.classes = list(classes) if classes is not None else find_classes(root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples, self.report = scan_image_folder(root, self.classes, show_progress)
        self.targets = [y for _, y in self.samples]
        if show_progress:
            skipped = self.report.describe()
            logger.info('%s: %d images in %d classes%s', root, len(self.samples), len(self.classes),
                        f' (skipped {skipped})' if skipped else '')

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        image = self.loader(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, target


def _image_folder(root: str, transform: Callable, classes: Optional[List[str]] = None,
                  show_progress: bool = True) -> ImageFolderDataset:
    if not os.path.isdir(root):
        raise ConfigError(f"data folder {root} not found: --data-path must hold train/<class>/* and "
                          f"val/<class>/* (ImageNet layout), or train.zip/val.zip with --zip")
    return ImageFolderDataset(root, transform, classes, show_progress)


def check_class_lists(path: str) -> Optional[List[str]]:
    """Folder mode: the class list shared by ``path/train`` and ``path/val`` (None if one is absent).
    Labels are folder indices in sorted order, so different lists would shift labels silently: a
    mismatch is a ConfigError naming the differing classes."""
    train_dir, val_dir = os.path.join(path, 'train'), os.path.join(path, 'val')
    if not (os.path.isdir(train_dir) and os.path.isdir(val_dir)):
        return None
    train, val = find_classes(train_dir), find_classes(val_dir)
    if train == val:
        return train

    def names(items: List[str]) -> str:
        shown = ', '.join(repr(c) for c in items[:5])
        return shown + (f' and {len(items) - 5} more' if len(items) > 5 else '')
    only_train = sorted(set(train) - set(val))
    only_val = sorted(set(val) - set(train))
    diff = '; '.join(x for x in (f"only in train/: {names(only_train)}" if only_train else '',
                                 f"only in val/: {names(only_val)}" if only_val else '') if x)
    raise ConfigError(f"the class folders of {train_dir} and {val_dir} differ ({diff}); labels are assigned by "
                      f"sorted folder name, so both splits must hold the same class folders: rename, add or "
                      f"remove folders until they match")


def check_data_path(config: CfgNode, splits: Tuple[str, ...] = ('train', 'val')) -> None:
    """Cheap up-front checks of DATA.* (before any work): ConfigError naming --data-path, the class
    folders that differ between train/ and val/, or MODEL.NUM_CLASSES."""
    if config.DATA.DATASET != 'imagenet':
        raise ConfigError(f"DATA.DATASET {config.DATA.DATASET!r} is not supported; use 'imagenet' (folder layout)")
    path = config.DATA.DATA_PATH
    if not path:
        raise ConfigError("no dataset given: set --data-path to a folder with train/ and val/ (ImageNet layout)")
    if not os.path.isdir(path):
        raise ConfigError(f"--data-path {path} does not exist (DATA.DATA_PATH); give the dataset folder")
    for split in splits:
        need = os.path.join(path, f'{split}.zip' if config.DATA.ZIP_MODE else split)
        if not os.path.exists(need):
            raise ConfigError(f"--data-path {path} has no {os.path.basename(need)}: expected train/<class>/* and "
                              f"val/<class>/* (ImageNet layout), or train.zip/val.zip with their map files and --zip")
    if not config.DATA.ZIP_MODE:
        shared = check_class_lists(path)       # train/ and val/ agree (when both exist) before counting
        for split in splits:
            _check_class_count(len(shared if shared is not None else find_classes(os.path.join(path, split))),
                               config, split)


def build_dataset(is_train: bool, config: CfgNode, rank: int = 0, world_size: int = 1) -> SampleDataset:
    """The train or val split of DATA.DATA_PATH, wrapped in SampleDataset. In folder mode both splits use
    the training split's class list (checked equal to val's by ``check_data_path``). DATA.* is validated
    once, by the caller, with ``check_data_path`` (``runner.setup_run`` does it before any work)."""
    split = 'train' if is_train else 'val'
    path = config.DATA.DATA_PATH
    transform = build_transform(is_train, config)
    if config.DATA.ZIP_MODE:
        cache = config.DATA.CACHE_MODE if is_train else 'part'
        ds = CachedImageFolder(path, f'{split}_map.txt', f'{split}.zip@/', transform, cache, rank, world_size)
    else:
        classes = check_class_lists(path)
        ds = _image_folder(os.path.join(path, split), transform, classes, show_progress=rank == 0)
    return SampleDataset(ds, skip_bad=config.DATA.SKIP_BAD_IMAGES)


def check_images_open(dataset: SampleDataset, split: str, rank: int = 0, world_size: int = 1) -> None:
    """Before training: every image of this rank's share of ``split`` opens as an image (its header, and the
    checksums of formats that have them; no full decode), so that a file that is no image fails now, not
    after an epoch of training. A DataError naming the file; nothing is checked with DATA.SKIP_BAD_IMAGES
    (such files are skipped and counted) or in zip mode (the map file was read)."""
    if dataset.skip_bad or not isinstance(dataset.dataset, ImageFolderDataset):
        return
    for path, _ in dataset.dataset.samples[rank::world_size]:
        try:
            with Image.open(path) as img:
                img.verify()
        except Exception as e:              # PIL raises many types for a broken file
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{split} image {path} cannot be read ({reason}); {DATASET_FIX}") from None


def check_num_classes(dataset: SampleDataset, config: CfgNode, split: str) -> None:
    """Zip mode: every label of the map file must be below MODEL.NUM_CLASSES, and the train map must have
    that many classes (a val map may cover a subset). Folder mode: nothing to do, ``check_data_path``
    counted the class folders before the dataset was built."""
    if not isinstance(dataset.dataset, CachedImageFolder):
        return
    if isinstance(dataset.dataset, CachedImageFolder):
        top = max(dataset.dataset.classes)
        if top >= config.MODEL.NUM_CLASSES:
            raise ConfigError(f"the {split} map file in {config.DATA.DATA_PATH} uses class index {top} but "
                              f"MODEL.NUM_CLASSES is {config.MODEL.NUM_CLASSES}; indices must be 0..NUM_CLASSES-1: "
                              f"fix the map file or set MODEL.NUM_CLASSES to the dataset's class count")
        if split != 'train':
            return
    _check_class_count(len(dataset.classes), config, split)


def _check_class_count(found: int, config: CfgNode, split: str) -> None:
    if found != config.MODEL.NUM_CLASSES:
        raise ConfigError(f"{os.path.join(config.DATA.DATA_PATH, split)} has {found} classes (sub-folders) but the model "
                          f"is built for MODEL.NUM_CLASSES {config.MODEL.NUM_CLASSES}; set MODEL.NUM_CLASSES: {found} "
                          f"in the --cfg file (or add --opts MODEL.NUM_CLASSES {found}), or point --data-path at "
                          f"the dataset with {config.MODEL.NUM_CLASSES} classes")


# ----------------------------------------------------------------------------- loaders
def build_mixup(config: CfgNode) -> Optional[Mixup]:
    aug = config.AUG
    if not (aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None):
        return None
    return Mixup(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX, cutmix_minmax=aug.CUTMIX_MINMAX,
                 prob=aug.MIXUP_PROB, switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=config.MODEL.NUM_CLASSES)


def _worker_init(worker_id: int) -> None:
    """Workers ignore SIGINT/SIGTERM: a Ctrl-C or a job-wide SIGTERM is handled by the main process (it
    saves a checkpoint at the next step and shuts the workers down); they also exit when it dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _ignores_sigterm(pid: int) -> bool:
    """Whether process ``pid`` ignores SIGTERM (Linux /proc; True where that cannot be read)."""
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                if line.startswith('SigIgn:'):
                    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except (OSError, ValueError):
        pass
    return True


def stop_loader_workers() -> int:
    """Kill this process's daemonic children that ignore SIGTERM (the DataLoader workers, see
    ``_worker_init``); returns how many. They hold no state, and multiprocessing's exit hook (SIGTERM,
    then join) would otherwise wait for them forever after an unhandled error while an iterator lived."""
    workers = [p for p in multiprocessing.active_children() if p.daemon and p.pid and _ignores_sigterm(p.pid)]
    if workers and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)     # torch's handler would report the kills as failures
    for p in workers:
        p.kill()
    for p in workers:
        p.join(timeout=5)
    return len(workers)


_EXIT_HOOK = [False]


def _install_exit_hook() -> None:
    # registered after multiprocessing's own hook, so it runs before it (atexit runs last-in first-out)
    if not _EXIT_HOOK[0]:
        atexit.register(stop_loader_workers)
        _EXIT_HOOK[0] = True


def _loader(dataset: Dataset, sampler, config: CfgNode, drop_last: bool, pin: bool, seed: int) -> DataLoader:
    # randomness comes from the per-sample seeds (SampleDataset); the generator only fixes worker base seeds
    if config.DATA.NUM_WORKERS > 0:
        _install_exit_hook()
    return DataLoader(dataset, sampler=sampler, batch_size=config.DATA.BATCH_SIZE, drop_last=drop_last,
                      num_workers=config.DATA.NUM_WORKERS, pin_memory=pin and config.DATA.PIN_MEMORY,
                      collate_fn=collate, generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=_worker_init,
                      persistent_workers=config.DATA.PERSISTENT_WORKERS and config.DATA.NUM_WORKERS > 0)


def build_val_loader(config: CfgNode, rank: int = 0, world_size: int = 1, pin: bool = False
                     ) -> Tuple[SampleDataset, DataLoader]:
    dataset = build_dataset(False, config, rank, world_size)
    check_num_classes(dataset, config, 'val')
    loader = _loader(dataset, ExactEvalSampler(len(dataset), rank, world_size), config, False, pin, config.SEED)
    return dataset, loader


def build_train_loader(config: CfgNode, rank: int = 0, world_size: int = 1, pin: bool = False
                       ) -> Tuple[SampleDataset, DataLoader, ResumableSampler]:
    dataset = build_dataset(True, config, rank, world_size)
    check_num_classes(dataset, config, 'train')
    shard_only = config.DATA.ZIP_MODE and config.DATA.CACHE_MODE == 'part'
    if config.AUG.REPEATED_AUG:
        if shard_only:
            raise ConfigError("AUG.REPEATED_AUG spreads every image over all ranks, but zip mode with DATA.CACHE_MODE "
                              "'part' caches one shard per rank; use --cache-mode full or no, or turn AUG.REPEATED_AUG off")
        sampler = RepeatedAugSampler(len(dataset), rank, world_size, seed=config.SEED, shuffle=True,
                                     repeats=config.AUG.REPEATED_AUG_COUNT)
    else:
        sampler = ResumableSampler(len(dataset), rank, world_size, seed=config.SEED, shuffle=True,
                                   rank_shard_only=shard_only)
    if sampler.per_rank() < config.DATA.BATCH_SIZE:
        raise ConfigError(f"DATA.BATCH_SIZE {config.DATA.BATCH_SIZE} is larger than the {sampler.per_rank()} "
                          f"training images per process; lower --batch-size")
    loader = _loader(dataset, sampler, config, True, pin, config.SEED)
    return dataset, loader, sampler
