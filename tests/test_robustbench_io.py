"""RobustBench interoperability on its real model_info records (reference data, not copied)."""

import json
from pathlib import Path

import pytest

from robustbench_alm.cli import main
from robustbench_alm.entry import read_entry, validate_entry
from robustbench_alm.leaderboard import entries_frame
from robustbench_alm.robustbench_io import (from_model_info, import_model_info,
                                            robustbench_eps_text, to_model_info)
from tests.test_entry import make_entry

# A checkout lives at /work/<repo>; the shared reference data beside it at /work/shared.
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
MODEL_INFO = REFERENCE / "robustbench_model_info"

needs_reference = pytest.mark.skipif(
    not MODEL_INFO.is_dir(),
    reason=f"RobustBench reference records not found at {MODEL_INFO} (shared data folder absent)")


def _ranking_number(record: dict) -> float:
    """RobustBench's rule, read off the raw record: best known accuracy, else AutoAttack's."""
    return float(record["external"]) if record.get("external") else float(
        record["autoattack_acc"])


@needs_reference
def test_import_all_reference_records():
    files = sorted(MODEL_INFO.rglob("*.json"))
    assert len(files) == 158
    entries = import_model_info([MODEL_INFO])
    assert len(entries) == 158
    for entry in entries:
        validate_entry(entry)
        assert entry["source"] == "reported"
        assert entry["robust_acc"] <= entry["autoattack_acc"]
    boards = {(e["dataset"], e["threat_model"]) for e in entries}
    assert boards == {("cifar10", "Linf"), ("cifar10", "L2"), ("cifar100", "Linf")}


@needs_reference
def test_known_entry_numbers():
    entry = import_model_info([MODEL_INFO / "cifar10" / "Linf" / "Carmon2019Unlabeled.json"])[0]
    assert entry["entry_id"] == "Carmon2019Unlabeled"
    assert (entry["clean_acc"], entry["autoattack_acc"], entry["robust_acc"]) == (
        89.69, 59.53, 59.53)
    assert entry["reported"]["paper_robust_acc"] == 62.5
    assert entry["eps"] == 8 / 255 and entry["eps_text"] == "8/255"
    assert entry["threat_model"] == "Linf" and entry["additional_data"] is True
    assert entry["architecture"] == "WideResNet-28-10"

    # An external attack beat AutoAttack: that number ranks it, and the flag is kept.
    kang = import_model_info([MODEL_INFO / "cifar10" / "Linf" / "Kang2021Stable.json"])[0]
    assert (kang["autoattack_acc"], kang["robust_acc"]) == (71.28, 64.20)
    assert kang["flags"] == ["autoattack-unreliable"]
    # eps written as a decimal ("0.031") is read as that number and shown as written.
    zhang = import_model_info([MODEL_INFO / "cifar10" / "Linf" / "Zhang2019Theoretically.json"])
    assert zhang[0]["eps"] == 0.031 and zhang[0]["eps_text"] == "0.031"
    l2 = import_model_info([MODEL_INFO / "cifar10" / "L2"])
    assert {e["eps"] for e in l2} == {0.5} and {e["threat_model"] for e in l2} == {"L2"}


@needs_reference
def test_dataset_field_disagreeing_with_folder_is_flagged():
    # RobustBench files this record under cifar100 while its dataset field says cifar10.
    entry = import_model_info([MODEL_INFO / "cifar100" / "Linf" / "Hendrycks2019Using.json"])[0]
    assert entry["dataset"] == "cifar100"
    assert "record-dataset-mismatch" in entry["flags"]


@needs_reference
def test_cifar10_linf_ranks_as_robustbench(tmp_path, capsys):
    folder = MODEL_INFO / "cifar10" / "Linf"
    assert main(["import-robustbench", str(folder), "--dir", str(tmp_path)]) == 0
    assert "imported 99 reported entries" in capsys.readouterr().out
    frame = entries_frame(tmp_path)
    ours = list(frame.entry_id)

    raw = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}
    expected = sorted(raw, key=lambda k: _ranking_number(raw[k]), reverse=True)
    assert len(ours) == len(expected) == 99
    # Same ranking numbers in the same order; models tied on it may come in either order.
    assert [_ranking_number(raw[k]) for k in ours] == [_ranking_number(raw[k]) for k in expected]
    untied = [k for k in expected
              if sum(_ranking_number(raw[j]) == _ranking_number(raw[k]) for j in raw) == 1]
    assert [k for k in ours if k in untied] == untied
    # The external number decides: ranked by AutoAttack alone, this model would be first.
    assert ours[:2] == ["Bartoldson2024Adversarial_WRN-94-16", "Amini2024MeanSparse_S-WRN-94-16"]


@needs_reference
def test_export_round_trips_reference_records(tmp_path):
    for path in sorted(MODEL_INFO.rglob("*.json")):
        original = json.loads(path.read_text())
        exported = to_model_info(import_model_info([path])[0])
        if path.parts[-3] != original["dataset"]:
            # The one record whose dataset field contradicts its folder exports the folder's.
            assert exported["dataset"] == path.parts[-3]
            original["dataset"] = path.parts[-3]
        for key, value in original.items():
            if key in ("clean_acc", "reported", "autoattack_acc", "external"):
                assert float(exported[key]) == float(value), (path.name, key)
            elif key == "footnote" and value is None:
                assert "footnote" not in exported
            else:
                assert exported[key] == value, (path.name, key)
        assert set(exported) <= set(original)


def test_export_evaluated_entry():
    record = to_model_info(make_entry(eps=8 / 255, eps_text="8/255", robust_acc=60.0,
                                      autoattack_acc=61.2))
    assert record["eps"] == "8/255"
    assert (record["clean_acc"], record["autoattack_acc"], record["reported"]) == (
        "82.40", "61.20", "60.00")
    assert record["external"] == "60.00"  # our suite went below AutoAttack
    assert "500 test points" in record["footnote"] and "suite standard" in record["footnote"]
    assert record["unreliable"] is False
    with pytest.raises(ValueError, match="has no AutoAttack accuracy"):
        to_model_info(make_entry(autoattack_acc=None))
    assert robustbench_eps_text(0.1) == "0.1" and robustbench_eps_text(2 / 255) == "2/255"


def test_export_cli(tmp_path, capsys):
    from robustbench_alm.entry import write_entry

    write_entry(tmp_path / "lb", make_entry())
    assert main(["export-robustbench", "--dir", str(tmp_path / "lb"),
                 "--out", str(tmp_path / "mi")]) == 0
    record = json.loads((tmp_path / "mi" / "fashion-mnist" / "Linf" /
                         "cnn-small-amo-pgd.json").read_text())
    assert record["autoattack_acc"] == "61.20"
    assert main(["export-robustbench", "nowhere", "--dir", str(tmp_path / "lb"),
                 "--out", str(tmp_path / "mi")]) == 2
    assert "no entry 'nowhere'" in capsys.readouterr().err


_RECORD = {"name": "n", "authors": "a", "link": "", "architecture": "x", "dataset": "cifar10",
           "eps": "8/255", "clean_acc": "90.1", "autoattack_acc": "50.5", "reported": "51",
           "additional_data": False, "number_forward_passes": 1, "venue": ""}


@pytest.mark.parametrize("change, message", [
    ({"clean_acc": "ninety"}, "clean_acc must be a percentage"),
    ({"autoattack_acc": "150"}, "between 0 and 100"),
    ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
    ({"eps": "eight"}, "cannot read eps 'eight'"),
    ({"autoattack_acc": ""}, "autoattack_acc is empty"),
])
def test_bad_records_refused(change, message):
    with pytest.raises(ValueError, match=message):
        from_model_info({**_RECORD, **change}, threat_model="Linf", entry_id="m")


def test_threat_model_from_folder(tmp_path):
    bad = tmp_path / "cifar10" / "corruptions" / "m.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps(_RECORD))
    with pytest.raises(ValueError, match="cannot tell the threat model"):
        import_model_info([bad])
    entry = import_model_info([bad], threat_model="Linf")[0]
    assert entry["threat_model"] == "Linf" and entry["reported"]["file"].endswith("m.json")


def test_imported_entry_written_and_read_back(tmp_path):
    entry = from_model_info(_RECORD, threat_model="Linf", entry_id="m")
    from robustbench_alm.entry import write_entry

    assert read_entry(write_entry(tmp_path, entry)) == entry
    assert "suite" not in entry and entry["source"] == "reported"
