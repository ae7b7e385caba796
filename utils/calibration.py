"""Calibration images for post-training methods: a seeded draw spread over the classes of an image folder.

The paper's code calibrated on the first 64 ImageNet validation images, which in class-sorted
folders are almost all of one class. :func:`sample_image_files` instead visits the classes
round-robin in a seeded random order and takes a seeded random image of each class, so ``n``
samples from at least ``n`` classes come from ``n`` different classes.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .images import SAMPLE_PHOTOS, imagenet_eval_transform, sample_photo_batch

__all__ = ["IMAGE_EXTENSIONS", "load_calibration_images", "sample_image_files"]

logger = logging.getLogger(__name__)

# Same file types as torchvision.datasets.ImageFolder (compared case-insensitively).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}
)


def _class_folders(images_dir: Path) -> list[Path]:
    """Sorted non-hidden sub-folders of ``images_dir``, with one-line errors for a bad folder."""
    if not images_dir.is_dir():
        reason = "is not a folder" if images_dir.exists() else "does not exist"
        raise ValueError(f"calibration image folder {images_dir} {reason}")
    folders = sorted(p for p in images_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{images_dir} holds no class folders (expected one sub-folder of images per class)")
    return folders


def _image_files(folder: Path) -> list[Path]:
    """Sorted image files directly in ``folder`` (by extension)."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def sample_image_files(images_dir: Path, num_samples: int, seed: int) -> list[Path]:
    """``num_samples`` image files from a folder of class folders, spread over the classes.

    Rounds visit the classes in one seeded random order; in round ``r`` every class (that still
    has images) gives the ``r``-th image of its own seeded random permutation. So the first
    ``min(num_samples, classes)`` files come from distinct classes, no file is drawn twice, the
    result is a function of ``(folder contents, num_samples, seed)``, and the draw for ``n``
    samples starts with the draw for any smaller ``n``. A class folder's images are listed only
    when the draw reaches it (cheap for 64 samples from ImageNet's training set).

    If the folder holds fewer images than asked for, all are returned (with a logged warning).

    Raises:
        ValueError: ``num_samples < 1``, a missing folder, no class folders, or no images.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    images_dir = Path(images_dir)
    folders = _class_folders(images_dir)
    rng = np.random.default_rng(seed)
    pools: list[list[Path]] = []  # shuffled images of the classes visited so far, in visiting order
    chosen: list[Path] = []
    for index in rng.permutation(len(folders)):
        if len(chosen) == num_samples:
            break
        files = _image_files(folders[index])
        if files:
            pools.append([files[i] for i in rng.permutation(len(files))])
            chosen.append(pools[-1][0])
    if not pools:
        raise ValueError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the class folders of {images_dir}")
    round_index = 1
    while len(chosen) < num_samples and any(len(pool) > round_index for pool in pools):
        chosen.extend(pool[round_index] for pool in pools if len(pool) > round_index)
        round_index += 1
    if len(chosen) < num_samples:
        logger.warning("%s holds only %d images; using all of them instead of %d", images_dir, len(chosen), num_samples)
    return chosen[:num_samples]


def load_calibration_images(
    images_dir: Path | None, num_samples: int, seed: int, image_size: int = 224
) -> torch.Tensor:
    """Preprocessed calibration images as a float32 tensor ``(N, 3, image_size, image_size)``.

    With a folder: the files of :func:`sample_image_files` through the ImageNet eval transform
    (bilinear resize of the shorter side to ``round(image_size * 256 / 224)``, centre crop,
    normalisation with the ImageNet mean/std). Unreadable files are skipped with a logged
    warning (and a count at the end), so ``N`` can be smaller than ``num_samples``.

    With ``images_dir=None``: the first ``num_samples`` of scikit-image's
    ``len(SAMPLE_PHOTOS) = 5`` offline sample photos (``seed`` is not used); asking for more
    gives all 5, with a warning.

    Raises:
        ValueError: as :func:`sample_image_files`, or no file could be read.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if images_dir is None:
        if num_samples > len(SAMPLE_PHOTOS):
            logger.warning(
                "only %d sample photos exist; using all of them instead of %d", len(SAMPLE_PHOTOS), num_samples
            )
        return sample_photo_batch(SAMPLE_PHOTOS[:num_samples], image_size=image_size)
    files = sample_image_files(images_dir, num_samples, seed)
    transform = imagenet_eval_transform(image_size=image_size, resize_size=round(image_size * 256 / 224))
    images = []
    for path in files:
        try:
            with Image.open(path) as image:
                images.append(transform(image.convert("RGB")))
        except OSError as exc:  # PIL.UnidentifiedImageError and truncated files are OSErrors
            logger.warning("skipping unreadable image %s (%s)", path, exc)
    skipped = len(files) - len(images)
    if not images:
        raise ValueError(f"none of the {len(files)} sampled images in {images_dir} could be read")
    if skipped:
        logger.warning("skipped %d of %d calibration images as unreadable", skipped, len(files))
    return torch.stack(images).to(torch.float32)
