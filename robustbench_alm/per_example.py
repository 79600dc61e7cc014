"""Per-example results: one Parquet file beside each evaluated entry.

    leaderboards/fashion-mnist/Linf/cnn-small.json                    the entry
    leaderboards/fashion-mnist/Linf/cnn-small.examples.parquet        its examples, one row each

Columns: ``dataset``, ``split``, ``index`` (which example), ``label``, ``clean_correct``,
``robust`` (after the whole suite), any ``robust_<stage>`` columns the harness provides,
``all_layer_margin`` and ``input_space_distance`` (NaN when margins were skipped; 0 on clean
mistakes; +inf where the search found nothing). Two entries whose rows carry the same
(dataset, split, index) were scored on the same points, so their results can be paired.

Leaderboard-and-compare layer: pandas and numpy only, never torch. Callers holding tensors turn
them into numpy arrays first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustbench_alm.entry import indices_sha256

__all__ = ["SUFFIX", "ID_COLUMNS", "MARGIN_COLUMNS", "indices_sha256", "examples_path",
           "build_frame", "write_examples", "read_examples", "find_examples",
           "check_against_entry", "stage_columns"]

logger = logging.getLogger(__name__)

#: File name ending of the per-example results of ``<entry_id>.json``.
SUFFIX = ".examples.parquet"
#: The columns that identify an example.
ID_COLUMNS = ("dataset", "split", "index")
#: Real-valued per-example margins, NaN when not estimated.
MARGIN_COLUMNS = ("all_layer_margin", "input_space_distance")
_REQUIRED_ARRAYS = ("label", "clean_correct", "robust")
#: Agreement allowed (percentage points) between an entry's accuracies and those recomputed
#: from its rows: the harness averages in float32; one example in 10000 is 0.01 points.
_ACC_TOLERANCE = 1e-3


def examples_path(entry_file: str | Path) -> Path:
    """Where the per-example results of the entry stored at ``entry_file`` live."""
    entry_file = Path(entry_file)
    return entry_file.with_name(entry_file.stem + SUFFIX)


def stage_columns(frame: pd.DataFrame) -> list[str]:
    """The per-stage robust flags present, in file order (``robust_<stage>``)."""
    return [c for c in frame.columns if c.startswith("robust_")]


def _as_bool(name: str, values: Any, n: int) -> np.ndarray:
    array = np.asarray(values)
    if array.shape != (n,):
        raise ValueError(f"per-example column {name!r} has shape {array.shape}; expected ({n},)")
    if array.dtype != np.bool_:
        raise ValueError(f"per-example column {name!r} must be boolean, got dtype {array.dtype}")
    return array


def _as_float(name: str, values: Any, n: int) -> np.ndarray:
    if values is None:
        return np.full(n, np.nan)
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (n,):
        raise ValueError(f"per-example column {name!r} has shape {array.shape}; expected ({n},)")
    return array


def build_frame(per_example: Mapping[str, Any], *, dataset: str, split: str,
                indices: Sequence[int]) -> pd.DataFrame:
    """Assemble the per-example table from arrays keyed by column name.

    Args:
        per_example: ``label``, ``clean_correct`` and ``robust`` (required), any boolean
            ``robust_<stage>`` arrays, and optionally ``all_layer_margin`` and
            ``input_space_distance``; each a 1-D numpy array (or list) with one value per example.
        dataset, split, indices: which examples the rows are, in order.

    Raises:
        ValueError: on a missing or misshapen column, or a robust point that is not clean-correct.
    """
    n = len(indices)
    missing = [k for k in _REQUIRED_ARRAYS if k not in per_example]
    if missing:
        raise ValueError(f"per-example results lack {missing}; got columns "
                         f"{sorted(per_example)}, expected at least {list(_REQUIRED_ARRAYS)}")
    unknown = sorted(set(per_example) - set(_REQUIRED_ARRAYS) - set(MARGIN_COLUMNS)
                     - {k for k in per_example if k.startswith("robust_")})
    if unknown:
        logger.info("per-example columns %s are not part of the format; not stored", unknown)

    columns: dict[str, Any] = {
        "dataset": pd.Series([dataset] * n, dtype="string"),
        "split": pd.Series([split] * n, dtype="string"),
        "index": np.asarray(indices, dtype=np.int64),
        "label": np.asarray(per_example["label"], dtype=np.int64).reshape(-1),
        "clean_correct": _as_bool("clean_correct", per_example["clean_correct"], n),
        "robust": _as_bool("robust", per_example["robust"], n),
    }
    if columns["label"].shape != (n,):
        raise ValueError(f"per-example labels have {columns['label'].size} values for {n} "
                         "examples")
    for name in sorted(k for k in per_example if k.startswith("robust_")):
        columns[name] = _as_bool(name, per_example[name], n)
    for name in MARGIN_COLUMNS:
        columns[name] = _as_float(name, per_example.get(name), n)
    frame = pd.DataFrame(columns)
    _check_frame(frame, "per-example results")
    return frame


def _check_frame(frame: pd.DataFrame, where: str) -> None:
    expected = [*ID_COLUMNS, "label", "clean_correct", "robust", *MARGIN_COLUMNS]
    missing = [c for c in expected if c not in frame.columns]
    if missing:
        raise ValueError(f"{where} lacks columns {missing}; has {list(frame.columns)}")
    for name in ["clean_correct", "robust", *stage_columns(frame)]:
        if frame[name].dtype != np.bool_:
            raise ValueError(f"{where}: column {name!r} must be boolean, got {frame[name].dtype}")
    if frame.duplicated(list(ID_COLUMNS)).any():
        raise ValueError(f"{where}: an example (dataset, split, index) appears twice")
    if (frame["robust"] & ~frame["clean_correct"]).any():
        raise ValueError(f"{where}: a point counted robust is not clean-correct")


def write_examples(path: str | Path, frame: pd.DataFrame) -> Path:
    """Write the per-example table as Parquet at ``path`` (atomically); return the path."""
    path = Path(path)
    _check_frame(frame, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def read_examples(path: str | Path, entry: dict[str, Any] | None = None) -> pd.DataFrame:
    """Read a per-example table; with ``entry``, also check that it belongs to that entry.

    Raises:
        FileNotFoundError: if there is no file at ``path``.
        ValueError: if the file is malformed or does not match ``entry``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no per-example results at {path}; `robustbench-alm "
                                "evaluate` writes them beside each entry it evaluates")
    frame = pd.read_parquet(path)
    _check_frame(frame, str(path))
    if entry is not None:
        check_against_entry(frame, entry, str(path))
    return frame


def check_against_entry(frame: pd.DataFrame, entry: dict[str, Any], where: str = "") -> None:
    """Refuse rows that are not the ones ``entry`` was computed from.

    Checks the dataset, split, number of rows and the indices hash, then recomputes clean and
    robust accuracy from the rows: a stale file left over from an earlier run fails here.
    """
    where = where or f"per-example results of {entry['entry_id']}"
    examples = entry.get("examples") or {}
    for column, expected in (("dataset", entry["dataset"]), ("split", examples.get("split"))):
        found = sorted(set(frame[column].astype(str)))
        if found != [expected]:
            raise ValueError(f"{where}: {column} {found} does not match the entry's "
                             f"{expected!r}")
    if len(frame) != entry.get("n_examples"):
        raise ValueError(f"{where}: {len(frame)} rows, but the entry has "
                         f"n_examples {entry.get('n_examples')}")
    digest = indices_sha256(entry["dataset"], examples["split"], frame["index"].tolist())
    if digest != examples.get("indices_sha256"):
        raise ValueError(f"{where}: the example indices hash to {digest[:12]}..., the entry "
                         f"records {str(examples.get('indices_sha256'))[:12]}...")
    for column, field in (("clean_correct", "clean_acc"), ("robust", "robust_acc")):
        recomputed = 100.0 * float(frame[column].mean())
        if not math.isclose(recomputed, entry[field], abs_tol=_ACC_TOLERANCE):
            raise ValueError(f"{where}: {column} gives {recomputed:.4f}%, the entry's {field} "
                             f"is {entry[field]:.4f}%")


def find_examples(entry_file: str | Path, entry: dict[str, Any]) -> pd.DataFrame | None:
    """The per-example results beside ``entry_file`` if there are any that match the entry.

    For readers that can do without them (the web page, the plots): a missing file gives None
    quietly, a malformed or stale one gives None with a warning that says why.
    """
    path = examples_path(entry_file)
    if entry.get("source") == "reported" or not path.is_file():
        return None
    try:
        return read_examples(path, entry)
    except ValueError as err:
        logger.warning("ignoring per-example results: %s", err)
        return None
