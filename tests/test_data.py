"""Offline datasets: digits split, IDX reader, Fashion-MNIST loader."""

from __future__ import annotations

import gzip
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from graphprune.apps import data


def _write_idx(path: Path, array: np.ndarray, type_code: int, compress: bool = False) -> Path:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + array.tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def test_digits_split_sizes_and_shapes() -> None:
    train, test = data.load_digits_splits()
    assert len(train) == 1437 and len(test) == 360
    x, y = train.tensors
    assert x.shape == (1437, 1, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    # Normalized with training statistics (computed before upsampling, so only roughly 0/1).
    assert abs(x.mean().item()) < 0.05 and 0.8 < x.std().item() < 1.1


def test_digits_split_is_stratified_and_fixed() -> None:
    _, test = data.load_digits_splits(size=8)
    counts = Counter(test.tensors[1].tolist())
    assert all(abs(counts[c] - 36) <= 1 for c in range(10)), counts
    assert test.tensors[0].shape == (360, 1, 8, 8)
    _, again = data.load_digits_splits(size=8)
    assert torch.equal(test.tensors[0], again.tensors[0])


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([-7, 300, 5], dtype=">i4")
    got = data.read_idx(_write_idx(tmp_path / "img", images, 0x08, compress))
    np.testing.assert_array_equal(got, images)
    got = data.read_idx(_write_idx(tmp_path / "lab", labels, 0x0C, compress))
    np.testing.assert_array_equal(got, [-7, 300, 5])
    assert got.dtype.isnative


def test_read_idx_rejects_truncated(tmp_path: Path) -> None:
    path = _write_idx(tmp_path / "t", np.zeros((4, 5), dtype=np.uint8), 0x08)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="t: IDX size mismatch"):
        data.read_idx(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x00", "not an IDX"),
        (b"\x00\x00\x42\x01\x00\x00\x00\x01\x00", "unknown IDX data type"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
        (gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x02\x00\x00")[:-6], "corrupt gzip"),
    ],
)
def test_read_idx_rejects_corrupt(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "bad.idx"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        data.read_idx(path)
    assert "bad.idx" in str(info.value)


def test_fashion_mnist_missing_files_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(root=tmp_path)
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=data.FASHION_MNIST_ENV):
        data.find_fashion_mnist_dir()


def test_fashion_mnist_from_env_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 50), ("t10k", 20)):
        _write_idx(
            tmp_path / f"{split}-images-idx3-ubyte",
            rng.integers(0, 256, (n, 28, 28), np.uint8),
            0x08,
        )
        _write_idx(
            tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, np.uint8), 0x08, True
        )
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path))
    assert data.find_fashion_mnist_dir() == tmp_path
    train, test = data.load_fashion_mnist(train_subset=10, seed=1)
    assert train.tensors[0].shape == (10, 1, 28, 28) and len(test) == 20
    again, _ = data.load_fashion_mnist(train_subset=10, seed=1)
    assert torch.equal(train.tensors[1], again.tensors[1])
    with pytest.raises(ValueError, match="train_subset"):
        data.load_fashion_mnist(train_subset=51)


def test_fashion_mnist_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(data.FASHION_MNIST_ENV, raising=False)
    root = data.find_fashion_mnist_dir()
    if root is None:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    train, test = data.load_fashion_mnist(root)
    assert train.tensors[0].shape == (60000, 1, 28, 28)
    assert test.tensors[0].shape == (10000, 1, 28, 28)
    assert train.tensors[1].dtype == torch.int64
    assert sorted(set(test.tensors[1].tolist())) == list(range(10))
    # Normalized by training statistics.
    assert abs(train.tensors[0].mean().item()) < 1e-3
    assert abs(train.tensors[0].std().item() - 1) < 1e-3
