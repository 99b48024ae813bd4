"""Datasets, transforms, samplers, loaders and Mixup/CutMix for ImageNet-layout data.

Folder mode: ``<data-path>/train/<class>/*`` and ``<data-path>/val/<class>/*`` (torchvision ImageFolder);
zip mode: ``train.zip`` + ``train_map.txt`` (see ``cached_image_folder``). Every image is decoded fully:
an unreadable or truncated file is a ``DataError`` naming it, or, with DATA.SKIP_BAD_IMAGES, is dropped
from its batch and reported by the loop (batches are ``(images, targets, bad_paths)``).
"""
from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch
from PIL import Image, ImageOps
from timm.data import Mixup, auto_augment, create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import str_to_pil_interp
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms
from yacs.config import CfgNode

from config import ConfigError
from utils import seed_everything
from .cached_image_folder import IMG_EXTENSIONS, CachedImageFolder, DataError, load_image
from .samplers import ExactEvalSampler, ResumableSampler

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


for _name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
    if auto_augment.NAME_TO_OP.get(_name) is auto_augment.posterize:
        auto_augment.NAME_TO_OP[_name] = _posterize


def build_transform(is_train: bool, config: CfgNode) -> Callable:
    """Training: timm ``create_transform`` (random resized crop of AUG.SCALE, flip with AUG.HFLIP,
    RandAugment, colour jitter, random erasing per AUG.*), or RandomCrop(padding 4) for images of 32 px and below. Evaluation: resize
    to IMG_SIZE*256/224 + centre crop (TEST.CROP) or a direct resize; no resize at 32 px and below."""
    size, aug = config.DATA.IMG_SIZE, config.AUG
    resize = size > 32
    if is_train:
        t = create_transform(
            input_size=size, is_training=True,
            color_jitter=aug.COLOR_JITTER if aug.COLOR_JITTER > 0 else None,
            auto_augment=aug.AUTO_AUGMENT if aug.AUTO_AUGMENT not in ('', 'none', None) else None,
            re_prob=aug.REPROB, re_mode=aug.REMODE, re_count=aug.RECOUNT, hflip=aug.HFLIP,
            scale=tuple(aug.SCALE), interpolation=config.DATA.INTERPOLATION)
        if not resize:
            t.transforms[0] = transforms.RandomCrop(size, padding=4)
        return t
    interp = str_to_pil_interp('bicubic' if config.DATA.INTERPOLATION == 'random' else config.DATA.INTERPOLATION)
    steps: List[Any] = []
    if resize:
        if config.TEST.CROP:
            crop_from = int(size * 256 / 224)
            steps += [transforms.Resize((crop_from, crop_from), interpolation=interp), transforms.CenterCrop(size)]
        else:
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
            seed_everything(seed)
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


def _image_folder(root: str, transform: Callable) -> datasets.ImageFolder:
    if not os.path.isdir(root):
        raise ConfigError(f"data folder {root} not found: --data-path must hold train/<class>/* and "
                          f"val/<class>/* (ImageNet layout), or train.zip/val.zip with --zip")
    try:
        return datasets.ImageFolder(root, transform=transform, loader=load_image,
                                    is_valid_file=lambda p: p.lower().endswith(IMG_EXTENSIONS))
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{root}: {str(e).splitlines()[0]}") from None


def check_data_path(config: CfgNode, splits: Tuple[str, ...] = ('train', 'val')) -> None:
    """Cheap up-front checks of DATA.* (before any work): ConfigError naming --data-path."""
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
            _check_class_count(len([e for e in os.scandir(need) if e.is_dir()]), config, split)


def build_dataset(is_train: bool, config: CfgNode, rank: int = 0, world_size: int = 1) -> SampleDataset:
    """The train or val split of DATA.DATA_PATH, wrapped in SampleDataset."""
    split = 'train' if is_train else 'val'
    check_data_path(config, (split,))
    path = config.DATA.DATA_PATH
    transform = build_transform(is_train, config)
    if config.DATA.ZIP_MODE:
        cache = config.DATA.CACHE_MODE if is_train else 'part'
        ds = CachedImageFolder(path, f'{split}_map.txt', f'{split}.zip@/', transform, cache, rank, world_size)
    else:
        ds = _image_folder(os.path.join(path, split), transform)
    return SampleDataset(ds, skip_bad=config.DATA.SKIP_BAD_IMAGES)


def check_num_classes(dataset: SampleDataset, config: CfgNode, split: str) -> None:
    _check_class_count(len(dataset.classes), config, split)


def _check_class_count(found: int, config: CfgNode, split: str) -> None:
    if found != config.MODEL.NUM_CLASSES:
        raise ConfigError(f"the {split} set in {config.DATA.DATA_PATH} has {found} classes but MODEL.NUM_CLASSES "
                          f"is {config.MODEL.NUM_CLASSES}; use --opts MODEL.NUM_CLASSES {found} (or the right --cfg)")


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


def _loader(dataset: Dataset, sampler, config: CfgNode, drop_last: bool, pin: bool, seed: int) -> DataLoader:
    # randomness comes from the per-sample seeds (SampleDataset); the generator only fixes worker base seeds
    return DataLoader(dataset, sampler=sampler, batch_size=config.DATA.BATCH_SIZE, drop_last=drop_last,
                      num_workers=config.DATA.NUM_WORKERS, pin_memory=pin and config.DATA.PIN_MEMORY,
                      collate_fn=collate, generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=_worker_init)


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
    sampler = ResumableSampler(len(dataset), rank, world_size, seed=config.SEED, shuffle=True,
                               rank_shard_only=config.DATA.ZIP_MODE and config.DATA.CACHE_MODE == 'part')
    if sampler.per_rank() < config.DATA.BATCH_SIZE:
        raise ConfigError(f"DATA.BATCH_SIZE {config.DATA.BATCH_SIZE} is larger than the {sampler.per_rank()} "
                          f"training images per process; lower --batch-size")
    loader = _loader(dataset, sampler, config, True, pin, config.SEED)
    return dataset, loader, sampler
