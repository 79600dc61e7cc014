"""Entries round-trip through the schema; malformed ones are refused and never written."""

import copy
import json

import pytest

from robustbench_alm.entry import (EntryError, entry_path, iter_entries, read_entry,
                                   validate_entry, write_entry)


def make_entry(**overrides):
    entry = {
        "schema_version": 1, "entry_id": "cnn-small-amo-pgd", "name": "cnn-small AMO-PGD",
        "authors": "", "link": "", "architecture": "cnn-small", "dataset": "fashion-mnist",
        "threat_model": "Linf", "eps": 0.1, "eps_text": "25.5/255", "clean_acc": 82.4,
        "autoattack_acc": 61.2, "robust_acc": 61.2, "additional_data": False,
        "number_forward_passes": 1, "venue": "", "footnote": None,
        "suite": {"name": "standard", "sha256": "a" * 64, "attacks": ["apgd-ce", "square"]},
        "seed": 0, "n_examples": 500,
        "examples": {"split": "test", "selection": "first-n", "indices_sha256": "b" * 64},
        "attacks": [{"name": "apgd-ce", "robust_acc": 62.0, "n_broken": 102, "seconds": 3.5},
                    {"name": "square", "robust_acc": 61.2, "n_broken": 4, "seconds": 9.0}],
        "margins": {"all_layer": {"method": "search", "n": 500, "mean": 0.1, "median": 0.09,
                                  "min": 0.0, "max": 0.5, "n_zero": 88, "n_not_found": 0,
                                  "quantiles": {"q10": 0.0, "q50": 0.09}}},
        "training": {"method": "amo-pgd", "hyperparameters": {"eps": 0.1}},
        "weights_sha256": "c" * 64, "versions": {"torch": "2.14.1"},
        "date": "2026-12-04T12:00:00+00:00", "seconds": 120.0, "flags": [],
    }
    entry.update(overrides)
    if "attacks" not in overrides and "robust_acc" in overrides:
        # Keep the stages consistent with an overridden robust accuracy.
        robust = entry["robust_acc"]
        entry["attacks"] = [dict(stage, robust_acc=robust) for stage in entry["attacks"]]
    return entry


def test_round_trip(tmp_path):
    entry = make_entry()
    path = write_entry(tmp_path, entry)
    assert path == tmp_path / "fashion-mnist" / "Linf" / "cnn-small-amo-pgd.json"
    assert read_entry(path) == entry
    assert [e for _, e in iter_entries(tmp_path)] == [entry]


@pytest.mark.parametrize("field, value, message", [
    ("clean_acc", "82.4", "not of type 'number'"),  # RobustBench's strings are refused
    ("clean_acc", 182.4, "maximum"),
    ("eps", -0.1, "minimum"),
    ("threat_model", "L1", "is not one of"),
    ("dataset", "imagenet", "is not one of"),
    ("entry_id", "../escape", "does not match"),
    ("weights_sha256", "xyz", "does not match"),
    ("unexpected", 1, "Additional properties"),
    ("date", "yesterday", "does not match"),
])
def test_malformed_entry_refused(tmp_path, field, value, message):
    entry = make_entry(**{field: value})
    with pytest.raises(EntryError, match=message):
        validate_entry(entry)
    with pytest.raises(EntryError):
        write_entry(tmp_path, entry)
    assert not list(tmp_path.rglob("*.json")), "an invalid entry was written"


def test_missing_field_named():
    entry = make_entry()
    del entry["suite"]
    with pytest.raises(EntryError, match="'suite' is a required property"):
        validate_entry(entry)


def test_nested_error_names_path():
    entry = make_entry()
    entry["attacks"][0]["robust_acc"] = "62.0"
    with pytest.raises(EntryError, match="attacks/0/robust_acc"):
        validate_entry(entry)


def test_read_refuses_broken_file(tmp_path):
    path = tmp_path / "fashion-mnist" / "Linf" / "x.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(EntryError, match="not valid JSON"):
        read_entry(path)
    bad = copy.deepcopy(make_entry())
    bad["seed"] = "0"
    path.write_text(json.dumps(bad))
    with pytest.raises(EntryError, match="seed"):
        read_entry(path)


def test_entry_path_layout():
    assert str(entry_path("lb", make_entry(threat_model="L2"))).endswith(
        "lb/fashion-mnist/L2/cnn-small-amo-pgd.json")


def test_reported_entry_needs_its_origin_not_a_suite():
    reported = make_entry(source="reported",
                          reported={"origin": "RobustBench model_info", "file": "x.json",
                                    "paper_robust_acc": 60.0})
    for field in ("suite", "seed", "n_examples", "examples", "attacks", "margins", "training",
                  "weights_sha256", "versions", "date"):
        del reported[field]
    validate_entry(reported)
    del reported["reported"]
    with pytest.raises(EntryError, match="'reported' is a required property"):
        validate_entry(reported)
    with pytest.raises(EntryError, match="is not one of"):
        validate_entry(make_entry(source="measured"))
    validate_entry(make_entry(source="evaluated"))  # said explicitly, same as missing
