"""Per-example results: Parquet round trip, per-stage columns, and refusal of stale files."""

import numpy as np
import pytest

from robustbench_alm.entry import read_entry, write_entry
from robustbench_alm.per_example import (build_frame, check_against_entry, examples_path,
                                         find_examples, indices_sha256, read_examples,
                                         write_examples)
from tests.test_entry import make_entry


def make_arrays(n=40, seed=0, p_clean=0.8, scale=0.1, eps=0.1):
    """Synthetic per-example arrays that obey the harness's rules (robust implies correct)."""
    rng = np.random.default_rng(seed)
    clean = rng.random(n) < p_clean
    distance = np.where(clean, rng.exponential(scale, n), 0.0)
    return {"label": np.arange(n) % 10, "clean_correct": clean,
            "robust": clean & (distance > eps), "input_space_distance": distance,
            "all_layer_margin": np.where(clean, 3 * distance, 0.0)}


def write_evaluated(root, entry_id, arrays, *, dataset="fashion-mnist", split="test",
                    indices=None, **overrides):
    """Write an evaluated entry and its per-example results; return the entry's path."""
    n = len(arrays["label"])
    indices = list(range(n)) if indices is None else list(indices)
    robust_acc = 100.0 * float(np.mean(arrays["robust"]))
    fields = dict(entry_id=entry_id, dataset=dataset, n_examples=n,
                  clean_acc=100.0 * float(np.mean(arrays["clean_correct"])),
                  robust_acc=robust_acc, autoattack_acc=robust_acc,
                  examples={"split": split, "selection": "first-n",
                            "indices_sha256": indices_sha256(dataset, split, indices)})
    fields.update(overrides)
    path = write_entry(root, make_entry(**fields))
    frame = build_frame(arrays, dataset=dataset, split=split, indices=indices)
    write_examples(examples_path(path), frame)
    return path


def test_round_trip_keeps_stage_columns(tmp_path):
    arrays = make_arrays()
    arrays["robust_pgd-20"] = arrays["robust"].copy()
    arrays["robust_fgsm"] = arrays["clean_correct"].copy()
    path = write_evaluated(tmp_path, "m", arrays)
    assert examples_path(path).name == "m.examples.parquet"
    assert examples_path(path).parent == path.parent

    frame = read_examples(examples_path(path))
    assert list(frame.columns) == ["dataset", "split", "index", "label", "clean_correct",
                                   "robust", "robust_fgsm", "robust_pgd-20",
                                   "all_layer_margin", "input_space_distance"]
    assert frame["index"].tolist() == list(range(40))
    np.testing.assert_array_equal(frame["robust_fgsm"], arrays["clean_correct"])
    np.testing.assert_array_equal(frame["input_space_distance"], arrays["input_space_distance"])
    assert frame["robust"].dtype == bool and set(frame["dataset"]) == {"fashion-mnist"}


def test_margins_skipped_are_nan(tmp_path):
    arrays = make_arrays()
    del arrays["input_space_distance"], arrays["all_layer_margin"]
    frame = build_frame(arrays, dataset="fashion-mnist", split="test", indices=range(40))
    assert frame["input_space_distance"].isna().all()
    assert frame["all_layer_margin"].isna().all()


def test_hash_matches_the_harness():
    from robustbench_alm import evaluation

    assert evaluation.indices_sha256 is indices_sha256  # one definition, in the vocabulary
    assert indices_sha256("fashion-mnist", "test", [3, 1]) != indices_sha256(
        "fashion-mnist", "test", [1, 3])


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("robust"), "lack"),
    (lambda a: a.update(robust=a["robust"].astype(int)), "must be boolean"),
    (lambda a: a.update(clean_correct=a["clean_correct"][:-1]), "shape"),
    (lambda a: a.update(robust=np.ones(40, bool)), "not clean-correct"),
    (lambda a: a.update(robust_square=np.zeros(3, bool)), "robust_square"),
])
def test_malformed_arrays_refused(change, message):
    arrays = make_arrays()
    change(arrays)
    with pytest.raises(ValueError, match=message):
        build_frame(arrays, dataset="fashion-mnist", split="test", indices=range(40))


def test_stale_file_refused(tmp_path):
    path = write_evaluated(tmp_path, "m", make_arrays())
    entry = read_entry(path)
    frame = read_examples(examples_path(path), entry)

    stale = dict(entry, robust_acc=entry["robust_acc"] + 2.5)
    with pytest.raises(ValueError, match="robust gives"):
        check_against_entry(frame, stale)
    other_set = dict(entry, examples=dict(entry["examples"], indices_sha256="d" * 64))
    with pytest.raises(ValueError, match="hash"):
        check_against_entry(frame, other_set)
    with pytest.raises(ValueError, match="rows"):
        check_against_entry(frame, dict(entry, n_examples=41))
    with pytest.raises(ValueError, match="dataset"):
        check_against_entry(frame, dict(entry, dataset="mnist"))
    # Readers that can do without the rows get None, not an error.
    assert find_examples(path, stale) is None
    assert find_examples(path, entry) is not None
    with pytest.raises(FileNotFoundError, match="no per-example results"):
        read_examples(tmp_path / "missing.examples.parquet")
