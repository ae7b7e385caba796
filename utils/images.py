"""Real photos available offline (scikit-image sample data) and ImageNet evaluation preprocessing.

Used for sanity checks of pretrained classifiers without an ImageNet copy: a correctly loaded
model must recognise e.g. the cat in ``chelsea`` or the espresso in ``coffee``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SAMPLE_PHOTOS",
    "imagenet_class_names",
    "imagenet_eval_transform",
    "load_sample_photo",
    "sample_photo_batch",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Colour (RGB, uint8) natural photos that ship with scikit-image itself (no download needed).
SAMPLE_PHOTOS: tuple[str, ...] = ("chelsea", "coffee", "rocket", "astronaut", "stereo_motorcycle")


def load_sample_photo(name: str) -> Image.Image:
    """A scikit-image sample photo as an RGB ``PIL.Image`` (for ``stereo_motorcycle``: the left view)."""
    from skimage import data

    loader = getattr(data, name, None)
    if loader is None or not callable(loader):
        raise ValueError(f"unknown scikit-image sample image {name!r}; try one of {SAMPLE_PHOTOS}")
    image = loader()
    if isinstance(image, tuple):  # stereo_motorcycle -> (left, right, disparity)
        image = image[0]
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"scikit-image sample {name!r} is not an RGB uint8 photo (shape {image.shape}, {image.dtype})")
    return Image.fromarray(image, mode="RGB")


def imagenet_eval_transform(
    image_size: int = 224,
    resize_size: int = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> transforms.Compose:
    """Standard ImageNet eval preprocessing: resize shorter side (bilinear), centre crop, to tensor, normalise.

    Accepts a PIL image (or a uint8 HWC array converted with ``PIL.Image.fromarray``) and returns a
    float32 (3, image_size, image_size) tensor: ``(pixel / 255 - mean) / std`` per channel.
    """
    return transforms.Compose(
        [
            transforms.Resize(resize_size, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(tuple(mean), tuple(std)),
        ]
    )


def sample_photo_batch(
    names: Sequence[str] = SAMPLE_PHOTOS,
    image_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Preprocessed photos stacked into a float32 tensor of shape (N, 3, image_size, image_size).

    The resize size keeps the usual 224/256 ratio (256 for the default 224).
    """
    if isinstance(names, str):
        names = (names,)
    resize_size = round(image_size * 256 / 224)
    transform = imagenet_eval_transform(image_size=image_size, resize_size=resize_size, mean=mean, std=std)
    return torch.stack([transform(load_sample_photo(name)) for name in names]).to(torch.float32)


@functools.cache
def _imagenet_categories() -> tuple[str, ...]:
    from torchvision.models import ResNet18_Weights

    return tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names, in class-index order (from torchvision metadata, offline)."""
    return list(_imagenet_categories())
