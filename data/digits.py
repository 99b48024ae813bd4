"""The embedded real dataset: scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits, 10
classes) written as RGB PNGs in the ImageNet folder layout, with a fixed stratified train/val split.

    python -m data.digits OUT_DIR [--size 64] [--val-fraction 0.2]

writes ``OUT_DIR/{train,val}/<digit>/<id>.png``. The split and the files depend only on the arguments.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Dict, Optional

import numpy as np
from PIL import Image

SPLIT_SEED = 0


def digit_image(pixels: np.ndarray, size: int) -> Image.Image:
    """(8, 8) values in 0..16 -> (size, size) RGB, dark digit on white like scanned ink, nearest upscaling."""
    gray = (255 - np.clip(pixels, 0, 16) * (255 / 16)).round().astype(np.uint8)
    return Image.fromarray(gray, mode='L').resize((size, size), Image.NEAREST).convert('RGB')


def write_digits(out_dir: str, size: int = 64, val_fraction: float = 0.2,
                 max_train_per_class: Optional[int] = None, max_val_per_class: Optional[int] = None
                 ) -> Dict[str, int]:
    """Write the split; returns {'train': n, 'val': m}. Per class, a fixed shuffle puts the first
    round(val_fraction * count) images in val (optionally capped per class, for quick tests)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.RandomState(SPLIT_SEED)
    counts = {'train': 0, 'val': 0}
    for label in range(10):
        ids = np.flatnonzero(digits.target == label)
        ids = ids[rng.permutation(len(ids))]
        n_val = int(round(val_fraction * len(ids)))
        splits = {'val': ids[:n_val][:max_val_per_class], 'train': ids[n_val:][:max_train_per_class]}
        for split, chosen in splits.items():
            folder = os.path.join(out_dir, split, str(label))
            os.makedirs(folder, exist_ok=True)
            for i in chosen:
                digit_image(digits.images[i], size).save(os.path.join(folder, f'{i:04d}.png'))
            counts[split] += len(chosen)
    return counts


def main(argv: Optional[list] = None) -> None:
    p = argparse.ArgumentParser(description='Write scikit-learn digits as an ImageNet-layout image folder.')
    p.add_argument('out_dir')
    p.add_argument('--size', type=int, default=64, help='image side in pixels (default 64)')
    p.add_argument('--val-fraction', type=float, default=0.2)
    args = p.parse_args(argv)
    counts = write_digits(args.out_dir, args.size, args.val_fraction)
    logging.getLogger(__name__).info(f"wrote {counts['train']} train and {counts['val']} val images to {args.out_dir}")


if __name__ == '__main__':
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    main()
