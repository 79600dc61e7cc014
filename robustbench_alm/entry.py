"""Leaderboard entries: their JSON schema, validation, and where they live on disk.

An entry is one JSON file per evaluated model, filed as
``leaderboards/<dataset>/<threat_model>/<entry_id>.json``. It keeps RobustBench's fields (so
RobustBench users read it at a glance) and adds what makes a number reproducible: the suite and
its hash, the seed, which examples were used, per-attack results, margin statistics and the
training recipe. Accuracies are percentages stored as numbers, never as strings.

An entry imported from elsewhere (RobustBench's model_info records) has ``source: "reported"``
and a ``reported`` block saying where it came from; it has no suite, examples or margins, since
nothing was re-evaluated here. An entry without ``source`` was evaluated here.

Vocabulary layer: plain Python and ``jsonschema``; no torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
import hashlib
from collections.abc import Sequence
from typing import Any

import jsonschema

from robustbench_alm.flags import FLAGS

__all__ = ["ENTRY_SCHEMA", "SOURCES", "EntryError", "validate_entry", "write_entry",
           "read_entry", "entry_path", "entry_source", "iter_entries", "measurement_differences"]

SCHEMA_VERSION = 1

#: Where an entry's numbers come from: measured by this harness, or reported elsewhere and
#: imported without re-evaluation.
SOURCES = ("evaluated", "reported")

_PERCENT = {"type": "number", "minimum": 0, "maximum": 100}
_FLAG_PATTERN = "^(" + "|".join(sorted(FLAGS)) + r")(:[A-Za-z0-9._-]+)?$"
_NULLABLE_PERCENT = {"type": ["number", "null"], "minimum": 0, "maximum": 100}
_STATS = {
    "type": "object",
    "required": ["method", "n", "mean", "median", "quantiles"],
    "properties": {
        "method": {"type": "string"},
        "n": {"type": "integer", "minimum": 0},
        "mean": {"type": ["number", "null"]},
        "median": {"type": ["number", "null"]},
        "min": {"type": ["number", "null"]},
        "max": {"type": ["number", "null"]},
        "n_zero": {"type": "integer", "minimum": 0},
        "n_not_found": {"type": "integer", "minimum": 0},
        "quantiles": {"type": "object", "additionalProperties": {"type": ["number", "null"]}},
    },
}

#: Fields every entry has, whether evaluated here or imported as reported elsewhere.
_COMMON_FIELDS = [
    "schema_version", "entry_id", "name", "authors", "link", "architecture", "dataset",
    "threat_model", "eps", "eps_text", "clean_acc", "autoattack_acc", "robust_acc",
    "additional_data", "number_forward_passes", "venue", "footnote",
]
#: Fields only an entry evaluated here has: how to reproduce its numbers.
_EVALUATED_FIELDS = [
    "suite", "seed", "n_examples", "examples", "attacks", "margins", "training",
    "weights_sha256", "versions", "date",
]

#: Where a reported entry's numbers come from (RobustBench's model_info records, for now).
_REPORTED = {
    "type": "object",
    "additionalProperties": False,
    "required": ["origin", "file", "paper_robust_acc"],
    "properties": {
        "origin": {"type": "string", "minLength": 1},
        "file": {"type": "string"},
        "paper_robust_acc": _NULLABLE_PERCENT,
        "external_acc": _NULLABLE_PERCENT,
        "unreliable": {"type": ["boolean", "null"]},
    },
}

#: JSON Schema (draft 2020-12) every entry must satisfy before it is written.
ENTRY_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "robustbench-alm leaderboard entry",
    "type": "object",
    "additionalProperties": False,
    "required": _COMMON_FIELDS,
    # An entry evaluated here carries everything that makes its numbers reproducible; a
    # reported one (source "reported") carries where its numbers were published instead.
    "if": {"required": ["source"], "properties": {"source": {"const": "reported"}}},
    "then": {"required": ["reported"]},
    "else": {"required": _EVALUATED_FIELDS},
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "entry_id": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]*$"},
        # RobustBench's fields.
        "name": {"type": "string", "minLength": 1},
        "authors": {"type": "string"},
        "link": {"type": "string"},
        "architecture": {"type": "string", "minLength": 1},
        "dataset": {"enum": ["fashion-mnist", "mnist", "cifar10", "cifar100", "svhn"]},
        "eps": {"type": "number", "minimum": 0},
        "clean_acc": _PERCENT,
        "autoattack_acc": _NULLABLE_PERCENT,
        "additional_data": {"type": "boolean"},
        "number_forward_passes": {"type": "integer", "minimum": 1},
        "venue": {"type": "string"},
        "footnote": {"type": ["string", "null"]},
        # Ours.
        "threat_model": {"enum": ["Linf", "L2"]},
        "eps_text": {"type": "string"},
        "robust_acc": _PERCENT,
        "n_clean_correct": {"type": "integer", "minimum": 0},
        "attack_success_rate": _NULLABLE_PERCENT,
        "output_selector": {"type": ["integer", "string", "null"]},
        "suite": {
            "type": "object",
            "required": ["name", "sha256", "attacks"],
            "properties": {
                "name": {"type": "string"},
                "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "attacks": {"type": "array", "items": {"type": "string"}},
            },
        },
        "seed": {"type": "integer"},
        "n_examples": {"type": "integer", "minimum": 1},
        "examples": {
            "type": "object",
            "required": ["split", "selection", "indices_sha256"],
            "properties": {
                "split": {"enum": ["train", "test"]},
                "selection": {"type": "string"},
                "indices_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            },
        },
        "attacks": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "robust_acc", "n_broken", "seconds"],
                "properties": {
                    "name": {"type": "string"},
                    "kind": {"type": "string"},
                    "n_target_classes": {"type": "integer", "minimum": 1},
                    "substitute": {"type": "string"},
                    "n_full_budget": {"type": "integer", "minimum": 0},
                    "escalated": {"type": "boolean"},
                    "robust_acc": _PERCENT,
                    "n_broken": {"type": "integer", "minimum": 0},
                    "seconds": {"type": "number", "minimum": 0},
                },
            },
        },
        "margins": {
            "type": "object",
            "properties": {"all_layer": _STATS, "input_space": _STATS},
        },
        "training": {
            "type": ["object", "null"],
            "required": ["method", "hyperparameters"],
            "properties": {
                "method": {"type": "string"},
                "hyperparameters": {"type": "object"},
            },
        },
        "weights_sha256": {"type": ["string", "null"], "pattern": "^[0-9a-f]{64}$"},
        "versions": {"type": "object", "additionalProperties": {"type": ["string", "null"]}},
        # ISO 8601 with a time zone; a pattern, since format checks need optional packages.
        "date": {"type": "string",
                 "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"},
        "seconds": {"type": "number", "minimum": 0},
        # Every flag is defined, with its meaning, in robustbench_alm.flags.FLAGS.
        "flags": {"type": "array", "uniqueItems": True,
                  "items": {"type": "string", "pattern": _FLAG_PATTERN}},
        # Missing means "evaluated": entries written before this field existed were.
        "source": {"enum": list(SOURCES)},
        "reported": _REPORTED,
        # Present when the entry comes from a submitted job: which submission, under what licence.
        "submission": {
            "type": "object",
            "additionalProperties": False,
            "required": ["sha256", "license"],
            "properties": {
                "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "license": {"type": "string", "minLength": 1},
            },
        },
    },
}

_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class EntryError(ValueError):
    """An entry that does not satisfy the schema."""


def validate_entry(entry: dict[str, Any]) -> None:
    """Raise :class:`EntryError` listing every way ``entry`` breaks the schema."""
    validator = jsonschema.Draft202012Validator(ENTRY_SCHEMA)
    errors = sorted(validator.iter_errors(entry), key=lambda e: list(e.absolute_path))
    lines = [f"  {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
             for e in errors]
    if not errors:
        lines = [f"  {problem}" for problem in _consistency_problems(entry)]
    if lines:
        raise EntryError("invalid leaderboard entry:\n" + "\n".join(lines))


def _consistency_problems(entry: dict[str, Any]) -> list[str]:
    """What a schema cannot say: robust accuracy never above clean accuracy, and so on."""
    problems = []
    clean, robust = entry["clean_acc"], entry["robust_acc"]
    slack = 1e-3  # percentage points: rounding in stored numbers, not a real excess
    if robust > clean + slack:
        problems.append(f"robust_acc {robust} exceeds clean_acc {clean}")
    aa = entry.get("autoattack_acc")
    if aa is not None and aa > clean + slack:
        problems.append(f"autoattack_acc {aa} exceeds clean_acc {clean}")
    if entry_source(entry) == "evaluated":
        previous = clean
        for i, stage in enumerate(entry.get("attacks") or []):
            if stage["robust_acc"] > previous + slack:
                problems.append(f"attacks/{i}/robust_acc {stage['robust_acc']} exceeds the "
                                f"accuracy before that stage ({previous})")
            previous = stage["robust_acc"]
        if entry.get("attacks") and abs(previous - robust) > slack:
            problems.append(f"robust_acc {robust} differs from the last stage's {previous}")
    return problems


def entry_source(entry: dict[str, Any]) -> str:
    """``"evaluated"`` or ``"reported"``; an entry without the field was evaluated here."""
    return entry.get("source", "evaluated")


def indices_sha256(dataset: str, split: str, indices: Sequence[int]) -> str:
    """The hash an entry records as ``examples.indices_sha256`` for these example indices."""
    text = f"{dataset}:{split}:" + ",".join(str(int(i)) for i in indices)
    return hashlib.sha256(text.encode()).hexdigest()


def safe_entry_id(text: str) -> str:
    """Turn free text into an id that is safe as a file name."""
    cleaned = _ID_UNSAFE.sub("-", text).strip("-.")
    if not cleaned:
        raise ValueError(f"cannot make an entry id from {text!r}")
    return cleaned


def entry_path(root: Path, entry: dict[str, Any]) -> Path:
    """Where ``entry`` lives under the leaderboard folder ``root``."""
    return Path(root) / entry["dataset"] / entry["threat_model"] / f"{entry['entry_id']}.json"


def write_entry(root: Path, entry: dict[str, Any]) -> Path:
    """Validate ``entry`` and write it under ``root``; return its path.

    An invalid entry raises :class:`EntryError` and nothing is written.
    """
    validate_entry(entry)
    path = entry_path(root, entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(entry, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a reader never sees half an entry
    return path


def read_entry(path: Path) -> dict[str, Any]:
    """Read and validate one entry file."""
    try:
        entry = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EntryError(f"{path} is not valid JSON: {err}") from None
    try:
        validate_entry(entry)
    except EntryError as err:
        raise EntryError(f"{path}: {err}") from None
    return entry


def _check_location(path: Path, root: Path, entry: dict[str, Any]) -> None:
    """An entry must be filed where its content says: <dataset>/<threat model>/<id>.json."""
    expected = entry_path(root, entry)
    if Path(path).resolve() != expected.resolve():
        raise EntryError(f"{path} is filed in the wrong place: its content says "
                         f"{expected.relative_to(root)}; move it there")


def iter_entries(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every entry under ``root``, validated and checked to be filed where it says."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"leaderboard folder {str(root)!r} does not exist")
    entries = []
    for path in sorted(root.glob("*/*/*.json")):
        entry = read_entry(path)
        _check_location(path, root, entry)
        entries.append((path, entry))
    return entries


#: What makes two entries measurements of the same thing: one replaces the other only when
#: all of these agree.
_MEASUREMENT_KEYS = (
    ("suite", lambda e: (e.get("suite") or {}).get("sha256")),
    ("eps", lambda e: e.get("eps")),
    ("threat model", lambda e: e.get("threat_model")),
    ("seed", lambda e: e.get("seed")),
    ("examples", lambda e: (e.get("examples") or {}).get("indices_sha256")),
    ("weights", lambda e: e.get("weights_sha256")),
)


def measurement_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between how two entries were measured (suite, eps, seed, examples, ...)."""
    return [name for name, key in _MEASUREMENT_KEYS if key(old) != key(new)]
