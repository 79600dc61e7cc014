"""Paired comparison of entries evaluated on the same examples with the same suite.

    robustbench-alm compare leaderboards/fashion-mnist/Linf/a.json leaderboards/.../b.json

A leaderboard ranks by one number per model; whether a 0.5-point gap is real depends on how many
examples the two models disagree on. This module pairs the per-example results of entries (see
:mod:`robustbench_alm.per_example`) and reports, for robust accuracy:

- each model's accuracy with a bootstrap confidence interval (clean accuracy too);
- for every pair, the difference with a paired bootstrap interval and the exact McNemar test on
  the examples where exactly one of the two is robust, Holm-adjusted when more than one pair is
  tested; the verdict says plainly when a difference is not significant.

Entries are comparable only when the dataset, threat model, eps, suite file (its sha256) and the
example set (split and indices hash) all match; otherwise the comparison is refused, naming what
differs. Leaderboard-and-compare layer: no torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustbench_alm.entry import entry_source, read_entry
from robustbench_alm.per_example import ID_COLUMNS, examples_path, read_examples
from robustbench_alm.stats import Interval, holm, mcnemar_exact, paired_bootstrap

__all__ = ["ModelSummary", "PairComparison", "Comparison", "check_comparable", "compare",
           "load_entries", "format_comparison"]


@dataclass(frozen=True)
class ModelSummary:
    """One entry's accuracies (in %) on the shared examples, with bootstrap intervals."""

    entry_id: str
    name: str
    clean_acc: float
    clean_ci: Interval
    robust_acc: float
    robust_ci: Interval


@dataclass(frozen=True)
class PairComparison:
    """Robust accuracy of ``first`` minus that of ``second``, tested on the paired examples."""

    first: str
    second: str
    first_only: int
    second_only: int
    difference: float
    difference_ci: Interval
    p_value: float
    p_adjusted: float
    significant: bool
    verdict: str


@dataclass(frozen=True)
class Comparison:
    """Everything ``robustbench-alm compare`` reports."""

    dataset: str
    threat_model: str
    eps: float
    eps_text: str
    suite: str
    n_examples: int
    confidence: float
    alpha: float
    n_bootstrap: int
    seed: int
    models: list[ModelSummary]
    pairs: list[PairComparison]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _identity(entry: dict[str, Any]) -> dict[str, Any]:
    """The fields that must agree for two entries to be compared, by readable name."""
    suite, examples = entry["suite"], entry["examples"]
    return {
        "dataset": entry["dataset"],
        "threat model": entry["threat_model"],
        "eps": entry["eps"],
        "suite (name and sha256)": f"{suite['name']} {suite['sha256']}",
        "example split": examples["split"],
        "example set (indices sha256)": examples["indices_sha256"],
    }


def _same(field: str, a: Any, b: Any) -> bool:
    if field == "eps":
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def check_comparable(entries: list[dict[str, Any]]) -> None:
    """Raise ValueError naming every field in which the entries differ, or why one cannot be used.

    Refused: fewer than two entries, an entry given twice, a reported (not re-evaluated) entry,
    and entries that differ in dataset, threat model, eps, suite hash or example set.
    """
    if len(entries) < 2:
        raise ValueError(f"compare needs at least two entries, got {len(entries)}")
    ids = [e["entry_id"] for e in entries]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"entry {repeated[0]!r} is given more than once")
    for entry in entries:
        if entry_source(entry) != "evaluated":
            raise ValueError(f"entry {entry['entry_id']!r} is {entry_source(entry)}, not "
                             "evaluated here: it has no per-example results to pair")

    first, identities = entries[0], [_identity(e) for e in entries]
    problems = []
    for field, value in identities[0].items():
        for entry, identity in zip(entries[1:], identities[1:]):
            if not _same(field, value, identity[field]):
                problems.append(f"  {field}: {first['entry_id']} has {value!r}, "
                                f"{entry['entry_id']} has {identity[field]!r}")
    if problems:
        raise ValueError("cannot compare entries that were not evaluated alike; they differ "
                         "in\n" + "\n".join(problems))


def load_entries(paths: list[str | Path]) -> tuple[list[dict[str, Any]], list[pd.DataFrame]]:
    """Read entries and their per-example results (each file checked against its entry)."""
    entries = [read_entry(Path(p)) for p in paths]
    check_comparable(entries)
    frames = [read_examples(examples_path(p), entry) for p, entry in zip(paths, entries)]
    return entries, frames


def _paired_columns(entries, frames) -> tuple[np.ndarray, np.ndarray]:
    """Clean and robust correctness as (n_examples, n_models) arrays, rows aligned by example."""
    ordered = [f.sort_values(list(ID_COLUMNS), ignore_index=True) for f in frames]
    reference = ordered[0]
    for entry, frame in zip(entries[1:], ordered[1:]):
        if not frame[list(ID_COLUMNS)].equals(reference[list(ID_COLUMNS)]):
            raise ValueError(f"the per-example results of {entry['entry_id']!r} are not on "
                             f"the same examples as those of {entries[0]['entry_id']!r}")
        mismatched = int((frame["label"] != reference["label"]).sum())
        if mismatched:
            raise ValueError(f"{entry['entry_id']!r} and {entries[0]['entry_id']!r} record "
                             f"different labels for {mismatched} of the same examples")
    clean = np.stack([f["clean_correct"].to_numpy(bool) for f in ordered], axis=1)
    robust = np.stack([f["robust"].to_numpy(bool) for f in ordered], axis=1)
    return clean, robust


def _verdict(pair: dict[str, Any], alpha: float, confidence: float, adjusted: bool) -> str:
    """One sentence: who is more robust, by how much, and how sure; or that it is not shown."""
    significant = pair["p_adjusted"] < alpha
    ci = pair["difference_ci"]
    # Said from the side of the more robust model, so the gap reads as a positive number.
    names, diff = (pair["first"], pair["second"]), pair["difference"]
    counts, low, high = (pair["first_only"], pair["second_only"]), ci.low, ci.high
    if diff < 0:
        names, diff, counts, low, high = names[::-1], -diff, counts[::-1], -ci.high, -ci.low
    p_text = f"McNemar p = {pair['p_value']:.3g}" + (
        f", Holm-adjusted {pair['p_adjusted']:.3g}" if adjusted else "")
    detail = (f"by {diff:.2f} points ({confidence:.0%} CI {low:+.2f} to {high:+.2f}); robust "
              f"only under {names[0]}: {counts[0]} examples, only under {names[1]}: "
              f"{counts[1]}; {p_text}")
    if significant:
        text = f"{names[0]} is more robust than {names[1]} {detail}"
    elif diff == 0:
        text = (f"no difference: {names[0]} and {names[1]} are equally robust on these "
                f"examples ({confidence:.0%} CI {low:+.2f} to {high:+.2f}; {p_text})")
    else:
        text = (f"not significant at the {alpha:.0%} level: {names[0]} is ahead of {names[1]} "
                f"{detail}; this gap does not show that either model is more robust")
    # With few disagreements the percentile interval is too narrow; the exact test is not.
    if significant == (low <= 0.0 <= high):
        text += ("; the bootstrap interval and the exact test disagree, as they can with few "
                 "disagreements: trust the exact test")
    return text


def compare(entries: list[dict[str, Any]], frames: list[pd.DataFrame], *,
            n_bootstrap: int = 10_000, confidence: float = 0.95, alpha: float = 0.05,
            seed: int = 0) -> Comparison:
    """Compare the robust accuracy of entries on their shared examples.

    Args:
        entries: validated entries, evaluated here, all alike (see :func:`check_comparable`).
        frames: their per-example results, in the same order.
        n_bootstrap, confidence, seed: the bootstrap's resamples, interval coverage and seed.
        alpha: significance level of the verdicts (applied to Holm-adjusted p-values).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")
    if len(frames) != len(entries):
        raise ValueError(f"got {len(entries)} entries but {len(frames)} per-example tables")
    check_comparable(entries)
    clean, robust = _paired_columns(entries, frames)
    clean_ci, _ = paired_bootstrap(clean, n_bootstrap=n_bootstrap, confidence=confidence,
                                   seed=seed)
    robust_ci, diff_ci = paired_bootstrap(robust, n_bootstrap=n_bootstrap,
                                          confidence=confidence, seed=seed)

    models = [ModelSummary(e["entry_id"], e["name"], 100.0 * float(clean[:, j].mean()),
                           clean_ci[j], 100.0 * float(robust[:, j].mean()), robust_ci[j])
              for j, e in enumerate(entries)]
    raw = []
    for (i, j), interval in diff_ci.items():
        b = int((robust[:, i] & ~robust[:, j]).sum())
        c = int((~robust[:, i] & robust[:, j]).sum())
        raw.append({"first": entries[i]["entry_id"], "second": entries[j]["entry_id"],
                    "first_only": b, "second_only": c,
                    "difference": models[i].robust_acc - models[j].robust_acc,
                    "difference_ci": interval, "p_value": mcnemar_exact(b, c)})
    for pair, p_adj in zip(raw, holm([p["p_value"] for p in raw])):
        pair["p_adjusted"] = p_adj
        pair["significant"] = p_adj < alpha
        pair["verdict"] = _verdict(pair, alpha, confidence, adjusted=len(raw) > 1)

    first = entries[0]
    return Comparison(
        dataset=first["dataset"], threat_model=first["threat_model"], eps=first["eps"],
        eps_text=first["eps_text"], suite=first["suite"]["name"], n_examples=clean.shape[0],
        confidence=confidence, alpha=alpha, n_bootstrap=n_bootstrap, seed=seed,
        models=models, pairs=[PairComparison(**p) for p in raw])


def format_comparison(result: Comparison) -> str:
    """The comparison as plain text: a table of accuracies, then one verdict per pair."""
    level = f"{result.confidence:.0%}"
    lines = [f"{result.dataset}, {result.threat_model} eps {result.eps:g} ({result.eps_text}), "
             f"suite {result.suite}, {result.n_examples} paired examples; {level} bootstrap "
             f"intervals from {result.n_bootstrap} resamples (seed {result.seed})", ""]
    width = max(len(m.entry_id) for m in result.models)
    lines.append(f"{'entry':<{width}}  {'clean %':>7}  {level + ' CI':>15}  {'robust %':>8}  "
                 f"{level + ' CI':>15}")
    for m in result.models:
        lines.append(f"{m.entry_id:<{width}}  {m.clean_acc:7.2f}  "
                     f"[{m.clean_ci.low:6.2f}, {m.clean_ci.high:6.2f}]  {m.robust_acc:8.2f}  "
                     f"[{m.robust_ci.low:6.2f}, {m.robust_ci.high:6.2f}]")
    lines.append("")
    lines += [f"- {pair.verdict}" for pair in result.pairs]
    return "\n".join(lines)
