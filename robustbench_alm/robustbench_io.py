"""RobustBench interoperability: import its ``model_info`` records, export ours in its format.

RobustBench keeps one JSON record per model under ``model_info/<dataset>/<threat model>/``. The
threat model is known only from the folder; numbers are strings holding percentages (``"59.53"``)
and eps is text (``"8/255"``, ``"0.031"``, ``"0.5"``). Its leaderboard ranks by ``external`` (the
best known robust accuracy, when an adaptive attack beat AutoAttack), else ``autoattack_acc``.

Importing turns a record into an entry with ``source: "reported"``: its numbers are as published,
not re-evaluated here. Its ``robust_acc`` is RobustBench's ranking number, so our leaderboard,
sorted by robust accuracy, ranks an imported board as RobustBench does. Exporting writes our
entry's numbers as RobustBench's strings (two decimals) and says in the footnote how they were
measured.

Vocabulary-and-leaderboard layer: plain Python; no torch.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from robustbench_alm.entry import SCHEMA_VERSION, entry_source, safe_entry_id, validate_entry
from robustbench_alm.threat import Dataset, ThreatModel, check_eps, parse_eps

__all__ = ["ORIGIN", "from_model_info", "read_model_info", "import_model_info",
           "to_model_info", "robustbench_eps_text"]

logger = logging.getLogger(__name__)

#: How an imported entry names where its numbers come from.
ORIGIN = "RobustBench model_info"
#: Flag set on an imported entry that RobustBench marks as possibly unreliable.
UNRELIABLE_FLAG = "autoattack-unreliable"
#: Flag set on an imported entry whose ``dataset`` field disagrees with the folder it is filed in.
MISMATCH_FLAG = "record-dataset-mismatch"
_REQUIRED = ("name", "authors", "link", "architecture", "dataset", "eps", "clean_acc",
             "autoattack_acc", "additional_data", "number_forward_passes", "venue")


def _percent(info: dict[str, Any], field: str, where: str) -> float | None:
    """A RobustBench percentage string as a number; None when the field is absent or empty."""
    value = info.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {field} must be a percentage such as \"59.53\", "
                         f"got {value!r}") from None
    if not 0 <= number <= 100 or not math.isfinite(number):
        raise ValueError(f"{where}: {field} must lie between 0 and 100, got {value!r}")
    return number


def from_model_info(info: dict[str, Any], *, threat_model: str, entry_id: str,
                    file: str = "", dataset: str | None = None) -> dict[str, Any]:
    """Turn one RobustBench record into a validated entry marked ``source: "reported"``.

    Args:
        info: the parsed JSON record.
        threat_model: ``Linf`` or ``L2`` (RobustBench keeps it in the folder name).
        entry_id: the entry's id; RobustBench's file stem (its model name).
        file: where the record came from, kept as provenance.
        dataset: the leaderboard the record is filed under, when known from its folder. It wins
            over the record's own ``dataset`` field, as on RobustBench's site; a disagreement is
            logged and flagged ``record-dataset-mismatch``.

    Raises:
        ValueError: on a missing field, a number that is not a percentage, an unknown dataset or
            threat model, or an eps that is not a number or fraction.
    """
    where = file or entry_id
    missing = [k for k in _REQUIRED if k not in info]
    if missing:
        raise ValueError(f"{where}: RobustBench record lacks {missing}")
    tm = ThreatModel.parse(threat_model)
    flags = [UNRELIABLE_FLAG] if info.get("unreliable") else []
    recorded = Dataset.parse(info["dataset"])
    filed = Dataset.parse(dataset) if dataset is not None else recorded
    if filed is not recorded:
        logger.warning("%s: filed under %s but its dataset field says %s; using %s", where,
                       filed.value, recorded.value, filed.value)
        flags.append(MISMATCH_FLAG)
    eps = parse_eps(info["eps"])
    check_eps(eps, tm)

    autoattack = _percent(info, "autoattack_acc", where)
    external = _percent(info, "external", where)
    if autoattack is None:
        raise ValueError(f"{where}: autoattack_acc is empty; RobustBench ranks by it")
    unreliable = info.get("unreliable")
    entry = {
        "schema_version": SCHEMA_VERSION,
        "entry_id": safe_entry_id(entry_id),
        "name": info["name"],
        "authors": info["authors"],
        "link": info["link"],
        "architecture": info["architecture"],
        "dataset": filed.value,
        "threat_model": tm.value,
        "eps": eps,
        "eps_text": str(info["eps"]),
        "clean_acc": _percent(info, "clean_acc", where),
        "autoattack_acc": autoattack,
        # RobustBench's rule: the best known (lowest) accuracy when an external attack found
        # one, else AutoAttack's. An external number above AutoAttack's is no better attack.
        "robust_acc": min(external, autoattack) if external is not None else autoattack,
        "additional_data": info["additional_data"],
        "number_forward_passes": info["number_forward_passes"],
        "venue": info["venue"],
        "footnote": info.get("footnote"),
        "flags": flags,
        "source": "reported",
        "reported": {"origin": ORIGIN, "file": file,
                     "paper_robust_acc": _percent(info, "reported", where),
                     "external_acc": external,
                     "unreliable": unreliable if isinstance(unreliable, bool) else None},
    }
    validate_entry(entry)
    return entry


def read_model_info(path: str | Path, threat_model: str | None = None) -> dict[str, Any]:
    """Read one record file, filed as RobustBench files it: ``<dataset>/<threat model>/x.json``.

    The threat model defaults to the folder's name; the dataset folder, when it names a known
    dataset, decides the dataset (see :func:`from_model_info`).

    The entry's ``reported.file`` is the path from the dataset folder on, e.g.
    ``cifar10/Linf/Carmon2019Unlabeled.json``.
    """
    path = Path(path)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path} must hold one JSON object, got {type(info).__name__}")
    if threat_model is None:
        try:
            threat_model = ThreatModel.parse(path.parent.name).value
        except ValueError:
            raise ValueError(f"{path}: cannot tell the threat model from the folder name "
                             f"{path.parent.name!r}; expected a folder named one of "
                             f"{[t.value for t in ThreatModel]}, or pass the threat model"
                             ) from None
    folder_dataset = path.parent.parent.name
    dataset = folder_dataset if folder_dataset in {d.value for d in Dataset} else None
    relative = "/".join(path.parts[-3:])
    return from_model_info(info, threat_model=threat_model, entry_id=path.stem, file=relative,
                           dataset=dataset)


def import_model_info(paths: list[str | Path],
                      threat_model: str | None = None) -> list[dict[str, Any]]:
    """Entries from record files and from folders searched for ``*.json`` (README excluded).

    A folder may be RobustBench's ``model_info`` root, a dataset folder or a threat-model folder:
    every JSON file below it is read. Duplicate ids within one dataset and threat model are
    refused, since they would overwrite each other.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(path.rglob("*.json"))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no RobustBench record or folder at {path}")
    entries = [read_model_info(f, threat_model) for f in files]
    seen: dict[tuple[str, str, str], str] = {}
    for entry in entries:
        key = (entry["dataset"], entry["threat_model"], entry["entry_id"])
        if key in seen:
            raise ValueError(f"two records give the entry {'/'.join(key)}: "
                             f"{seen[key]} and {entry['reported']['file']}")
        seen[key] = entry["reported"]["file"]
    return entries


def robustbench_eps_text(eps: float) -> str:
    """eps as RobustBench writes it: ``k/255`` for a whole k, else the plain number."""
    k = eps * 255
    if math.isclose(k, round(k), abs_tol=1e-9) and round(k) > 0:
        return f"{round(k)}/255"
    return f"{eps:g}"


def _footnote(entry: dict[str, Any]) -> str | None:
    """A reported entry's footnote as imported; ours says how the numbers were measured."""
    if entry_source(entry) == "reported":
        return entry.get("footnote")
    suite, examples = entry["suite"], entry["examples"]
    notes = [entry["footnote"]] if entry.get("footnote") else []
    notes.append(f"Evaluated by robustbench-alm on {entry['n_examples']} {examples['split']} "
                 f"points ({examples['selection']}) with suite {suite['name']} "
                 f"(sha256 {suite['sha256'][:12]}), seed {entry['seed']}.")
    if entry.get("flags"):
        notes.append(f"Flags: {', '.join(entry['flags'])}.")
    return " ".join(notes)


def to_model_info(entry: dict[str, Any]) -> dict[str, Any]:
    """Our entry as a RobustBench record (numbers as percentage strings with two decimals).

    An evaluated entry needs an AutoAttack accuracy (the standard suite), since RobustBench ranks
    by it; its ``reported`` is our robust accuracy, and ``external`` is set when our suite went
    below AutoAttack. A reported entry exports the numbers it was imported with.

    Raises:
        ValueError: if the entry has no AutoAttack accuracy.
    """
    validate_entry(entry)
    if entry["autoattack_acc"] is None:
        raise ValueError(f"entry {entry['entry_id']!r} has no AutoAttack accuracy (suite "
                         f"{(entry.get('suite') or {}).get('name')!r}); RobustBench ranks by "
                         "it, so evaluate with --suite standard to export")
    reported = entry.get("reported") or {}
    if entry_source(entry) == "reported":
        eps_text, paper, external = (entry["eps_text"], reported.get("paper_robust_acc"),
                                     reported.get("external_acc"))
        unreliable = reported.get("unreliable")
    else:
        eps_text, paper = robustbench_eps_text(entry["eps"]), entry["robust_acc"]
        below = entry["robust_acc"] < entry["autoattack_acc"]
        external = entry["robust_acc"] if below else None
        unreliable = bool(entry.get("flags"))

    def text(number: float | None) -> str:
        return "" if number is None else f"{number:.2f}"

    record: dict[str, Any] = {
        "link": entry["link"], "name": entry["name"], "authors": entry["authors"],
        "additional_data": entry["additional_data"],
        "number_forward_passes": entry["number_forward_passes"],
        "dataset": entry["dataset"], "venue": entry["venue"],
        "architecture": entry["architecture"], "eps": eps_text,
        "clean_acc": text(entry["clean_acc"]), "reported": text(paper),
        "autoattack_acc": text(entry["autoattack_acc"]),
    }
    if external is not None:
        record["external"] = text(external)
    footnote = _footnote(entry)
    if footnote is not None:
        record["footnote"] = footnote
    if unreliable is not None:
        record["unreliable"] = unreliable
    return record
