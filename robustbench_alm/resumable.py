"""An evaluation cut into units that can be committed, resumed and spread over processes.

    settings = Settings(dataset="fashion-mnist", threat_model="Linf", eps=0.1, suite="quick")
    results = {}                                       # phase -> batch -> payload
    while (step := next_units(settings, n, results)) is not None:
        phase, units = step
        for unit in units:                             # in any order, on any machine
            results.setdefault(phase, {})[unit.batch] = run_unit(model, unit, x, y, settings,
                                                                 results)
    entry, per_example = assemble(settings, results, n=n, ...)

Phases, in order: ``checks`` (the model contract, once), ``clean`` (clean scoring), one phase
``stage:<name>`` per suite stage (a stage that can escalate, ``square-adaptive``, has a second
phase ``stage:<name>:again`` for the revisit, empty unless a batch escalated), and ``margins``.
A phase is a list of units, each a batch of
example positions: clean and margin batches are consecutive chunks of ``batch_size`` points, and
a stage's batches are consecutive chunks of the points still robust after the stages before it.
These are exactly the batches :func:`robustbench_alm.evaluation.run_evaluation` forms, and each
unit's result depends only on the model, its points and the seed (every attack reseeds itself
per batch, as AutoAttack does). So the merged results, and the entry built from them, equal
``run_evaluation``'s, however the units are scheduled, interrupted, repeated or distributed;
only the timing fields (``date``, ``seconds`` and each stage's ``seconds``) differ.

A payload is plain JSON (lists of booleans and floats), so a job store can keep it as text.
Evaluation layer: the job layer above calls it; it knows nothing of stores or executors.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustbench_alm import checks
from robustbench_alm import margins as margin_lib
from robustbench_alm.attacks import Budget, build_attack
from robustbench_alm.entry import validate_entry
from robustbench_alm.evaluation import (BLACK_BOX_KINDS, CHECK_SAMPLE, _attack_batch,
                                        _build_entry, _contract_checks, _Scorer, _stage_record)
from robustbench_alm.suites import Suite, load_suite
from robustbench_alm.threat import Dataset, ThreatModel, check_eps, is_large_eps, parse_eps

__all__ = ["Settings", "Unit", "phases", "next_units", "run_unit", "assemble",
           "TIMING_FIELDS"]

logger = logging.getLogger(__name__)

#: Entry fields that measure time, not robustness: they differ between runs of the same job.
TIMING_FIELDS = ("date", "seconds", "attacks[].seconds")

CHECKS, CLEAN, MARGINS = "checks", "clean", "margins"
_STAGE = "stage:"
_AGAIN = ":again"
#: Stage kinds whose batches may escalate and be revisited (see evaluation._run_stage).
_REVISITED_KINDS = ("square-adaptive",)


@dataclass(frozen=True)
class Settings:
    """What an evaluation measures: everything its numbers depend on, and nothing else.

    ``suite`` is a suite name or a path; a job that runs elsewhere carries the file's text in
    ``suite_text`` and the units read the suite from it.
    """

    dataset: str
    threat_model: str
    eps: float
    suite: str = "standard"
    split: str = "test"
    n_examples: int = 500
    seed: int = 0
    batch_size: int = 250
    margins: bool = True
    margin_steps: int | None = None
    fmn_steps: int | None = None
    delta_scale: str = "input"
    suite_text: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        Dataset.parse(self.dataset)
        tm = ThreatModel.parse(self.threat_model)
        object.__setattr__(self, "threat_model", tm.value)
        object.__setattr__(self, "eps", parse_eps(self.eps))
        check_eps(self.eps, tm)
        if self.split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {self.split!r}")
        for name in ("n_examples", "batch_size", "margin_steps", "fmn_steps"):
            value = getattr(self, name)
            if value is None and name in ("margin_steps", "fmn_steps"):
                continue  # the estimate's own default, as in run_evaluation
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or \
                not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.delta_scale not in ("input", "output"):
            raise ValueError(f"delta_scale must be 'input' or 'output', got "
                             f"{self.delta_scale!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_suite(self) -> Suite:
        """The suite, from its text when the job carries it (so any machine can read it)."""
        if self.suite_text is None:
            return load_suite(self.suite)
        return _suite_from_text(self.suite_text, Path(self.suite).stem)

    @property
    def budget(self) -> Budget:
        return Budget(ThreatModel.parse(self.threat_model), self.eps)


_SUITE_CACHE: dict[str, Suite] = {}


def _suite_from_text(text: str, name: str) -> Suite:
    """A suite parsed from the text of its file (kept in a private folder, by content)."""
    import hashlib
    import tempfile

    digest = hashlib.sha256(text.encode()).hexdigest()
    if digest not in _SUITE_CACHE:
        folder = Path(tempfile.mkdtemp(prefix="rbalm-suite-"))
        path = folder / f"{name}.toml"
        path.write_bytes(text.encode())
        _SUITE_CACHE[digest] = load_suite(path)
    return _SUITE_CACHE[digest]


@dataclass(frozen=True)
class Unit:
    """One batch of one phase: the positions (in the evaluated example list) it covers."""

    phase: str
    batch: int
    positions: tuple[int, ...]


def phases(settings: Settings, suite: Suite | None = None) -> list[str]:
    """The phases of an evaluation, in the order they run."""
    suite = suite or settings.load_suite()
    names = [CHECKS, CLEAN]
    for spec in suite.attacks:
        names.append(_STAGE + spec.name)
        if spec.kind in _REVISITED_KINDS:
            names.append(_STAGE + spec.name + _AGAIN)
    return names + ([MARGINS] if settings.margins else [])


def _spec_of(phase: str, suite: Suite):
    name = phase[len(_STAGE):].removesuffix(_AGAIN)
    return next(s for s in suite.attacks if s.name == name)


def _stage_batch_size(spec, settings: Settings) -> int:
    """A stage's own batch_size (as the attack object takes it), else the evaluation's."""
    return spec.params.get("batch_size") or settings.batch_size


def _chunks(positions: list[int], size: int, phase: str) -> list[Unit]:
    return [Unit(phase, i, tuple(positions[start:start + size]))
            for i, start in enumerate(range(0, len(positions), size))]


def _robust_before(phase_index: int, names: list[str], n: int,
                   results: dict[str, dict[int, dict]]) -> list[bool]:
    """Which points are still robust when phase ``names[phase_index]`` starts."""
    robust = [False] * n
    for payload in results[CLEAN].values():
        for pos, ok in zip(payload["positions"], payload["clean_correct"]):
            robust[pos] = bool(ok)
    for name in names[2:phase_index]:
        for payload in results.get(name, {}).values():
            for pos, broken in zip(payload["positions"], payload["broken"]):
                if broken:
                    robust[pos] = False
    return robust


def units_of(phase: str, settings: Settings, n: int, results: dict[str, dict[int, dict]],
             suite: Suite | None = None) -> list[Unit]:
    """The units of ``phase``; every phase before it must be complete in ``results``."""
    suite = suite or settings.load_suite()
    names = phases(settings, suite)
    if phase == CHECKS:
        return [Unit(CHECKS, 0, tuple(range(min(CHECK_SAMPLE, n))))]
    if phase in (CLEAN, MARGINS):
        return _chunks(list(range(n)), settings.batch_size, phase)
    robust = _robust_before(names.index(phase), names, n, results)
    size = _stage_batch_size(_spec_of(phase, suite), settings)
    if not phase.endswith(_AGAIN):
        return _chunks([i for i, r in enumerate(robust) if r], size, phase)
    # The revisit: the still-robust points of the batches that were only screened, in batch
    # order, when any batch of the pass escalated; nothing otherwise.
    first = results.get(phase.removesuffix(_AGAIN), {})
    if not any(p.get("escalated") for p in first.values()):
        return []
    screened = [pos for _, p in sorted(first.items()) if p.get("provisional")
                for pos in p["positions"] if robust[pos]]
    return _chunks(screened, size, phase)


def next_units(settings: Settings, n: int, results: dict[str, dict[int, dict]],
               suite: Suite | None = None) -> tuple[str, list[Unit]] | None:
    """The first phase with units not yet in ``results``, and all its units; None when done.

    Raises:
        ValueError: when a stored result covers other points than the plan gives its unit
            (results from another evaluation, or a changed suite file).
    """
    for phase in phases(settings, suite):
        units = units_of(phase, settings, n, results, suite)
        done = results.get(phase, {})
        for unit in units:
            if unit.batch in done and tuple(done[unit.batch]["positions"]) != unit.positions:
                raise ValueError(f"stored results of {phase} batch {unit.batch} cover other "
                                 "points than this evaluation gives that batch; they come from "
                                 "another evaluation")
        if any(u.batch not in done for u in units):
            return phase, units
    return None


class _Prepared:
    """The model as the harness attacks and scores it (float32 copy of a half model)."""

    def __init__(self, model: nn.Module):
        model.eval()
        self.model = model
        pair = checks.half_precision_pair(model)
        self.attack_model, self.score_model = pair if pair is not None else (model, model)
        self.flags = {"half-precision"} if pair is not None else set()


_PREPARED: dict[int, tuple[nn.Module, _Prepared]] = {}


def _prepare(model: nn.Module) -> _Prepared:
    key = id(model)
    if key not in _PREPARED or _PREPARED[key][0] is not model:
        _PREPARED.clear()  # one model at a time per process: units of one job follow each other
        _PREPARED[key] = (model, _Prepared(model))
    return _PREPARED[key][1]


def run_unit(model: nn.Module, unit: Unit, x: torch.Tensor, y: torch.Tensor,
             settings: Settings, checked: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one unit on its points ``x``, ``y`` (already cut to ``unit.positions``).

    ``checked`` is the payload of the ``checks`` unit (classes and passes per decision); every
    other phase needs it. Returns the unit's payload: plain JSON.
    """
    if x.shape[0] != len(unit.positions) or y.shape[0] != len(unit.positions):
        raise ValueError(f"unit {unit.phase}/{unit.batch} covers {len(unit.positions)} points, "
                         f"got {x.shape[0]} inputs and {y.shape[0]} labels")
    prepared = _prepare(model)
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    x, y = x.to(device), y.to(device)
    flags: set[str] = set(prepared.flags)
    snapshot = checks.state_snapshot(model)
    t0 = time.time()
    # Attacks and FMN reseed torch's global RNG: keep the caller's untouched.
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        payload = _run_phase(prepared, unit, x, y, settings, checked, flags)
    changed = checks.state_changed(model, snapshot)
    if changed:
        flags.add("model-state-changed")
        logger.warning("unit %s/%d changed %s; restoring them", unit.phase, unit.batch,
                       ", ".join(changed[:5]))
        model.load_state_dict(snapshot)
    payload.update(positions=list(unit.positions), flags=sorted(flags),
                   seconds=time.time() - t0)
    return payload


def _run_phase(prepared: _Prepared, unit: Unit, x, y, settings: Settings, checked,
               flags: set[str]) -> dict[str, Any]:
    if unit.phase == CHECKS:
        y_checked, passes, num_classes = _contract_checks(prepared.score_model, x, y, flags)
        return {"passes": passes, "num_classes": num_classes}
    if checked is None:
        raise ValueError(f"unit {unit.phase}/{unit.batch} needs the result of the checks")
    y = checks.canonical_labels(y, x.shape[0], checked["num_classes"], x.device)
    scorer = _Scorer(prepared.score_model, checked["passes"])
    if unit.phase == CLEAN:
        pred, finite = scorer(x)
        if not finite.all():
            flags.add("non-finite-logits")
        return {"clean_correct": ((pred == y) & finite).cpu().tolist()}
    if unit.phase == MARGINS:
        return _margins_unit(prepared.attack_model, x, y, settings)
    spec = _spec_of(unit.phase, settings.load_suite())
    attack = build_attack(spec, settings.budget, seed=settings.seed, device=x.device)
    attack.configure(checked["num_classes"])
    attack.revisit = unit.phase.endswith(_AGAIN)
    broken = _attack_batch(prepared.attack_model, scorer, attack, x, y, settings.budget,
                           spec.name, flags)
    payload = {"broken": broken.cpu().tolist(),
               "provisional": bool(getattr(attack, "provisional", False)),
               "escalated": bool(getattr(attack, "escalated", False))}
    if hasattr(attack, "record"):
        payload["record"] = attack.record()
    return payload


def _steps(settings: Settings) -> tuple[int, int]:
    """The all-layer search steps and FMN steps, defaulting as run_evaluation does."""
    return (settings.margin_steps or margin_lib.SEARCH_STEPS,
            settings.fmn_steps or margin_lib.FMN_STEPS)


def _margins_unit(model, x, y, settings: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {"all_layer_margin": None}
    alm_steps, fmn_steps = _steps(settings)
    # One call per unit with the unit as one batch: the batches run_evaluation forms.
    size = x.shape[0]
    if getattr(model, "perturbation_points", None):
        alm = margin_lib.all_layer_margin(model, x, y, steps=alm_steps,
                                          scale=settings.delta_scale, batch_size=size,
                                          progress=False)
        out["all_layer_margin"] = [float(v) for v in alm.cpu()]
    dist = margin_lib.input_space_distance(
        model, x, y, threat_model=ThreatModel.parse(settings.threat_model),
        steps=fmn_steps, batch_size=size, seed=settings.seed, progress=False)
    out["input_space_distance"] = [float(v) for v in dist.cpu()]
    return out


def _merge(n: int, payloads: dict[int, dict], key: str, fill: Any) -> list:
    values = [fill] * n
    for payload in payloads.values():
        for pos, value in zip(payload["positions"], payload[key]):
            values[pos] = value
    return values


def assemble(settings: Settings, results: dict[str, dict[int, dict]], *, y: torch.Tensor,
             idx: list[int], how: str, idx_hash: str, architecture: str,
             **meta: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The entry and per-example results from complete ``results``.

    ``meta`` takes :func:`robustbench_alm.evaluation.run_evaluation`'s descriptive keywords
    (``name``, ``entry_id``, ``training``, ``weights_sha256``, ``authors``, ``link``,
    ``venue``, ``footnote``, ``additional_data``). ``seconds`` is the compute time of the
    units, summed (time spent queued, or lost to a crash, is not in it).
    """
    suite = settings.load_suite()
    n = len(idx)
    if next_units(settings, n, results, suite) is not None:
        raise ValueError("the evaluation is not complete: some units have no results")
    tm = ThreatModel.parse(settings.threat_model)
    checked = results[CHECKS][0]
    flags: set[str] = set(checked["flags"])
    for phase_results in results.values():
        for payload in phase_results.values():
            flags.update(payload["flags"])
    if is_large_eps(settings.eps, tm):
        flags.add("large-eps")
    y = checks.canonical_labels(y, n, checked["num_classes"], torch.device("cpu"))

    clean_correct = torch.tensor(_merge(n, results[CLEAN], "clean_correct", False))
    robust = clean_correct.clone()
    per_example: dict[str, torch.Tensor] = {"clean_correct": clean_correct, "label": y.cpu()}
    stages, white_box_ran = [], False
    for spec in suite.attacks:
        payloads = [*results.get(_STAGE + spec.name, {}).values(),
                    *results.get(_STAGE + spec.name + _AGAIN, {}).values()]
        broken = torch.zeros(n, dtype=torch.bool)
        for payload in payloads:
            broken[[p for p, b in zip(payload["positions"], payload["broken"]) if b]] = True
        robust &= ~broken
        attack = build_attack(spec, settings.budget, seed=settings.seed)
        attack.configure(checked["num_classes"])
        seconds = sum(p["seconds"] for p in payloads)
        n_broken = int(broken.sum())
        record = _stage_record(spec, attack, robust, n_broken, seconds, flags)
        record.update(_stage_extras([p["record"] for p in payloads if "record" in p]))
        stages.append(record)
        per_example[f"robust_{spec.name}"] = robust.clone()
        if spec.kind in BLACK_BOX_KINDS and white_box_ran and n_broken:
            flags.add("black-box-beats-white-box")
        white_box_ran |= spec.kind not in BLACK_BOX_KINDS
    per_example["robust"] = robust

    stats: dict[str, Any] = {}
    if settings.margins:
        stats = _margin_summary(settings, results[MARGINS], n, per_example)
    evaluation = {"per_example": per_example, "stages": stages, "margins": stats,
                  "passes": checked["passes"]}
    meta.setdefault("training", None)
    entry = _build_entry(evaluation, flags, idx_hash=idx_hash, model=None,
                         ds=Dataset.parse(settings.dataset), tm=tm, eps=settings.eps,
                         suite=suite, seed=settings.seed, split=settings.split, idx=idx,
                         how=how, output=None, architecture=architecture,
                         **{k: meta.get(k) for k in ("name", "entry_id", "training",
                                                     "weights_sha256")},
                         authors=meta.get("authors", ""), link=meta.get("link", ""),
                         venue=meta.get("venue", ""), footnote=meta.get("footnote"),
                         additional_data=bool(meta.get("additional_data", False)))
    entry["seconds"] = round(sum(p["seconds"] for r in results.values() for p in r.values()),
                             2)
    validate_entry(entry)
    return entry, per_example


def _stage_extras(records: list[dict[str, Any]]) -> dict[str, Any]:
    """A stage's own record fields over its units: counts add up, flags are any-of."""
    out: dict[str, Any] = {}
    for record in records:
        for key, value in record.items():
            if isinstance(value, bool):
                out[key] = out.get(key, False) or value
            else:
                out[key] = out.get(key, 0) + value
    return out


def _margin_summary(settings: Settings, payloads: dict[int, dict], n: int,
                    per_example: dict[str, torch.Tensor]) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    (steps, fmn_steps), scale = _steps(settings), settings.delta_scale
    if all(p["all_layer_margin"] is not None for p in payloads.values()):
        alm = torch.tensor(_merge(n, payloads, "all_layer_margin", math.nan),
                           dtype=torch.float32)
        per_example["all_layer_margin"] = alm
        stats["all_layer"] = margin_lib.summarize(
            alm, f"search ({steps} steps, delta scaled by the {scale} norm)")
    dist = torch.tensor(_merge(n, payloads, "input_space_distance", math.nan),
                        dtype=torch.float32)
    per_example["input_space_distance"] = dist
    stats["input_space"] = margin_lib.summarize(
        dist, f"foolbox FMN ({settings.threat_model}, {fmn_steps} steps)")
    return stats
