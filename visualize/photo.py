"""The photo the maps are drawn on: read by the training loader's own image reader (so a 16-bit or float
image is scaled exactly as in training, never clipped), centre-cropped square, and turned into a model input."""
from __future__ import annotations

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms.functional import normalize, pil_to_tensor

from data.cached_image_folder import load_image
IMAGE_FIX = 'give --image a file Pillow reads (JPEG, PNG, ...)'


def centre_square(image: Image.Image) -> Image.Image:
    """The centred square crop of ``image`` (side: its shorter side)."""
    w, h = image.size
    s = min(w, h)
    return image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))


def load_photo(path: str) -> Image.Image:
    """The centred square crop of the image at ``path`` as 8-bit RGB (``data``'s ``load_image``: high bit
    depths rescaled as the training loader does); a DataError (one line) when it cannot be read."""
    return centre_square(load_image(path, fix=IMAGE_FIX))


def to_input(image: Image.Image, size: int) -> torch.Tensor:
    """(1, 3, size, size) ImageNet-normalised model input of a square RGB image."""
    x = pil_to_tensor(image.resize((size, size), Image.BICUBIC)).float() / 255.0
    return normalize(x, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD).unsqueeze(0)
