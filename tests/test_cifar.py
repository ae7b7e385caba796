"""CIFAR models (parameter counts against closed forms, shapes) and the CIFAR archive reader (fake archives in the real format).

The fake archives are written like the real ones: Python 2 protocol-2 pickles (strings as
``BINSTRING``, arrays through ``numpy.core.multiarray._reconstruct``) of dicts with a uint8
``data`` array of shape ``(N, 3072)``, channel planes one after the other; both as the extracted
folder and as the ``.tar.gz`` archive.
"""
from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from models import check_model_name, is_weights_available, load_model, model_task
from models.cifar import CifarResNet, resnet32_cifar, vgg16_bn_cifar
from models.registry import WeightsUnavailableError
from training.cifar import (
    CIFAR_MEAN,
    CIFAR_STD,
    CifarDataset,
    CifarFormatError,
    CifarMissingError,
    cifar_datasets,
    cifar_eval_transform,
    cifar_train_transform,
    read_cifar,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ models


def resnet_cifar_parameters(n: int, k: int) -> int:
    """Closed form: stem, three stages of n blocks (two 3x3 convs + 2 BNs each), 2 projections, fc."""
    stem = 27 * 16 + 2 * 16
    stage1 = n * (2 * 9 * 16 * 16 + 4 * 16)
    stage2 = (9 * 16 * 32 + 9 * 32 * 32 + 4 * 32) + (16 * 32 + 2 * 32) + (n - 1) * (2 * 9 * 32 * 32 + 4 * 32)
    stage3 = (9 * 32 * 64 + 9 * 64 * 64 + 4 * 64) + (32 * 64 + 2 * 64) + (n - 1) * (2 * 9 * 64 * 64 + 4 * 64)
    return stem + stage1 + stage2 + stage3 + 64 * k + k


def vgg16_bn_parameters(k: int) -> int:
    """Closed form: 13 bias-free 3x3 convs with BN (configuration D), classifier 512-4096-4096-k with biases."""
    pairs = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
             (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]  # fmt: skip
    convs = sum(9 * c_in * c_out + 2 * c_out for c_in, c_out in pairs)
    return convs + (512 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * k + k)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("num_classes", [100, 10])
def test_resnet32_parameter_count_and_shapes(num_classes: int) -> None:
    model = resnet32_cifar(num_classes=num_classes).eval()
    assert count(model) == resnet_cifar_parameters(5, num_classes)
    if num_classes == 100:
        assert count(model) == pytest.approx(0.47e6, rel=0.01)  # "about 0.47 M weights"
    shapes = {}

    def record(name: str):
        def hook(_module: nn.Module, _inputs, output: torch.Tensor) -> None:
            shapes[name] = tuple(output.shape)

        return hook

    for name in ("layer1", "layer2", "layer3"):
        getattr(model, name).register_forward_hook(record(name))
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, num_classes)
    assert shapes == {"layer1": (2, 16, 32, 32), "layer2": (2, 32, 16, 16), "layer3": (2, 64, 8, 8)}
    projections = [name for name, module in model.named_modules() if name.endswith("downsample")]
    assert projections == ["layer2.0.downsample", "layer3.0.downsample"]  # only where the shape changes
    assert isinstance(model.layer2[0].downsample[0], nn.Conv2d) and model.layer2[0].downsample[0].kernel_size == (1, 1)


@pytest.mark.parametrize("num_classes", [100, 10])
def test_vgg16_bn_parameter_count_and_shape(num_classes: int) -> None:
    with torch.device("meta"):  # 34 M parameters: shapes only
        model = vgg16_bn_cifar(num_classes=num_classes).eval()
        logits = model(torch.zeros(2, 3, 32, 32))
    assert count(model) == vgg16_bn_parameters(num_classes)
    assert logits.shape == (2, num_classes)
    kinds = [type(m) for m in model.features]
    assert kinds.count(nn.Conv2d) == kinds.count(nn.BatchNorm2d) == kinds.count(nn.ReLU) == 13
    assert kinds.count(nn.MaxPool2d) == 5
    assert sum(isinstance(m, nn.Dropout) for m in model.classifier) == 2


def test_registry_builds_the_cifar_models_without_pretrained_weights() -> None:
    for name in ("resnet32_cifar", "vgg16_bn_cifar"):
        check_model_name(name, "classification")
        assert model_task(name) == "classification" and not is_weights_available(name)
        with pytest.raises(WeightsUnavailableError, match=f"^{name}: no pretrained weights") as info:
            load_model(name, pretrained=True)
        assert "\n" not in str(info.value)
    model = load_model("resnet32_cifar", pretrained=False)
    assert isinstance(model, CifarResNet) and not model.training and model.fc.out_features == 100
    again = load_model("resnet32_cifar", pretrained=False)  # seeded
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


# ------------------------------------------------------------------ fake archives in the real format

_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]


class Python2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote CIFAR: protocol 2, strings as BINSTRING, numpy 1's module names."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_string(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_string
    dispatch[bytes] = save_string

    def save_global(self, obj, name=None) -> None:
        if obj is _RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def python2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def random_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def as_rows(images: np.ndarray) -> np.ndarray:
    """The archive's layout: per image the red plane, then green, then blue, each row-major (3072 bytes)."""
    return np.concatenate([images[..., channel].reshape(len(images), 1024) for channel in range(3)], axis=1)


def write_cifar100(root: Path, train: tuple[np.ndarray, list[int]], test: tuple[np.ndarray, list[int]],
                   archive: bool = False) -> None:  # fmt: skip
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, (images, labels) in (("train", train), ("test", test)):
        content = {b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))], b"batch_label": b"x",
                   b"fine_labels": labels, b"coarse_labels": [label // 5 for label in labels], b"data": as_rows(images)}  # fmt: skip
        (folder / split).write_bytes(python2_pickle(content))
    meta = {b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)]}  # fmt: skip
    (folder / "meta").write_bytes(python2_pickle(meta))
    if archive:
        with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname="cifar-100-python")
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


@pytest.fixture
def cifar100(tmp_path: Path) -> dict:
    train_images, test_images = random_images(5, 0), random_images(3, 1)
    data = {"train": (train_images, [0, 99, 42, 7, 99]), "test": (test_images, [3, 0, 98])}
    write_cifar100(tmp_path / "folder", data["train"], data["test"])
    write_cifar100(tmp_path / "archive", data["train"], data["test"], archive=True)
    return data


@pytest.mark.parametrize("form", ["folder", "archive"])
def test_reads_cifar100_bitwise_from_folder_and_archive(tmp_path: Path, cifar100: dict, form: str) -> None:
    assert (tmp_path / form / "cifar-100-python").is_dir() == (form == "folder")  # the archive form: the .tar.gz only
    for split, (images, labels) in cifar100.items():
        arrays = read_cifar(tmp_path / form, "cifar100", split)
        assert arrays.images.dtype == np.uint8 and arrays.images.shape == (len(labels), 32, 32, 3)
        assert np.array_equal(arrays.images, images)
        assert arrays.labels.dtype == np.int64 and arrays.labels.tolist() == labels
        assert arrays.classes == tuple(f"fine_{i}" for i in range(100))


def test_reads_cifar10_batches_in_order(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {f"data_batch_{i}": (random_images(2, i), [i, 9 - i]) for i in range(1, 6)}
    batches["test_batch"] = (random_images(3, 9), [1, 2, 3])
    for name, (images, labels) in batches.items():
        (folder / name).write_bytes(python2_pickle({b"data": as_rows(images), b"labels": labels, b"batch_label": b"b"}))
    (folder / "batches.meta").write_bytes(python2_pickle({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    train = read_cifar(tmp_path, "cifar10", "train")
    assert np.array_equal(train.images, np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]))
    assert train.labels.tolist() == [label for i in range(1, 6) for label in batches[f"data_batch_{i}"][1]]
    test = read_cifar(tmp_path, "cifar10", "test")
    assert np.array_equal(test.images, batches["test_batch"][0]) and test.labels.tolist() == [1, 2, 3]
    assert train.classes == tuple(f"c{i}" for i in range(10))


def test_reads_python3_pickles_too(tmp_path: Path) -> None:
    images = random_images(2, 3)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / split).write_bytes(pickle.dumps({"data": as_rows(images), "fine_labels": [5, 6]}, protocol=4))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [str(i) for i in range(100)]}, protocol=4))
    assert np.array_equal(read_cifar(tmp_path, "cifar100", "test").images, images)


class _RunsACommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_refuses_a_pickle_with_another_global(tmp_path: Path, cifar100: dict, protocol: int) -> None:
    marker = tmp_path / "it-ran"
    train = tmp_path / "folder" / "cifar-100-python" / "train"
    train.write_bytes(pickle.dumps({"data": _RunsACommand(f"touch {marker}"), "fine_labels": []}, protocol=protocol))
    with pytest.raises(CifarFormatError, match=r"^train: refusing to unpickle the global (posix|os)\.system"):
        read_cifar(tmp_path / "folder", "cifar100", "train")
    assert not marker.exists()
    assert read_cifar(tmp_path / "folder", "cifar100", "test").labels.tolist() == cifar100["test"][1]


def test_missing_archive_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(CifarMissingError) as info:
        read_cifar(tmp_path, "cifar100", "train")
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message
    for text in ("cifar-100-python/", "cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"):
        assert text in message
    with pytest.raises(CifarMissingError, match="cifar-10-python.tar.gz"):
        read_cifar(tmp_path, "cifar10", "test")


def test_malformed_files_are_refused(tmp_path: Path, cifar100: dict) -> None:
    train = tmp_path / "folder" / "cifar-100-python" / "train"
    train.write_bytes(python2_pickle({b"data": np.zeros((2, 3000), np.uint8), b"fine_labels": [0, 1]}))
    with pytest.raises(CifarFormatError, match=r"shape \(N, 3072\)"):
        read_cifar(tmp_path / "folder", "cifar100", "train")
    train.write_bytes(python2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]}))
    with pytest.raises(CifarFormatError, match=r"labels outside 0\.\.99"):
        read_cifar(tmp_path / "folder", "cifar100", "train")
    train.write_bytes(b"not a pickle")
    with pytest.raises(CifarFormatError, match="not a CIFAR pickle"):
        read_cifar(tmp_path / "folder", "cifar100", "train")


# ------------------------------------------------------------------ transforms and dataset


def normalised(image: np.ndarray) -> np.ndarray:
    """``(pixel / 255 - mean) / std`` with the recipe's constants, CHW."""
    mean = np.array([129.3, 124.1, 112.4]) / 255
    std = np.array([68.2, 65.4, 70.4]) / 255
    return ((image / 255.0 - mean) / std).transpose(2, 0, 1)


def test_eval_transform_normalises_with_the_cifar_statistics() -> None:
    image = random_images(1, 4)[0]
    out = cifar_eval_transform()(Image.fromarray(image))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), normalised(image), rtol=0, atol=1e-5)


def test_train_transform_is_a_crop_of_the_reflect_padded_image_maybe_flipped() -> None:
    image = random_images(1, 5)[0]
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    windows = {(top, left, flip): padded[top:top + 32, left:left + 32][:, ::-1 if flip else 1]
               for top in range(9) for left in range(9) for flip in (False, True)}  # fmt: skip
    found = []
    for seed in range(8):
        torch.manual_seed(seed)
        out = cifar_train_transform()(Image.fromarray(image))
        assert out.shape == (3, 32, 32)
        pixels = np.round((out.numpy().transpose(1, 2, 0) * np.array(CIFAR_STD) + np.array(CIFAR_MEAN)) * 255)
        matches = [key for key, window in windows.items() if np.array_equal(window, pixels.astype(np.uint8))]
        assert matches, f"seed {seed}: not a (flipped) window of the padded image"
        found.append(matches[0])
    assert {flip for _, _, flip in found} == {False, True}
    assert any((top, left) != (4, 4) for top, left, _ in found)


def test_dataset_items_are_seeded_per_epoch_and_index(tmp_path: Path, cifar100: dict) -> None:
    train, test = cifar_datasets(tmp_path / "archive", "cifar100", seed=3)
    assert len(train) == 5 and len(test) == 3 and len(train.classes) == 100
    image, label = test[2]
    assert label == 98
    np.testing.assert_allclose(image.numpy(), normalised(cifar100["test"][0][2]), rtol=0, atol=1e-5)
    first = [train[i][0] for i in range(5)]
    assert all(torch.equal(a, train[i][0]) for i, a in enumerate(first))  # same (seed, epoch, index): same image
    train.set_epoch(1)
    assert any(not torch.equal(a, train[i][0]) for i, a in enumerate(first))
    plain = CifarDataset(read_cifar(tmp_path / "folder", "cifar100", "train"))
    pil, label = plain[1]
    assert isinstance(pil, Image.Image) and label == 99
    assert np.array_equal(np.asarray(pil), cifar100["train"][0][1])
