"""Real datasets that work offline, for examples, tests and benchmarks.

scikit-learn's digits ship inside the wheel; Fashion-MNIST comes from Debian's
``dataset-fashion-mnist`` package (or any folder of the four IDX files). Nothing downloads.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

FASHION_MNIST_ENV = "GRAPHPRUNE_FASHION_MNIST"
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# Where Debian's dataset-fashion-mnist (and common hand installs) put the files.
_FASHION_MNIST_DIRS = (
    "/usr/share/datasets/fashion-mnist",
    "/usr/share/fashion-mnist",
    "/usr/share/datasets/fashion_mnist",
    "/usr/local/share/datasets/fashion-mnist",
)
_INSTALL_HINT = (
    f"install it with `apt-get install dataset-fashion-mnist`, or set {FASHION_MNIST_ENV} "
    f"to a folder holding {', '.join(FASHION_MNIST_FILES)} (optionally .gz)"
)

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/ format spec).
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def load_digits_splits(
    size: int = 16, test_size: int = 360, random_state: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn digits as [N,1,size,size] float32 images and int64 labels.

    The split is stratified and fixed by ``random_state`` so accuracies are comparable across
    runs; normalization uses training statistics only, so the test split stays unseen.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError(
            "load_digits_splits needs scikit-learn: `pip install scikit-learn` "
            "(or `pip install graphprune[bench]`)"
        ) from exc
    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0  # pixel values are 0..16
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, random_state=random_state, stratify=y
    )
    mean, std = float(x_tr.mean()), float(x_tr.std())

    def prepare(images: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy((images - mean) / std).unsqueeze(1)
        if t.shape[-1] != size:
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
        return t.float().contiguous()

    return (
        TensorDataset(prepare(x_tr), torch.from_numpy(y_tr)),
        TensorDataset(prepare(x_te), torch.from_numpy(y_te)),
    )


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (plain or gzip, detected by content) into a numpy array.

    Raises ValueError naming the file when the header is wrong or the payload size does not
    match the declared dimensions, so a truncated download never yields a silently short array.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: corrupt gzip stream ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic must start with two zero bytes)")
    dtype = _IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise ValueError(f"{path}: unknown IDX data type code 0x{raw[2]:02x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: IDX size mismatch, dims {dims} need {expected} bytes, file has {len(raw)}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))  # native order, writable copy


def _idx_path(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def _has_fashion_mnist(root: Path) -> bool:
    return all(_idx_path(root, stem) is not None for stem in FASHION_MNIST_FILES)


def find_fashion_mnist_dir() -> Path | None:
    """The folder holding the Fashion-MNIST IDX files, or None when none is found.

    ``$GRAPHPRUNE_FASHION_MNIST`` wins; if it is set but lacks the files, that is a
    configuration mistake and raises FileNotFoundError rather than silently using another copy.
    """
    env = os.environ.get(FASHION_MNIST_ENV)
    if env:
        root = Path(env).expanduser()
        if not _has_fashion_mnist(root):
            raise FileNotFoundError(
                f"{FASHION_MNIST_ENV}={env} does not hold the Fashion-MNIST files "
                f"{', '.join(FASHION_MNIST_FILES)} (optionally .gz)"
            )
        return root
    for candidate in _FASHION_MNIST_DIRS:
        if _has_fashion_mnist(Path(candidate)):
            return Path(candidate)
    return None


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None, train_subset: int | None = None, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """Fashion-MNIST as [N,1,28,28] float32 (normalized by training statistics), int64 labels.

    ``train_subset`` keeps a fixed random subset (chosen by ``seed``) of the training images,
    for quick runs; the test split is always the full 10,000.
    """
    found = Path(root).expanduser() if root is not None else find_fashion_mnist_dir()
    if found is None:
        raise FileNotFoundError(f"Fashion-MNIST not found; {_INSTALL_HINT}")
    paths = {stem: _idx_path(found, stem) for stem in FASHION_MNIST_FILES}
    missing = [stem for stem, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(f"{found} lacks {', '.join(missing)}; {_INSTALL_HINT}")
    arrays = {stem: read_idx(p) for stem, p in paths.items() if p is not None}
    x_tr, y_tr, x_te, y_te = (arrays[stem] for stem in FASHION_MNIST_FILES)
    for x, y, split in ((x_tr, y_tr, "train"), (x_te, y_te, "t10k")):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{found}: {split} images {x.shape} do not match labels {y.shape}")

    train_x = torch.from_numpy(x_tr).float().div_(255.0)
    # Statistics of the full training set, so a subset run normalizes like a full run.
    mean, std = train_x.mean().item(), train_x.std().item()
    train_y = torch.from_numpy(y_tr.astype(np.int64))
    if train_subset is not None:
        if not 0 < train_subset <= len(train_y):
            raise ValueError(f"train_subset must be in 1..{len(train_y)}, got {train_subset}")
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(train_y), generator=gen)[:train_subset]
        train_x, train_y = train_x[idx], train_y[idx]
    test_x = torch.from_numpy(x_te).float().div_(255.0)
    test_y = torch.from_numpy(y_te.astype(np.int64))
    return (
        TensorDataset(train_x.sub_(mean).div_(std).unsqueeze(1), train_y),
        TensorDataset(test_x.sub_(mean).div_(std).unsqueeze(1), test_y),
    )


DATASETS = ("digits", "fashion-mnist")


def num_classes(loader: Iterable) -> int:
    """Classes of a classification loader: its largest label + 1 (labels are 0..k-1). Read
    from a TensorDataset's label tensor directly, else by one pass over the batches."""
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return int(dataset.tensors[1].max()) + 1
    return max(int(batch[1].max()) for batch in loader) + 1


def loaders_for(
    name: str, batch_size: int = 32, *, train_subset: int | None = None, seed: int = 0
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """(train, test) DataLoaders of a bundled dataset by name: "digits" or "fashion-mnist"."""
    from torch.utils.data import DataLoader

    if name == "digits":
        train, test = load_digits_splits()
    elif name == "fashion-mnist":
        train, test = load_fashion_mnist(train_subset=train_subset, seed=seed)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    # Shuffling draws from the global RNG (seed it with torch.manual_seed): the trainer saves
    # that RNG in its checkpoints, so a resumed run sees the same batches.
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True),
        DataLoader(test, batch_size=256),
    )
