"""Datasets by name, as tensors with inputs in [0, 1].

The loader looks, in order:

1. in ``data_dir`` (``--data-dir``): IDX files for the MNIST family (plain or gzipped, flat, in a
   sub-folder named after the dataset, or in torchvision's ``<Class>/raw`` layout), torchvision's
   own layout for CIFAR and SVHN;
2. in the files of a Debian package (``dataset-fashion-mnist`` installs Fashion-MNIST in
   ``/usr/share/datasets/fashion-mnist``);
3. else it downloads through torchvision into ``data_dir`` (or the user cache folder).

When nothing is found, the error names every place it looked and how to fix it. Normalization is
never applied here: it belongs inside the model, so that attacks see the true input box.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from robustbench_alm.threat import Dataset

__all__ = ["load_dataset", "DataNotFoundError", "default_data_dir"]

logger = logging.getLogger(__name__)

#: Where Debian's dataset packages install their files.
DEBIAN_DATASETS = Path("/usr/share/datasets")

_DEBIAN_PACKAGE = {Dataset.FASHION_MNIST: "dataset-fashion-mnist"}
_TORCHVISION_CLASS = {
    Dataset.FASHION_MNIST: "FashionMNIST",
    Dataset.MNIST: "MNIST",
    Dataset.CIFAR10: "CIFAR10",
    Dataset.CIFAR100: "CIFAR100",
    Dataset.SVHN: "SVHN",
}
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_SPLITS = ("train", "test")


class DataNotFoundError(FileNotFoundError):
    """No copy of a dataset could be found or downloaded."""


@dataclass
class _Search:
    """The places a load tried, for an error message that tells the user what to do."""

    tried: list[str] = field(default_factory=list)


def default_data_dir() -> Path:
    """The folder downloads go to when no ``data_dir`` is given."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "robustbench-alm" / "data"


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {shape}, got {data.size} values")
    return data.reshape(shape)


def _find_idx_pair(folder: Path, split: str) -> tuple[Path, Path] | None:
    prefix = _IDX_PREFIX[split]
    found = []
    for kind, idx in (("images", "idx3"), ("labels", "idx1")):
        stem = f"{prefix}-{kind}-{idx}-ubyte"
        match = next((folder / f"{stem}{ext}" for ext in ("", ".gz")
                      if (folder / f"{stem}{ext}").is_file()), None)
        if match is None:
            return None
        found.append(match)
    return found[0], found[1]


def _idx_folders(dataset: Dataset, data_dir: Path) -> list[Path]:
    tv = _TORCHVISION_CLASS[dataset]
    return [data_dir, data_dir / dataset.value, data_dir / tv / "raw"]


def _load_idx(dataset: Dataset, split: str, folders: list[Path], search: _Search):
    for folder in folders:
        search.tried.append(str(folder))
        pair = _find_idx_pair(folder, split)
        if pair is not None:
            logger.info("loading %s %s from %s", dataset.value, split, folder)
            images, labels = (_read_idx(p) for p in pair)
            x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
            return x, torch.from_numpy(labels.astype(np.int64))
    return None


def _torchvision_dataset(dataset: Dataset, split: str, root: Path, download: bool):
    import torchvision  # imported late: only this path needs it

    cls = getattr(torchvision.datasets, _TORCHVISION_CLASS[dataset])
    if dataset is Dataset.SVHN:
        return cls(str(root), split=split, download=download)
    return cls(str(root), train=(split == "train"), download=download)


def _to_tensors(ds, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.asarray(ds.data)
    if dataset in (Dataset.CIFAR10, Dataset.CIFAR100):
        data = data.transpose(0, 3, 1, 2)  # N, H, W, C -> N, C, H, W
    elif data.ndim == 3:
        data = data[:, None]
    labels = np.asarray(getattr(ds, "targets", getattr(ds, "labels", None)))
    x = torch.from_numpy(data.astype(np.float32) / 255.0)
    return x, torch.from_numpy(labels.astype(np.int64))


def _load_torchvision(dataset, split, root: Path, download: bool, search: _Search):
    search.tried.append(f"{root} (torchvision layout{', download' if download else ''})")
    try:
        ds = _torchvision_dataset(dataset, split, root, download)
    except (RuntimeError, OSError, ImportError) as err:
        # torchvision raises RuntimeError for missing files and OSError/URLError offline; an image
        # built without torchvision (Dockerfile, TORCHVISION=no) raises ImportError.
        search.tried[-1] += f": {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        return None
    logger.info("loaded %s %s through torchvision from %s", dataset.value, split, root)
    return _to_tensors(ds, dataset)


def load_dataset(
    name: str | Dataset,
    split: str = "test",
    *,
    data_dir: str | Path | None = None,
    download: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a whole split as ``(x, y)``: float inputs in [0, 1] of shape [N, C, H, W], int64 labels.

    Args:
        name: a dataset name such as ``"fashion-mnist"`` or ``"cifar10"``.
        split: ``"train"`` or ``"test"``.
        data_dir: a folder to look in first, and to download into.
        download: whether to fall back on a torchvision download.

    Raises:
        DataNotFoundError: naming every place that was tried and how to fix it.
    """
    dataset = Dataset.parse(name)
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {_SPLITS}")
    search = _Search()
    user_dir = Path(data_dir).expanduser() if data_dir is not None else None
    mnist_family = dataset in (Dataset.FASHION_MNIST, Dataset.MNIST)

    found = None
    if user_dir is not None and mnist_family:
        found = _load_idx(dataset, split, _idx_folders(dataset, user_dir), search)
    if found is None and user_dir is not None and not mnist_family:
        found = _load_torchvision(dataset, split, user_dir, False, search)
    if found is None and mnist_family:
        found = _load_idx(dataset, split, [DEBIAN_DATASETS / dataset.value], search)
    if found is None and download:
        found = _load_torchvision(dataset, split, user_dir or default_data_dir(), True, search)
    if found is None:
        raise DataNotFoundError(_not_found_message(dataset, split, search))
    return found


def _not_found_message(dataset: Dataset, split: str, search: _Search) -> str:
    lines = [f"could not find the {split} split of {dataset.value}. Looked in:"]
    lines += [f"  - {place}" for place in search.tried]
    lines.append("To fix it, do one of:")
    lines.append("  - pass --data-dir FOLDER holding the files (IDX files for the MNIST family, "
                 "torchvision's layout otherwise);")
    if dataset in _DEBIAN_PACKAGE:
        lines.append(f"  - on Debian or Ubuntu: sudo apt-get install {_DEBIAN_PACKAGE[dataset]};")
    lines.append("  - allow the torchvision download (needs internet access).")
    return "\n".join(lines)
