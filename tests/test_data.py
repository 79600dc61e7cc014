"""Dataset loading: real Fashion-MNIST, a user folder of IDX files, and a helpful error."""

import gzip
import struct

import numpy as np
import pytest
import torch

from robustbench_alm.data import DataNotFoundError, load_dataset


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                   *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_real_fashion_mnist(fmnist_test):
    x, y = load_dataset("fashion-mnist", "test", download=False)
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == 0 and x.max() == 1
    assert torch.bincount(y).tolist() == [1000] * 10  # the test split is balanced
    assert y[:5].tolist() == [9, 2, 1, 1, 6]  # the published first labels


def test_user_folder_comes_first(tmp_path):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    folder = tmp_path / "mnist"
    folder.mkdir()
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.array([3, 1, 4]))
    x, y = load_dataset("mnist", "test", data_dir=tmp_path, download=False)
    assert y.tolist() == [3, 1, 4]
    assert torch.allclose(x[0, 0], torch.tensor(images[0] / 255.0, dtype=torch.float32))


def test_error_names_every_place(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("mnist", "train", data_dir=tmp_path, download=False)
    message = str(err.value)
    assert str(tmp_path) in message
    assert "/usr/share/datasets/mnist" in message
    assert "--data-dir" in message


def test_unknown_names_refused():
    with pytest.raises(ValueError, match="fashion-mnist"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="train"):
        load_dataset("mnist", "validation")


def test_missing_torchvision_gives_the_search_message(tmp_path, monkeypatch):
    # A container built with TORCHVISION=no: the CIFAR path fails with the usual message, not an
    # ImportError.
    import sys

    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes "import torchvision" fail
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("cifar10", "test", data_dir=tmp_path, download=True)
    assert "torchvision" in str(err.value) and str(tmp_path) in str(err.value)
