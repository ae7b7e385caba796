"""CIFAR-10 and CIFAR-100 from the "python version" archives of Krizhevsky (2009), read offline and safely.

A data folder holds either the extracted archive (``cifar-100-python/{train,test,meta}``,
``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``) or the archive itself
(``cifar-100-python.tar.gz``, ``cifar-10-python.tar.gz``), read in memory. Nothing is downloaded.

The files are (Python 2) pickles of dicts holding a ``uint8`` array ``data`` of shape
``(N, 3072)`` (per row the 1024 red, then green, then blue values of a 32x32 image, row-major)
and the labels as a list of ints. They are read with :class:`NumpyOnlyUnpickler`, which rebuilds
numpy arrays and nothing else: any other global (``os.system``, ...) is refused with
:class:`CifarFormatError`, so a tampered file cannot run code.

Transforms (the PSGD recipe): training reflect-pads by 4 pixels, crops 32x32 at random and flips
horizontally; both splits normalise with mean ``(129.3, 124.1, 112.4) / 255`` and standard
deviation ``(68.2, 65.4, 70.4) / 255``. The random transforms of sample ``i`` in epoch ``e`` are
drawn from a generator seeded with ``(seed, e, i)``, as for the image folders of
:mod:`training.data`, so they depend neither on the loader workers nor on the processes.
"""
from __future__ import annotations

import enum
import io
import logging
import pickle
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from models.cifar import CIFAR_MEAN, CIFAR_STD
from training.data import sample_seed

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "CifarArrays",
    "CifarDataset",
    "CifarFormatError",
    "CifarMissingError",
    "CifarVariant",
    "NumpyOnlyUnpickler",
    "cifar_datasets",
    "cifar_eval_transform",
    "cifar_train_transform",
    "load_numpy_pickle",
    "read_cifar",
]

logger = logging.getLogger(__name__)

IMAGE_SIZE = 32
CROP_PADDING = 4
SPLITS = ("train", "test")


class CifarMissingError(FileNotFoundError):
    """The data folder holds neither the extracted CIFAR folder nor its archive (one-line message)."""


class CifarFormatError(ValueError):
    """A CIFAR file that is not what the archive holds: a refused pickle, wrong keys, shapes or labels."""


class CifarVariant(str, enum.Enum):
    CIFAR10 = "cifar10"
    CIFAR100 = "cifar100"


@dataclass(frozen=True)
class _Layout:
    """Where a variant's files are and which keys they use."""

    folder: str
    archive: str
    files: dict[str, tuple[str, ...]]  # split -> batch files
    meta: str
    label_key: str
    names_key: str
    num_classes: int

    @property
    def url(self) -> str:
        return f"https://www.cs.toronto.edu/~kriz/{self.archive}"


_LAYOUTS = {
    CifarVariant.CIFAR10: _Layout("cifar-10-batches-py", "cifar-10-python.tar.gz",
                                  {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
                                  "batches.meta", "labels", "label_names", 10),
    CifarVariant.CIFAR100: _Layout("cifar-100-python", "cifar-100-python.tar.gz", {"train": ("train",), "test": ("test",)},
                                   "meta", "fine_labels", "fine_label_names", 100),
}  # fmt: skip


# --------------------------------------------------------------------------- safe unpickling


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The globals a pickled ndarray refers to (the reconstruct function's module moved in numpy 2)."""
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray", reconstruct.__module__):
        allowed[(module, reconstruct.__name__)] = reconstruct
    return allowed


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler for plain containers and numpy arrays: ``find_class`` allows only numpy's array
    reconstruction function, ``numpy.ndarray`` and ``numpy.dtype`` and raises :class:`CifarFormatError`
    for any other global."""

    _ALLOWED = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise CifarFormatError(f"refusing to unpickle the global {module}.{name} (only numpy arrays are allowed)") from None


def load_numpy_pickle(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`NumpyOnlyUnpickler`; Python 2 strings are decoded as latin-1."""
    return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


# --------------------------------------------------------------------------- reading the archive


@dataclass(frozen=True)
class CifarArrays:
    """One split: ``images`` ``(N, 32, 32, 3)`` uint8 (RGB, HWC), ``labels`` ``(N,)`` int64, the class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]


def _missing_message(data_dir: Path, layout: _Layout) -> str:
    return (f"CIFAR data not found in {data_dir}: put the extracted folder {layout.folder}/ or the archive "
            f"{layout.archive} there (from {layout.url}; nothing is downloaded)")  # fmt: skip


def _file_reader(data_dir: Path, layout: _Layout) -> Callable[[str], bytes]:
    """A function returning the bytes of one file of the variant: from the extracted folder, else the archive."""
    folder, archive = data_dir / layout.folder, data_dir / layout.archive
    if folder.is_dir():
        def read_extracted(name: str) -> bytes:
            path = folder / name
            if not path.is_file():
                raise CifarMissingError(f"{path} is missing (the extracted {layout.folder}/ folder is incomplete)")
            return path.read_bytes()

        return read_extracted
    if archive.is_file():
        def read_archived(name: str) -> bytes:
            member = f"{layout.folder}/{name}"
            try:
                with tarfile.open(archive, "r:*") as tar:
                    info = tar.getmember(member)
                    handle = tar.extractfile(info) if info.isfile() else None
                    if handle is None:
                        raise CifarFormatError(f"{archive}: {member} is not a regular file")
                    return handle.read()
            except KeyError:
                raise CifarMissingError(f"{archive} has no {member}") from None
            except tarfile.TarError as error:
                raise CifarFormatError(f"{archive} is not a readable tar archive ({error})") from None

        return read_archived
    raise CifarMissingError(_missing_message(data_dir, layout))


def _unpickled_dict(read: Callable[[str], bytes], name: str) -> dict[str, Any]:
    try:
        content = load_numpy_pickle(read(name))
    except CifarFormatError as error:
        raise CifarFormatError(f"{name}: {error}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise CifarFormatError(f"{name} is not a CIFAR pickle ({type(error).__name__}: {error})") from None
    if not isinstance(content, dict):
        raise CifarFormatError(f"{name} holds a {type(content).__name__}, not a dict")
    return content


def _batch_arrays(content: dict[str, Any], name: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 32, 32, 3)`` and labels ``(N,)`` of one batch file, checked."""
    data, labels = content.get("data"), content.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * IMAGE_SIZE**2:
        described = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise CifarFormatError(f"{name}: 'data' must be a uint8 array of shape (N, 3072), got a {described}")
    if labels is None:
        raise CifarFormatError(f"{name} has no {label_key!r} labels")
    labels = np.asarray(labels)
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise CifarFormatError(f"{name}: {label_key!r} must hold {len(data)} integer labels, got shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise CifarFormatError(f"{name}: labels outside 0..{num_classes - 1} (from {labels.min()} to {labels.max()})")
    images = data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def read_cifar(data_dir: Path | str, variant: CifarVariant | str = CifarVariant.CIFAR100, split: str = "train") -> CifarArrays:
    """The images, labels and class names of one split (``"train"`` or ``"test"``) of CIFAR-10/100 in ``data_dir``.

    Raises:
        CifarMissingError: neither the extracted folder nor the archive is in ``data_dir``.
        CifarFormatError: a file is refused (a global other than numpy's) or malformed.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown CIFAR split {split!r}; expected one of {', '.join(SPLITS)}")
    layout = _LAYOUTS[CifarVariant(variant)]
    read = _file_reader(Path(data_dir), layout)
    names = _unpickled_dict(read, layout.meta).get(layout.names_key)
    if not isinstance(names, list) or len(names) != layout.num_classes or not all(isinstance(n, str) for n in names):
        raise CifarFormatError(f"{layout.meta}: {layout.names_key!r} must list {layout.num_classes} class names")
    parts = [_batch_arrays(_unpickled_dict(read, name), name, layout.label_key, layout.num_classes)
             for name in layout.files[split]]  # fmt: skip
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    logger.debug("read %d %s images of %s from %s", len(labels), split, layout.folder, data_dir)
    return CifarArrays(images, labels, tuple(names))


# --------------------------------------------------------------------------- dataset and transforms


def cifar_train_transform() -> transforms.Compose:
    """Reflect-pad 4, random 32x32 crop, random horizontal flip, to tensor, normalise (CIFAR mean/std)."""
    return transforms.Compose([
        transforms.RandomCrop(IMAGE_SIZE, padding=CROP_PADDING, padding_mode="reflect"),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(CIFAR_MEAN, CIFAR_STD),
    ])  # fmt: skip


def cifar_eval_transform() -> transforms.Compose:
    """To tensor, normalise (CIFAR mean/std)."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])


class CifarDataset(Dataset):
    """``(transform(PIL image), label)`` pairs of a :class:`CifarArrays` split (``transform=None``: the PIL image).

    The random transforms of sample ``i`` in epoch ``e`` are seeded with ``(seed, e, i)``
    (:meth:`set_epoch` before each epoch). ``classes`` are the class names.
    """

    def __init__(self, arrays: CifarArrays, transform: Callable[[Image.Image], Any] | None = None, seed: int = 0) -> None:
        self.images, self.labels, self.classes = arrays.images, arrays.labels, list(arrays.classes)
        self.transform, self.seed, self.epoch = transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = Image.fromarray(self.images[index], mode="RGB"), int(self.labels[index])
        if self.transform is None:
            return image, label
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
            return self.transform(image), label


def cifar_datasets(data_dir: Path | str, variant: CifarVariant | str = CifarVariant.CIFAR100,
                   seed: int = 0) -> tuple[CifarDataset, CifarDataset]:  # fmt: skip
    """The training split (augmented) and the test split (normalised only) of CIFAR-10/100 in ``data_dir``."""
    train = CifarDataset(read_cifar(data_dir, variant, "train"), cifar_train_transform(), seed)
    test = CifarDataset(read_cifar(data_dir, variant, "test"), cifar_eval_transform(), seed)
    return train, test
