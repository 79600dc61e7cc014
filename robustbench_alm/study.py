"""Studies: train several methods over several seeds, evaluate each model alike, report honestly.

    robustbench-alm study studies/all-layer-margin/study.toml
    robustbench-alm study studies/all-layer-margin/study.toml --set train.epochs=1 --no-sweep

A study is a TOML file (see ``studies/all-layer-margin/study.toml``): one dataset and
architecture, a list of training methods trained at the same budget (every ``[train]`` setting is
shared), a list of seeds, the pairs to compare and the claims to check. For every
(method, seed) the runner

1. trains the model, or reuses its checkpoint in ``runs_dir`` when the model card holds the same
   hyperparameters (so a crash loses at most the model in progress);
2. evaluates it on the first ``n_examples`` test points with the PGD suite (entry filed under the
   study folder's ``entries/``) and with the AutoAttack suite (entry filed in the leaderboard,
   with all-layer margins and input-space minimal distances of the test points); an entry
   already on disk for the same weights, suite, eps and points is reused;
3. estimates the all-layer margin of the first ``margin_train_examples`` training points, and
   writes a record (``models/<entry id>.json``) with every number the report needs.

An optional sweep (``sweep.toml``) trains the AMO methods on one seed over a grid of step sizes
eta and ascent steps t, scored on held-out *training-split* points (validation), never on the
test points. Finally the runner writes ``RESULTS.md``: mean and standard deviation per method,
paired differences with a t interval over seeds and a per-example paired bootstrap and McNemar
test on the pooled points, the plots, the sweep table and a verdict for each claim.

Jobs layer: uses training, evaluation, margins, compare, stats and plots.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import platform
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from robustbench_alm.entry import indices_sha256, read_entry, write_entry
from robustbench_alm.per_example import (build_frame, check_against_entry, examples_path,
                                         read_examples, write_examples)
from robustbench_alm.stats import Interval, mcnemar_exact, paired_bootstrap, t_interval
from robustbench_alm.threat import Dataset, ThreatModel

__all__ = ["StudyConfig", "SweepConfig", "Claim", "load_study_config", "run_study",
           "write_results", "METRICS"]

logger = logging.getLogger(__name__)

#: Per-model metrics in the report: record key -> label. Accuracies in %, margins as estimated.
METRICS = {
    "clean_acc": "clean accuracy (%)",
    "pgd_acc": "PGD robust accuracy (%)",
    "autoattack_acc": "robust accuracy, AutoAttack-suite setting (%)",
    "alm_train_mean": "all-layer margin, train, mean",
    "alm_train_median": "all-layer margin, train, median",
    "alm_test_mean": "all-layer margin, test, mean",
    "alm_test_median": "all-layer margin, test, median",
    "input_distance_median": "input-space distance, test, median",
    "train_seconds": "training time (s)",
}
#: Metrics with per-example 0/1 results, for the pooled paired tests: metric -> (suite, column).
_PER_EXAMPLE = {"clean_acc": ("autoattack", "clean_correct"), "pgd_acc": ("pgd", "robust"),
                "autoattack_acc": ("autoattack", "robust")}
#: Settings that come from the study's top level, not from its [train] table.
_TOP_LEVEL_TRAIN = ("method", "seed", "architecture", "dataset", "device")
_RECORD_VERSION = 1


@dataclass(frozen=True)
class Claim:
    """A claim to check: ``method`` beats ``baseline`` on ``metric`` (higher is better)."""

    text: str
    method: str
    baseline: str
    metric: str


@dataclass(frozen=True)
class SweepConfig:
    """A one-at-a-time sweep of the AMO step size eta and the ascent steps t on one seed."""

    seed: int
    grids: dict[str, dict[str, list]]
    validation_start: int
    validation_examples: int
    suite: str


@dataclass
class StudyConfig:
    """A parsed study file; paths are resolved, every training setting checked."""

    name: str
    description: str
    dataset: str
    architecture: str
    methods: list[str]
    seeds: list[int]
    pairs: list[tuple[str, str]]
    claims: list[Claim]
    train: dict[str, Any]
    evaluation: dict[str, Any]
    entry_prefix: str
    output_dir: Path
    leaderboard_dir: Path
    runs_dir: Path
    device: str = "cpu"
    sweep: SweepConfig | None = None
    source: str = ""
    notes: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    def train_config(self, method: str, seed: int, **changes: Any):
        """The TrainConfig of one model; ``changes`` (the sweep's) go over the [train] table."""
        from robustbench_alm.training import TrainConfig

        settings = {**self.train, **changes}
        return TrainConfig(method=method, seed=seed, architecture=self.architecture,
                           dataset=self.dataset, device=self.device, **settings)

    def entry_id(self, method: str, seed: int) -> str:
        return f"{self.entry_prefix}-{method}-s{seed}"

    @property
    def entries_dir(self) -> Path:
        """Where the PGD-suite entries go (a leaderboard-shaped folder inside the study)."""
        return self.output_dir / "entries"


_EVAL_DEFAULTS = {
    "threat_model": "Linf", "eps": 0.1, "n_examples": 1000, "pgd_suite": "pgd-20",
    "autoattack_suite": "standard", "margin_steps": 100, "fmn_steps": 100,
    "margin_train_examples": 500,
    "batch_size": 250, "seed": 0, "bootstrap": 10_000, "confidence": 0.95, "alpha": 0.05,
}
_TOP_KEYS = {"name", "description", "dataset", "architecture", "methods", "seeds", "pair",
             "claim", "train", "evaluation", "entry_prefix", "output_dir", "leaderboard_dir",
             "runs_dir", "device", "sweep", "notes"}
_SWEEP_KEYS = {"seed", "method", "validation_start", "validation_examples", "suite"}


def _apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Set dotted keys (``train.epochs``) in the parsed TOML, creating tables as needed."""
    for key, value in overrides.items():
        parts = key.split(".")
        table = raw
        for part in parts[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ValueError(f"cannot set {key!r}: {part!r} is not a table")
        table[parts[-1]] = value


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no study file at {str(path)!r}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid TOML: {err}") from None


def _unknown(found, accepted, where: str) -> None:
    extra = sorted(set(found) - set(accepted))
    if extra:
        raise ValueError(f"{where}: unknown keys {extra}; accepted: {sorted(accepted)}")


def _int_list(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError(f"{name} must be a non-empty list of integers >= 0, got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{name} repeats a value: {value!r}")
    return list(value)


def _load_sweep(path: Path, overrides: dict[str, Any], methods: list[str],
                train_subset: int | None) -> SweepConfig:
    raw = _read_toml(path)
    _apply_overrides(raw, overrides)
    _unknown(raw, _SWEEP_KEYS, str(path))
    grids = {}
    for table in raw.get("method", []):
        _unknown(table, {"name", "amo_eta", "amo_steps"}, f"{path} [[method]]")
        name = table.get("name")
        if name not in ("amo", "amo-pgd"):
            raise ValueError(f"{path}: the sweep covers the AMO methods (amo, amo-pgd), got "
                             f"{name!r}")
        if name not in methods:
            raise ValueError(f"{path}: sweep method {name!r} is not among the study's "
                             f"methods {methods}")
        etas = [float(v) for v in table.get("amo_eta", [])]
        if any(not (math.isfinite(v) and v > 0) for v in etas):
            raise ValueError(f"{path}: amo_eta values must be positive numbers, got {etas}")
        grids[name] = {"amo_eta": etas,
                       "amo_steps": _int_list(table.get("amo_steps", [1]), "amo_steps")}
    start = raw.get("validation_start", 50_000)
    count = raw.get("validation_examples", 1000)
    if train_subset is None or start < train_subset:
        raise ValueError(f"{path}: validation points (training split from index {start}) "
                         f"overlap the training subset ({train_subset} points); set "
                         "train.train_subset below validation_start")
    return SweepConfig(seed=int(raw.get("seed", 0)), grids=grids, validation_start=int(start),
                       validation_examples=int(count), suite=str(raw.get("suite", "pgd-20")))


def load_study_config(path: str | Path, overrides: dict[str, Any] | None = None
                      ) -> StudyConfig:
    """Read a study file; ``overrides`` maps dotted keys to values (``sweep.`` keys go to the
    sweep file). Relative paths: ``output_dir`` against the study file's folder (default: that
    folder), ``leaderboard_dir`` and ``runs_dir`` against the working directory.

    Raises:
        ValueError: naming any unknown key, bad method, pair, claim or training setting.
    """
    from robustbench_alm.training import METHODS, TrainConfig

    path = Path(path)
    raw = _read_toml(path)
    overrides = dict(overrides or {})
    sweep_overrides = {k[len("sweep."):]: overrides.pop(k) for k in list(overrides)
                       if k.startswith("sweep.")}
    _apply_overrides(raw, overrides)
    _unknown(raw, _TOP_KEYS, str(path))

    methods = raw.get("methods", [])
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad or len(set(methods)) != len(methods):
        raise ValueError(f"{path}: methods must be distinct names from {list(METHODS)}, got "
                         f"{methods!r}")
    seeds = _int_list(raw.get("seeds", [0]), "seeds")
    pairs = []
    for table in raw.get("pair", []):
        _unknown(table, {"method", "baseline"}, f"{path} [[pair]]")
        pair = (table.get("method"), table.get("baseline"))
        if not all(p in METHODS for p in pair) or pair[0] == pair[1]:
            raise ValueError(f"{path}: pair {pair} must name two different methods from "
                             f"{list(METHODS)}")
        if all(p in methods for p in pair):
            pairs.append(pair)
        else:  # a run of some methods only (--set methods=[...]) leaves this pair out
            logger.warning("pair %s left out: not every method of it is in %s", pair, methods)
    claims = []
    for table in raw.get("claim", []):
        _unknown(table, {"text", "method", "baseline", "metric"}, f"{path} [[claim]]")
        claim = Claim(str(table.get("text", "")), table.get("method"), table.get("baseline"),
                      table.get("metric"))
        if claim.metric not in METRICS:
            raise ValueError(f"{path}: claim metric {claim.metric!r} is not one of "
                             f"{list(METRICS)}")
        if (claim.method, claim.baseline) in pairs:
            claims.append(claim)
        elif claim.method in methods and claim.baseline in methods:
            raise ValueError(f"{path}: claim {claim.text!r} compares {claim.method} with "
                             f"{claim.baseline}, which is not a [[pair]]")

    train = dict(raw.get("train", {}))
    clash = [k for k in train if k in _TOP_LEVEL_TRAIN]
    if clash:
        raise ValueError(f"{path}: {clash} belong at the top level, not in [train]")
    accepted = {f.name for f in dataclasses.fields(TrainConfig)} - set(_TOP_LEVEL_TRAIN)
    _unknown(train, accepted, f"{path} [train]")
    if "milestones" in train:
        train["milestones"] = tuple(train["milestones"])
    evaluation = {**_EVAL_DEFAULTS, **raw.get("evaluation", {})}
    _unknown(evaluation, _EVAL_DEFAULTS, f"{path} [evaluation]")
    ThreatModel.parse(evaluation["threat_model"])
    if not evaluation["pgd_suite"] and not evaluation["autoattack_suite"]:
        raise ValueError(f"{path}: set pgd_suite or autoattack_suite (or both)")

    folder = path.parent
    config = StudyConfig(
        name=str(raw.get("name", path.stem)), description=str(raw.get("description", "")),
        dataset=Dataset.parse(raw.get("dataset", "fashion-mnist")).value,
        architecture=str(raw.get("architecture", "cnn-small")), methods=list(methods),
        seeds=seeds, pairs=pairs, claims=claims, train=train, evaluation=evaluation,
        entry_prefix=str(raw.get("entry_prefix", raw.get("name", path.stem))),
        output_dir=folder / raw.get("output_dir", "."),
        leaderboard_dir=Path(raw.get("leaderboard_dir", "leaderboards")),
        runs_dir=Path(raw.get("runs_dir", f"runs/{raw.get('name', path.stem)}")),
        device=str(raw.get("device", "cpu")), source=_display_path(path),
        notes=str(raw.get("notes", "")),
        raw=raw)
    for method in methods:  # every model's settings are checked before any work starts
        config.train_config(method, seeds[0])
    if raw.get("sweep"):
        config.sweep = _load_sweep(folder / raw["sweep"], sweep_overrides, methods,
                                   train.get("train_subset"))
        for method, grid in config.sweep.grids.items():
            for eta in grid["amo_eta"]:
                config.train_config(method, config.sweep.seed, amo_eta=eta)
    elif sweep_overrides:
        raise ValueError(f"{path} has no sweep file, yet sweep settings were given: "
                         f"{sorted(sweep_overrides)}")
    return config


def _display_path(path: Path) -> str:
    """The study file as the report names it: relative to the working folder, else by name."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.name


# --------------------------------------------------------------------------------------------
# Training and evaluation of one model


def _same_hyperparameters(card: dict[str, Any], cfg) -> bool:
    saved = dict((card.get("training") or {}).get("hyperparameters") or {})
    wanted = json.loads(json.dumps(cfg.to_dict()))
    # The device does not change what is trained; a checkpoint from the GPU is reused on a CPU.
    for key in ("device",):
        saved.pop(key, None)
        wanted.pop(key, None)
    saved.setdefault("max_steps", None)
    return saved == wanted


def _train_or_load(cfg, path: Path, train_data, progress: bool):
    from robustbench_alm.training import load_checkpoint, save_checkpoint, train

    if path.is_file():
        try:
            model, card = load_checkpoint(path, device=cfg.device)
        except ValueError as err:
            logger.warning("cannot reuse %s (%s); training again", path, err)
        else:
            if _same_hyperparameters(card, cfg):
                logger.info("reusing checkpoint %s", path)
                return model, card
            logger.warning("%s was trained with other hyperparameters; training again", path)
    logger.info("training %s, seed %d", cfg.method, cfg.seed)
    model, history = train(cfg, data=train_data(), progress=progress)
    save_checkpoint(model, path, cfg, history)
    return load_checkpoint(path, device=cfg.device)


def _reusable(path: Path, card: dict, suite, n: int, eps: float, dataset: str,
              margins: bool) -> tuple[dict, pd.DataFrame] | None:
    """The entry and rows at ``path`` if they come from this very evaluation."""
    if not path.is_file():
        return None
    try:
        entry = read_entry(path)
        frame = read_examples(examples_path(path), entry)
    except (ValueError, FileNotFoundError) as err:
        logger.warning("not reusing %s: %s", path, err)
        return None
    same = (entry.get("weights_sha256") == card["weights_sha256"]
            and entry["suite"]["sha256"] == suite.sha256 and entry["n_examples"] == n
            and math.isclose(entry["eps"], eps)
            and entry["examples"]["indices_sha256"] == indices_sha256(dataset, "test",
                                                                      range(n))
            and (bool(entry.get("margins")) or not margins))
    return (entry, frame) if same else None


def _evaluate(config: StudyConfig, model, card, suite_name: str, root: Path, entry_id: str,
              name: str, margins: bool, data_dir, progress: bool
              ) -> tuple[dict, pd.DataFrame, Path]:
    from robustbench_alm.evaluation import run_evaluation
    from robustbench_alm.suites import load_suite

    ev = config.evaluation
    suite = load_suite(suite_name)
    target = root / config.dataset / ev["threat_model"] / f"{entry_id}.json"
    reused = _reusable(target, card, suite, ev["n_examples"], ev["eps"], config.dataset,
                       margins)
    if reused is not None:
        logger.info("reusing entry %s", target)
        return reused[0], reused[1], target
    result = run_evaluation(
        model, dataset=config.dataset, split="test", n_examples=ev["n_examples"],
        data_dir=data_dir, threat_model=ev["threat_model"], eps=ev["eps"], suite=suite,
        seed=ev["seed"], batch_size=ev["batch_size"], margins=margins,
        margin_steps=ev["margin_steps"], fmn_steps=ev["fmn_steps"], name=name,
        entry_id=entry_id,
        architecture=card["architecture"], training=card.get("training"),
        weights_sha256=card["weights_sha256"], progress=progress,
        footnote=f"Trained by the study {config.name} ({config.source}).")
    arrays = {k: v.detach().cpu().numpy() for k, v in result.per_example.items()}
    frame = build_frame(arrays, dataset=config.dataset, split="test", indices=result.indices)
    check_against_entry(frame, result.entry)
    path = write_entry(root, result.entry)
    write_examples(examples_path(path), frame)
    return result.entry, frame, path


def _stat(summary: dict | None, key: str) -> float | None:
    return None if not summary else summary.get(key)


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _run_model(config: StudyConfig, method: str, seed: int, train_data, data_dir,
               progress: bool) -> dict[str, Any]:
    from robustbench_alm import margins as margin_lib
    from robustbench_alm.training import file_sha256

    cfg = config.train_config(method, seed)
    entry_id = config.entry_id(method, seed)
    ckpt = config.runs_dir / f"{entry_id}.safetensors"
    record_path = config.output_dir / "models" / f"{entry_id}.json"
    ev = config.evaluation
    settings = {k: ev[k] for k in ("threat_model", "eps", "n_examples", "pgd_suite",
                                   "autoattack_suite", "margin_steps", "fmn_steps",
                                   "margin_train_examples",
                                   "seed")}
    if record_path.is_file() and ckpt.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if (record.get("version") == _RECORD_VERSION and record.get("settings") == settings
                and record.get("weights_sha256") == file_sha256(ckpt)
                and record.get("hyperparameters") == json.loads(json.dumps(cfg.to_dict()))):
            logger.info("%s: done already (%s)", entry_id, record_path)
            return record

    model, card = _train_or_load(cfg, ckpt, train_data, progress)
    name = f"{config.architecture}, {method} (study {config.name}, seed {seed})"
    record: dict[str, Any] = {
        "version": _RECORD_VERSION, "entry_id": entry_id, "method": method, "seed": seed,
        "weights_sha256": card["weights_sha256"], "settings": settings,
        "hyperparameters": json.loads(json.dumps(cfg.to_dict())),
        "train_seconds": (card.get("history") or {}).get("seconds"),
        "history": (card.get("history") or {}).get("epochs", []), "entries": {},
        "eval_seconds": {},
    }
    # The PGD suite first (cheap); AutoAttack second, with the margins of the test points.
    for kind, suite_name, root, margins in (
            ("pgd", ev["pgd_suite"], config.entries_dir, False),
            ("autoattack", ev["autoattack_suite"], config.leaderboard_dir, True)):
        if not suite_name:
            continue
        only_one = not (ev["pgd_suite"] and ev["autoattack_suite"])
        eid = entry_id if kind == "autoattack" else f"{entry_id}-{suite_name}"
        entry, _, path = _evaluate(config, model, card, suite_name, root, eid,
                                   f"{name}, {suite_name}", margins or only_one, data_dir,
                                   progress)
        record["entries"][kind] = _relative(path, config.output_dir)
        record["eval_seconds"][kind] = entry.get("seconds")
        record["clean_acc"] = entry["clean_acc"]
        record[f"{kind}_acc"] = entry["robust_acc"]
        if entry.get("margins"):
            record["alm_test"] = entry["margins"].get("all_layer")
            record["input_distance"] = entry["margins"].get("input_space")

    # The all-layer margin of points the model was trained on.
    k = ev["margin_train_examples"]
    if k:
        t0 = time.time()
        x, y = train_data()
        n = min(k, cfg.train_subset or x.shape[0], x.shape[0])
        x, y = x[:n], y[:n]
        device = next(model.parameters()).device
        alm = margin_lib.all_layer_margin(model, x.to(device), y.to(device),
                                          steps=ev["margin_steps"], batch_size=ev["batch_size"],
                                          progress=progress)
        record["alm_train"] = margin_lib.summarize(
            alm, f"search ({ev['margin_steps']} steps) on the first {x.shape[0]} training points")
        record["eval_seconds"]["alm_train"] = round(time.time() - t0, 2)
    for part in ("alm_train", "alm_test"):
        record[f"{part}_mean"] = _stat(record.get(part), "mean")
        record[f"{part}_median"] = _stat(record.get(part), "median")
    record["input_distance_median"] = _stat(record.get("input_distance"), "median")
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


# --------------------------------------------------------------------------------------------
# The sweep


def _sweep_points(config: StudyConfig) -> list[tuple[str, float, int]]:
    """(method, eta, t) one at a time around the study's defaults, each once."""
    default_eta = config.train.get("amo_eta", 0.002)
    default_t = config.train.get("amo_steps", 1)
    points = []
    for method, grid in config.sweep.grids.items():
        for eta in grid["amo_eta"]:
            points.append((method, eta, default_t))
        for t in grid["amo_steps"]:
            points.append((method, default_eta, t))
    return list(dict.fromkeys(points))


def _run_sweep_point(config: StudyConfig, method: str, eta: float, t: int, train_data,
                     data_dir, progress: bool) -> dict[str, Any]:
    from robustbench_alm import margins as margin_lib
    from robustbench_alm.evaluation import run_evaluation, select_examples
    from robustbench_alm.training import file_sha256

    sweep = config.sweep
    cfg = config.train_config(method, sweep.seed, amo_eta=eta, amo_steps=t)
    default = cfg == config.train_config(method, sweep.seed)
    main_id = config.entry_id(method, sweep.seed)
    # The point at the study's own settings is the study's model when that seed is in it.
    sweep_id = main_id if default and sweep.seed in config.seeds else \
        f"{config.entry_prefix}-sweep-{method}-eta{eta:g}-t{t}-s{sweep.seed}"
    ckpt = config.runs_dir / f"{sweep_id}.safetensors"
    record_path = config.output_dir / "sweep" / f"{method}-eta{eta:g}-t{t}-s{sweep.seed}.json"
    ev = config.evaluation
    indices = list(range(sweep.validation_start,
                         sweep.validation_start + sweep.validation_examples))
    settings = {"suite": sweep.suite, "indices": [indices[0], indices[-1]],
                "eps": ev["eps"], "margin_steps": ev["margin_steps"]}
    if record_path.is_file() and ckpt.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("settings") == settings and record.get("weights_sha256") == \
                file_sha256(ckpt):
            return record

    model, card = _train_or_load(cfg, ckpt, train_data, progress)
    result = run_evaluation(
        model, dataset=config.dataset, split="train", indices=indices, data_dir=data_dir,
        threat_model=ev["threat_model"], eps=ev["eps"], suite=sweep.suite, seed=ev["seed"],
        batch_size=ev["batch_size"], margins=False, entry_id=sweep_id,
        architecture=card["architecture"], training=card.get("training"),
        weights_sha256=card["weights_sha256"], progress=progress)
    x, y, _, _ = select_examples(config.dataset, "train", None, indices, data_dir)
    device = next(model.parameters()).device
    alm = margin_lib.all_layer_margin(model, x.to(device), y.to(device),
                                      steps=ev["margin_steps"], batch_size=ev["batch_size"],
                                      progress=progress)
    summary = margin_lib.summarize(alm, "search on validation points")
    record = {
        "method": method, "amo_eta": eta, "amo_steps": t, "seed": sweep.seed,
        "is_default": default, "checkpoint_id": sweep_id, "settings": settings,
        "weights_sha256": card["weights_sha256"],
        "train_seconds": (card.get("history") or {}).get("seconds"),
        "val_clean_acc": result.entry["clean_acc"], "val_pgd_acc": result.entry["robust_acc"],
        "val_alm_median": summary["median"], "val_alm_mean": summary["mean"],
    }
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


# --------------------------------------------------------------------------------------------
# The whole study


def run_study(config: StudyConfig, *, data_dir: str | Path | None = None, sweep: bool = True,
              results_only: bool = False, progress: bool = True) -> Path:
    """Train and evaluate every (method, seed), run the sweep, write RESULTS.md; its path.

    Seeds run in the outer loop, so a partial run already holds every method of its first
    seeds. With ``results_only`` nothing is trained or evaluated: the report is rewritten
    from the records on disk.
    """
    from robustbench_alm.data import load_dataset

    cache: dict[str, Any] = {}

    def train_data():
        # Loaded once, and only when some model needs training or training-point margins.
        if "train" not in cache:
            cache["train"] = load_dataset(config.dataset, "train", data_dir=data_dir)
        return cache["train"]

    jobs = [(method, seed) for seed in config.seeds for method in config.methods]
    records, sweep_records = [], []
    if results_only:
        records = _read_records(config)
        sweep_records = _read_sweep_records(config) if sweep and config.sweep else []
    else:
        start = time.time()
        for method, seed in tqdm(jobs, desc=f"study {config.name}", disable=not progress,
                                 unit="model"):
            records.append(_run_model(config, method, seed, train_data, data_dir, progress))
            logger.info("%d of %d models done (%.0f s so far)", len(records), len(jobs),
                        time.time() - start)
        if sweep and config.sweep is not None:
            points = _sweep_points(config)
            for method, eta, t in tqdm(points, desc="sweep", disable=not progress,
                                       unit="model"):
                sweep_records.append(_run_sweep_point(config, method, eta, t, train_data,
                                                      data_dir, progress))
    path = write_results(config, records, sweep_records)
    if config.evaluation["autoattack_suite"] and (config.leaderboard_dir / config.dataset).is_dir():
        from robustbench_alm.leaderboard import write_readme

        write_readme(config.leaderboard_dir)
    return path


def _read_records(config: StudyConfig) -> list[dict[str, Any]]:
    records, missing = [], []
    for seed in config.seeds:
        for method in config.methods:
            path = config.output_dir / "models" / f"{config.entry_id(method, seed)}.json"
            if path.is_file():
                records.append(json.loads(path.read_text(encoding="utf-8")))
            else:
                missing.append(path.name)
    if missing:
        raise FileNotFoundError(f"no record for {missing}; run the study without "
                                "--results-only first")
    return records


def _read_sweep_records(config: StudyConfig) -> list[dict[str, Any]]:
    folder = config.output_dir / "sweep"
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]


# --------------------------------------------------------------------------------------------
# The report


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        if value != 0 and abs(value) < 0.1:
            return f"{value:.4f}"
        return f"{value:.{digits}f}"
    return str(value)


def _fmt_metric(key: str, value: Any) -> str:
    """Accuracies with 2 decimals, margins with 4 significant digits, seconds whole."""
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    if "alm" in key or "distance" in key:
        return f"{float(value):.4g}"
    if "seconds" in key:
        return f"{float(value):.0f}"
    return f"{float(value):.2f}"


def _mean_std(values: list[float], key: str) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return "n/a"
    if v.size == 1:
        return _fmt_metric(key, float(v[0]))
    return f"{_fmt_metric(key, float(v.mean()))} ± {_fmt_metric(key, float(v.std(ddof=1)))}"


def _frame_of(config: StudyConfig, record: dict, kind: str) -> pd.DataFrame | None:
    rel = record.get("entries", {}).get(kind)
    if rel is None:
        return None
    path = config.output_dir / rel
    return read_examples(examples_path(path), read_entry(path))


@dataclass
class _PairResult:
    method: str
    baseline: str
    metric: str
    seeds: list[int]
    differences: list[float]
    mean: float | None
    ci: Interval | None
    pooled_diff: float | None = None
    pooled_ci: Interval | None = None
    first_only: int | None = None
    second_only: int | None = None
    p_value: float | None = None
    n_pooled: int | None = None


def _pair_results(config: StudyConfig, table: pd.DataFrame, method: str, baseline: str,
                  metric: str, frames: dict) -> _PairResult:
    ev = config.evaluation
    a = table[table.method == method].set_index("seed")[metric]
    b = table[table.method == baseline].set_index("seed")[metric]
    seeds = sorted(s for s in set(a.index) & set(b.index)
                   if a[s] is not None and b[s] is not None
                   and not (pd.isna(a[s]) or pd.isna(b[s])))
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    mean, ci = (t_interval(diffs, confidence=ev["confidence"]) if diffs else (None, None))
    result = _PairResult(method, baseline, metric, seeds, diffs, mean, ci)
    if metric not in _PER_EXAMPLE:
        return result
    kind, column = _PER_EXAMPLE[metric]
    cols = []
    for s in seeds:
        fa, fb = frames.get((method, s, kind)), frames.get((baseline, s, kind))
        if fa is None or fb is None:
            return result
        fa, fb = fa.sort_values("index"), fb.sort_values("index")
        if not np.array_equal(fa["index"].to_numpy(), fb["index"].to_numpy()):
            raise ValueError(f"{method} and {baseline} (seed {s}) were scored on different "
                             "points; cannot pair them")
        cols.append(np.stack([fa[column].to_numpy(bool), fb[column].to_numpy(bool)], axis=1))
    if not cols:
        return result
    pooled = np.concatenate(cols)  # rows: (seed, test point); columns: method, baseline
    _, diff_ci = paired_bootstrap(pooled, n_bootstrap=ev["bootstrap"],
                                  confidence=ev["confidence"], seed=ev["seed"])
    only_a = int((pooled[:, 0] & ~pooled[:, 1]).sum())
    only_b = int((~pooled[:, 0] & pooled[:, 1]).sum())
    result.pooled_diff = 100.0 * float(pooled[:, 0].mean() - pooled[:, 1].mean())
    result.pooled_ci, result.first_only, result.second_only = diff_ci[(0, 1)], only_a, only_b
    result.p_value, result.n_pooled = mcnemar_exact(only_a, only_b), pooled.shape[0]
    return result


def _claim_verdict(claim: Claim, pair: _PairResult, alpha: float, level: str) -> str:
    if pair.ci is None:
        return f"**not tested**: no seed has both {claim.method} and {claim.baseline}."
    n = len(pair.seeds)
    f = lambda v: _fmt_metric(claim.metric, v)  # noqa: E731
    seed_text = (f"{claim.method} − {claim.baseline} = {f(pair.mean)} on average over {n} "
                 f"seed{'s' if n > 1 else ''} ({level} t interval {f(pair.ci.low)} to "
                 f"{f(pair.ci.high)})")
    pooled = ""
    if pair.p_value is not None:
        pooled = (f"; pooled over the {pair.n_pooled} (seed, point) pairs the difference is "
                  f"{pair.pooled_diff:.2f} points (bootstrap {pair.pooled_ci.low:.2f} to "
                  f"{pair.pooled_ci.high:.2f}), McNemar p = {pair.p_value:.3g}")
    if n < 2:
        return f"**inconclusive**: one seed gives no interval over seeds. {seed_text}{pooled}."
    if pair.ci.low > 0:
        return f"**holds at this scale**: {seed_text}{pooled}."
    if pair.ci.high < 0:
        return f"**does not hold; the opposite holds at this scale**: {seed_text}{pooled}."
    side = "ahead" if pair.mean > 0 else ("behind" if pair.mean < 0 else "level")
    extra = ""
    if pair.p_value is not None and pair.p_value < alpha:
        extra = (" The pooled per-example test does find a difference, but it treats the "
                 "seeds' test points as independent examples and ignores how much a retrained "
                 "model varies; the interval over seeds is the one that answers the claim.")
    return (f"**inconclusive** ({claim.method} is {side} on average, but the interval over "
            f"seeds contains 0): {seed_text}{pooled}.{extra}")


def _budget_text(config: StudyConfig) -> str:
    cfg = config.train_config(config.methods[0], config.seeds[0])
    ev = config.evaluation
    subset = f"the first {cfg.train_subset}" if cfg.train_subset else "all"
    lines = [
        f"- data: {config.dataset}, {subset} training images; evaluation on the first "
        f"{ev['n_examples']} test images",
        f"- architecture: `{config.architecture}`; {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"{cfg.optimizer} lr {cfg.lr:g} ({cfg.lr_schedule}"
        + (f", x{cfg.lr_gamma:g} at {list(cfg.milestones)}" if cfg.milestones else "")
        + f"), weight decay {cfg.weight_decay:g}" + (", crop+flip" if cfg.augment else ""),
        f"- adversary in training (pgd-at, trades, amo-pgd): {cfg.threat_model} eps "
        f"{cfg.eps:g}, PGD-{cfg.pgd_steps} with step {cfg.step_size(cfg.eps):.4g}, "
        + (f"eps ramped up over {cfg.eps_warmup_epochs:g} epoch(s)" if cfg.eps_warmup_epochs
           else "no eps ramp") + f"; TRADES beta {cfg.trades_beta:g}",
        f"- AMO (amo, amo-pgd): t = {cfg.amo_steps} ascent step(s) of eta = {cfg.amo_eta:g} "
        f"on the summed loss, lambda = {cfg.amo_lambda:g}, delta scaled by the layer's "
        f"{cfg.delta_scale} norm",
        f"- seeds: {config.seeds}; every method has the same architecture, epochs, optimizer, "
        "learning rate and PGD steps",
        f"- evaluation: {ev['threat_model']} eps {ev['eps']:g}; suites `{ev['pgd_suite']}` and "
        f"`{ev['autoattack_suite']}`; all-layer margins ({ev['margin_steps']} search steps) on "
        f"the test points and on the first {ev['margin_train_examples']} training points; "
        f"input-space distances by FMN ({ev['fmn_steps']} steps) on the test points",
    ]
    return "\n".join(lines)


def _plots(config: StudyConfig, table: pd.DataFrame, frames: dict) -> list[tuple[str, Path]]:
    from robustbench_alm.plots import (CurveItem, plot_margin_histograms, plot_method_summary,
                                       plot_robustness_curves)

    out = config.output_dir / "plots"
    drawn = []
    metrics = {k: METRICS[k] for k in ("clean_acc", "pgd_acc", "autoattack_acc",
                                       "alm_test_median", "input_distance_median")}
    if plot_method_summary(table, metrics, out / "summary", methods=config.methods,
                           title=f"{config.name}: mean and std over seeds (dots: seeds)"):
        drawn.append(("Every metric per method", out / "summary.png"))
    ev = config.evaluation
    for method, baseline in config.pairs:
        items, hist = [], []
        for m in (method, baseline):
            parts = [frames[(m, s, "autoattack")] for s in config.seeds
                     if (m, s, "autoattack") in frames]
            if not parts:
                continue
            pooled = pd.concat(parts, ignore_index=True)
            acc = float(table[table.method == m]["autoattack_acc"].mean())
            label = f"{m} ({len(parts)} seed{'s' if len(parts) > 1 else ''} pooled)"
            items.append(CurveItem(label, pooled, ev["eps"], acc))
            hist.append((label, pooled))
        stem = out / f"{method}-vs-{baseline}"
        if plot_robustness_curves(items, f"{stem}-robustness-vs-eps",
                                  threat_model=ev["threat_model"],
                                  title=f"{method} against {baseline}: robust accuracy vs eps"):
            drawn.append((f"{method} against {baseline}: robust accuracy against eps (upper "
                          "bound from the minimal distances; dots: the suite at its eps)",
                          Path(f"{stem}-robustness-vs-eps.png")))
        if plot_margin_histograms(hist, f"{stem}-margins", threat_model=ev["threat_model"],
                                  eps=ev["eps"], title=f"{method} against {baseline}: margins"):
            drawn.append((f"{method} against {baseline}: all-layer margins and input-space "
                          "distances of the clean-correct test points",
                          Path(f"{stem}-margins.png")))
    return drawn


def _sweep_section(config: StudyConfig, sweep_records: list[dict]) -> list[str]:
    if not sweep_records:
        return []
    sweep = config.sweep
    lines = ["## Sensitivity of AMO to eta and t (one seed)", "",
             f"Seed {sweep.seed}, the study's training budget, one setting changed at a time. "
             f"Scored on {sweep.validation_examples} held-out *training-split* images (indices "
             f"{sweep.validation_start} to {sweep.validation_start + sweep.validation_examples - 1}"
             f", never trained on), never on the test points; robust accuracy with suite "
             f"`{sweep.suite}`. Single runs: differences of a point or so are within seed noise.",
             "", "| method | eta | t | val. clean % | val. robust % | ALM median | train s | |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(sweep_records, key=lambda r: (r["method"], r["amo_steps"], r["amo_eta"])):
        mark = "study default" if r["is_default"] else ""
        lines.append(f"| {r['method']} | {r['amo_eta']:g} | {r['amo_steps']} | "
                     f"{_fmt(r['val_clean_acc'])} | {_fmt(r['val_pgd_acc'])} | "
                     f"{_fmt_metric('alm', r['val_alm_median'])} | "
                     f"{_fmt_metric('seconds', r['train_seconds'])} | {mark} |")
    lines.append("")
    for method in sorted({r["method"] for r in sweep_records}):
        rows = [r for r in sweep_records if r["method"] == method]
        key = "val_clean_acc" if method == "amo" else "val_pgd_acc"
        best = max(rows, key=lambda r: r[key])
        default = next((r for r in rows if r["is_default"]), None)
        what = "clean" if method == "amo" else "robust"
        text = (f"- {method}: the best validation {what} accuracy is at eta = "
                f"{best['amo_eta']:g}, t = {best['amo_steps']} ({_fmt(best[key])}%)")
        if default is None:
            text += "; the study's default was not part of this sweep."
        elif best is default:
            text += ", which is the study's default."
        else:
            text += (f"; the study's default (eta = {default['amo_eta']:g}, t = "
                     f"{default['amo_steps']}) reaches {_fmt(default[key])}%, "
                     f"{_fmt(best[key] - default[key])} points lower on this single seed. The "
                     "defaults were fixed before this sweep ran and are not re-tuned on it; "
                     "a difference this size on one seed is weak evidence.")
        lines.append(text)
    lines.append("")
    return lines


def write_results(config: StudyConfig, records: list[dict[str, Any]],
                  sweep_records: list[dict[str, Any]] | None = None) -> Path:
    """Write ``RESULTS.md``, ``results.json`` and the plots into the study's output folder."""
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    ev = config.evaluation
    level = f"{ev['confidence']:.0%}"
    table = pd.DataFrame([{"method": r["method"], "seed": r["seed"],
                           **{k: r.get(k) for k in METRICS}} for r in records])
    for key in METRICS:
        table[key] = pd.to_numeric(table[key], errors="coerce") if key in table else np.nan
    frames = {}
    for r in records:
        for kind in ("pgd", "autoattack"):
            frame = _frame_of(config, r, kind)
            if frame is not None:
                frames[(r["method"], r["seed"], kind)] = frame

    aa_label = f"`{ev['autoattack_suite']}` robust %" if ev["autoattack_suite"] else None
    pgd_label = f"`{ev['pgd_suite']}` robust %" if ev["pgd_suite"] else None
    columns = [("clean_acc", "clean %"), ("pgd_acc", pgd_label), ("autoattack_acc", aa_label),
               ("alm_train_median", "ALM train median"), ("alm_test_median", "ALM test median"),
               ("alm_test_mean", "ALM test mean"),
               ("input_distance_median", "input dist. median"), ("train_seconds", "train s")]
    columns = [(k, label) for k, label in columns if label is not None]
    total = sum((r.get("train_seconds") or 0) + sum(v or 0 for v in r["eval_seconds"].values())
                for r in records)
    total += sum(r.get("train_seconds") or 0 for r in (sweep_records or [])
                 if not r.get("is_default"))

    lines = [f"# {config.name}: results", "",
             "Written by `robustbench-alm study " + Path(config.source).as_posix() + "`; do not "
             "edit by hand. " + config.description, "",
             f"{len(records)} models, {total / 60:.1f} minutes of recorded training and "
             f"evaluation (the sweep's retraining included), on {os.cpu_count()} CPU core(s) "
             f"of {platform.machine()} with torch threads as the machine gave them; "
             f"written {_dt.datetime.now(_dt.timezone.utc).date().isoformat()}.", "",
             "## What was run", "", _budget_text(config), ""]
    if config.notes:
        lines += [config.notes.strip(), ""]

    # Claims first: the answer the study exists to give.
    pair_results = {}
    for method, baseline in config.pairs:
        for metric in METRICS:
            if metric in table and table[metric].notna().any():
                pair_results[(method, baseline, metric)] = _pair_results(
                    config, table, method, baseline, metric, frames)
    if config.claims:
        lines += ["## What holds at this scale", "",
                  f"A claim holds when the {level} t interval of the paired difference over "
                  f"seeds lies entirely on the claimed side of 0. With {len(config.seeds)} seeds "
                  "that interval is wide (t quantile "
                  + (f"{_t_text(len(config.seeds), ev['confidence'])}" if len(config.seeds) > 1
                     else "undefined") + "), so small effects come out inconclusive: that is a "
                  "statement about this budget, not a refutation of the paper.", ""]
        for claim in config.claims:
            pair = pair_results.get((claim.method, claim.baseline, claim.metric))
            verdict = _claim_verdict(claim, pair, ev["alpha"], level) if pair else \
                "**not tested**: the metric was not measured."
            lines.append(f"- *{claim.text}* ({METRICS[claim.metric]}): {verdict}")
        lines.append("")

    lines += ["## Per method: mean ± standard deviation over seeds", "",
              "| method | n | " + " | ".join(label for _, label in columns) + " |",
              "|---|---|" + "---|" * len(columns)]
    for method in config.methods:
        rows = table[table.method == method]
        lines.append(f"| {method} | {len(rows)} | " + " | ".join(
            _mean_std([None if pd.isna(v) else float(v) for v in rows[k]], k)
            for k, _ in columns)
            + " |")
    lines += ["", "ALM: all-layer margin (upper bound from the search; input-norm scaling). A "
              "mean is n/a when the search found no flip for some point (then only quantiles "
              "are defined). Accuracies on the first "
              f"{ev['n_examples']} test points.", ""]

    lines += ["## Paired differences (method − baseline, same seed)", "",
              f"Over seeds: mean of the per-seed differences with a {level} Student t "
              "interval (the training-seed noise). Pooled: every (seed, test point) pair of "
              "both models, with a paired bootstrap interval and the exact McNemar test on the "
              "points where exactly one model is right; it measures test-sample noise only and "
              "treats the seeds' points as independent, so it is narrower than it should be.",
              "", f"| pair | metric | seeds | over seeds ({level} t) | pooled ({level} "
              "bootstrap) | only method / only baseline | McNemar p |",
              "|---|---|---|---|---|---|---|"]
    for (method, baseline, metric), pr in pair_results.items():
        if metric == "train_seconds" or pr.mean is None:
            continue
        f = lambda v: _fmt_metric(metric, v)  # noqa: E731
        seed_text = (f"{f(pr.mean)} [{f(pr.ci.low)}, {f(pr.ci.high)}]"
                     if len(pr.seeds) > 1 else f"{f(pr.mean)} (one seed)")
        pooled = counts = p = ""
        if pr.p_value is not None:
            pooled = (f"{pr.pooled_diff:.2f} [{pr.pooled_ci.low:.2f}, "
                      f"{pr.pooled_ci.high:.2f}]")
            counts, p = f"{pr.first_only} / {pr.second_only}", f"{pr.p_value:.3g}"
        lines.append(f"| {method} − {baseline} | {METRICS[metric]} | {len(pr.seeds)} | "
                     f"{seed_text} | {pooled} | {counts} | {p} |")
    lines.append("")

    lines += ["## Every model", "",
              "| entry | method | seed | clean % | PGD % | AutoAttack % | ALM train q10 / q50 / "
              "q90 | ALM test q10 / q50 / q90 | input dist. q50 | train s | eval s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        def q(summary):
            if not summary:
                return "n/a"
            qs = summary.get("quantiles", {})
            return " / ".join(_fmt_metric("alm", qs.get(k)) for k in ("q10", "q50", "q90"))
        link = r["entries"].get("autoattack") or r["entries"].get("pgd")
        lines.append(f"| [{r['entry_id']}]({link}) | {r['method']} | {r['seed']} | "
                     f"{_fmt(r.get('clean_acc'))} | {_fmt(r.get('pgd_acc'))} | "
                     f"{_fmt(r.get('autoattack_acc'))} | {q(r.get('alm_train'))} | "
                     f"{q(r.get('alm_test'))} | "
                     f"{_fmt_metric('distance', r.get('input_distance_median'))} | "
                     f"{_fmt(r.get('train_seconds'), 0)} | "
                     f"{_fmt(sum(v or 0 for v in r['eval_seconds'].values()), 0)} |")
    lines.append("")

    drawn = _plots(config, table, frames)
    if drawn:
        lines += ["## Plots", ""]
        for caption, path in drawn:
            lines += [f"{caption}:", "", f"![{caption}]({_relative(path, out)})", ""]
    lines += _sweep_section(config, sweep_records or [])
    lines += ["## Caveats", "",
              "- Every method used the same budget and the same hyperparameters; none was tuned "
              "for this study, the baselines included. The budget is small (see above), far "
              "from the paper's 200-epoch WideResNet runs.",
              "- Robust accuracies are upper bounds (attacks can miss); margins are upper bounds "
              "from searches (the all-layer margin) and a minimal-norm attack (the input-space "
              "distance).",
              "- The all-layer margin of differently trained networks is compared as the "
              "definition's number; it is invariant to moving weight scale between layers, "
              "not to every reparametrization.", ""]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    summary = {"config": _jsonable(config.raw), "records": records,
               "sweep": sweep_records or []}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s", path)
    return path


def _t_text(n: int, confidence: float) -> str:
    from robustbench_alm.stats import t_quantile

    return f"{t_quantile(0.5 + confidence / 2, n - 1):.2f} at {n - 1} degrees of freedom"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
