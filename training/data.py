"""Class-folder image datasets (ImageNet layout: ``train/<class>/*.jpg``, ``val/<class>/*.jpg``) and their loaders.

Transforms: validation resizes to ``round(image_size * 256 / 224)`` and crops the centre ``image_size``
(224/256 for ImageNet); training (:class:`FolderAugmentation`) either crops a random 8-100% of the area
at aspect 3/4-4/3, resized to ``image_size``, and flips horizontally at random (``resized-crop-flip``,
the ImageNet standard and the default), or crops ``image_size`` at a random place of the image resized
as for validation (``crop``: the validation view shifted, no zoom and no flip, for images whose class
a mirror or a zoomed-in part changes: digits, characters); both normalised with the ImageNet mean/std.
CIFAR-10/100 (:func:`build_cifar_loaders`) use the loaders of the same kind, their test split as the
validation split.

The random training transforms of sample ``i`` in epoch ``e`` are drawn from a torch generator
seeded with ``(seed, e, i)``, so the augmented images depend neither on the number of loader
workers nor on how the samples are split over distributed processes: the same run on one or on
N processes (with the same global batch) sees the same images, and a resumed run sees the same
images as an uninterrupted one. Unreadable images are skipped (and counted), not fatal.
"""
from __future__ import annotations

import enum
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import transforms
from torchvision.datasets import DatasetFolder

from utils.calibration import IMAGE_EXTENSIONS
from utils.images import IMAGENET_MEAN, IMAGENET_STD, imagenet_eval_transform

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")


class ImageFolderError(ValueError):
    """A dataset folder that cannot be used (one-line message)."""


def check_images_dir(images_dir: Path, splits: tuple[str, ...] = SPLITS) -> None:
    """Raise :class:`ImageFolderError` unless ``images_dir`` holds the ``splits`` sub-folders."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise ImageFolderError(f"--images-dir {images_dir} is not a folder")
    missing = [f"{split}/" for split in splits if not (images_dir / split).is_dir()]
    if missing:
        raise ImageFolderError(
            f"--images-dir {images_dir} has no {' or '.join(missing)} folder "
            "(expected train/ and val/, each with one sub-folder of images per class)"
        )


class FolderAugmentation(str, enum.Enum):
    """The random training transforms of a class-folder dataset (see the module doc)."""

    RESIZED_CROP_FLIP = "resized-crop-flip"  # ImageNet: RandomResizedCrop + horizontal flip
    CROP = "crop"  # the validation resize, then a random crop: the validation view shifted (digits, characters)


def eval_resize_size(image_size: int) -> int:
    """The validation resize before the centre crop of ``image_size``: ``round(image_size * 256 / 224)``."""
    return round(image_size * 256 / 224)


def train_transform(image_size: int, augmentation: FolderAugmentation = FolderAugmentation.RESIZED_CROP_FLIP
                    ) -> transforms.Compose:  # fmt: skip
    if FolderAugmentation(augmentation) is FolderAugmentation.CROP:
        shifts_or_zooms = [transforms.Resize(eval_resize_size(image_size), antialias=True), transforms.RandomCrop(image_size)]
    else:
        shifts_or_zooms = [transforms.RandomResizedCrop(image_size, antialias=True), transforms.RandomHorizontalFlip()]
    return transforms.Compose([*shifts_or_zooms, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(image_size: int) -> transforms.Compose:
    return imagenet_eval_transform(image_size=image_size, resize_size=eval_resize_size(image_size))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for the random transforms of sample ``index`` in ``epoch``."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class Unreadable:
    """The sample of an image file that cannot be decoded (skipped by :func:`collate_skipping`)."""

    path: str


class ClassFolderDataset(DatasetFolder):
    """Images in class folders with per-sample seeded transforms; unreadable files give :class:`Unreadable`.

    ``class_to_idx`` fixes the label of each class name (the validation split uses the
    training split's labels even if it lacks some classes).
    """

    def __init__(self, root: Path, transform: transforms.Compose, class_to_idx: dict[str, int] | None, seed: int) -> None:
        self._given_classes = class_to_idx
        self.seed = seed
        self.epoch = 0
        try:
            super().__init__(str(root), loader=None, extensions=tuple(IMAGE_EXTENSIONS), transform=transform)
        except FileNotFoundError as error:
            raise ImageFolderError(f"{root}: {error}") from None

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes, class_to_idx = super().find_classes(directory)
        if self._given_classes is None:
            return classes, class_to_idx
        unknown = [name for name in classes if name not in self._given_classes]
        if unknown:
            raise ImageFolderError(f"{directory} has classes that train/ lacks: {', '.join(unknown[:5])}")
        return classes, {name: self._given_classes[name] for name in classes}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | Unreadable:
        path, target = self.samples[index]
        try:
            with open(path, "rb") as handle:
                image = Image.open(handle).convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as error:
            logger.debug("skipping unreadable image %s: %s", path, error)
            return Unreadable(path)
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only (torch.manual_seed would also queue CUDA seeding, at a cost per call).
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
            return self.transform(image), target


@dataclass
class Batch:
    images: torch.Tensor
    targets: torch.Tensor
    skipped: int
    skipped_paths: tuple[str, ...] = ()


def collate_skipping(items: list[tuple[torch.Tensor, int] | Unreadable]) -> Batch:
    """Stack the readable samples; count the unreadable ones and keep their paths."""
    good = [item for item in items if not isinstance(item, Unreadable)]
    bad = tuple(item.path for item in items if isinstance(item, Unreadable))
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), len(bad), bad)
    return Batch(torch.stack([image for image, _ in good]), torch.tensor([t for _, t in good]), len(bad), bad)


class SkipRecorder:
    """Iterates a loader's batches like the loader itself and keeps the paths of the images they skipped."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.paths: set[str] = set()

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            self.paths.update(batch.skipped_paths)
            yield batch

    def __len__(self) -> int:
        return len(self.loader)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...``: every sample exactly once over all ranks (no padding)."""

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


def _seed_worker(_worker_id: int) -> None:
    """Seed python's and numpy's RNGs in a loader worker from its torch seed."""
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)


class TrainUse(str, enum.Enum):
    """What the training split is loaded for."""

    TRAINING = "training"
    ESTIMATION = "estimation"  # activation ranges and batch-norm statistics only
    NONE = "none"


@dataclass
class DataLoaders:
    """``train`` (this process's share), ``val`` (this process's share) and ``estimation``.

    ``estimation`` yields the full global batches of the training epoch on every process (the
    same batches a single-process run trains on): activation ranges and batch-norm statistics
    estimated from it are identical on all processes and equal to a single-process run's.
    """

    train: DataLoader | None
    val: DataLoader
    estimation: DataLoader | None
    num_classes: int

    def set_epoch(self, epoch: int) -> None:
        """Shuffle order and augmentation of ``epoch`` (call before iterating the training loaders)."""
        for loader in (self.train, self.estimation):
            if loader is not None:
                loader.sampler.set_epoch(epoch)
                loader.dataset.set_epoch(epoch)


def build_loaders(
    images_dir: Path,
    image_size: int,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    train_use: TrainUse = TrainUse.TRAINING,
    pin_memory: bool = False,
    augmentation: FolderAugmentation = FolderAugmentation.RESIZED_CROP_FLIP,
) -> DataLoaders:
    """Loaders of ``images_dir/train`` (shuffled, drop last, ``augmentation``) and ``images_dir/val`` (in order).

    ``batch_size`` is per process. With ``world_size > 1`` each process gets its share of
    every epoch's permutation (``DistributedSampler``) and every ``world_size``-th validation
    image. ``train_use``: ``ESTIMATION`` gives only the estimation loader (any size, last batch
    kept), ``NONE`` no training split at all (it may be missing).
    """
    images_dir = Path(images_dir)
    train_use = TrainUse(train_use)
    check_images_dir(images_dir, ("val",) if train_use is TrainUse.NONE else SPLITS)
    train_set = (
        ClassFolderDataset(images_dir / "train", train_transform(image_size, augmentation), None, seed)
        if train_use is not TrainUse.NONE
        else None
    )
    classes = train_set.class_to_idx if train_set is not None else None
    val_set = ClassFolderDataset(images_dir / "val", eval_transform(image_size), classes, seed)
    num_classes = len(train_set.classes) if train_set is not None else max(val_set.class_to_idx.values()) + 1
    return dataset_loaders(train_set, val_set, num_classes, str(images_dir / "train"), batch_size, num_workers, seed,
                           rank, world_size, train_use, pin_memory)  # fmt: skip


def build_cifar_loaders(
    data_dir: Path,
    variant: str,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    train_use: TrainUse = TrainUse.TRAINING,
    pin_memory: bool = False,
) -> DataLoaders:
    """Like :func:`build_loaders` for CIFAR-10/100 in ``data_dir`` (:mod:`training.cifar`): the training split with
    its augmentation, and the *test* split as the validation split (CIFAR has no other held-out split).

    Raises :class:`training.cifar.CifarMissingError` (where to put the archive) or ``CifarFormatError``.
    """
    from training.cifar import CifarDataset, cifar_datasets, cifar_eval_transform, read_cifar

    train_use = TrainUse(train_use)
    if train_use is TrainUse.NONE:
        train_set, val_set = None, CifarDataset(read_cifar(data_dir, variant, "test"), cifar_eval_transform(), seed)
    else:
        train_set, val_set = cifar_datasets(data_dir, variant, seed)
    return dataset_loaders(train_set, val_set, len(val_set.classes), f"{variant} in {data_dir}", batch_size,
                           num_workers, seed, rank, world_size, train_use, pin_memory)  # fmt: skip


def dataset_loaders(
    train_set: Dataset | None,
    val_set: Dataset,
    num_classes: int,
    train_name: str,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    train_use: TrainUse = TrainUse.TRAINING,
    pin_memory: bool = False,
) -> DataLoaders:
    """The :class:`DataLoaders` of a training and a validation dataset (see :func:`build_loaders`).

    The datasets yield ``(image, label)`` or :class:`Unreadable` and have ``set_epoch``;
    ``train_name`` names the training split in the error for too small a split.
    """
    common = {"num_workers": num_workers, "collate_fn": collate_skipping, "pin_memory": pin_memory,
              "worker_init_fn": _seed_worker}  # fmt: skip
    train_loader = estimation_loader = None
    training = TrainUse(train_use) is TrainUse.TRAINING

    def shuffled(replicas: int, replica: int, size: int) -> DataLoader:
        sampler = DistributedSampler(train_set, num_replicas=replicas, rank=replica, shuffle=True, seed=seed,
                                     drop_last=training)  # fmt: skip
        return DataLoader(train_set, batch_size=size, sampler=sampler, drop_last=training,
                          generator=torch.Generator().manual_seed(seed), **common)  # fmt: skip

    if training:
        if len(train_set) // world_size < batch_size:
            raise ImageFolderError(
                f"{train_name} has {len(train_set)} images: too few for one batch of {batch_size} per process"
            )
        train_loader = shuffled(world_size, rank, batch_size)
    if train_set is not None:
        estimation_loader = shuffled(1, 0, batch_size * world_size) if world_size > 1 or not training else train_loader
    val_loader = DataLoader(val_set, batch_size=batch_size, sampler=ShardSampler(len(val_set), rank, world_size), **common)
    return DataLoaders(train_loader, val_loader, estimation_loader, num_classes)
