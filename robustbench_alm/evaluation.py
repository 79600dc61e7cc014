"""The evaluation harness: a model and a suite in, a validated leaderboard entry out.

    entry = robustbench_alm.evaluate(model, dataset="fashion-mnist", n_examples=500,
                                     threat_model="Linf", eps=0.1, suite="standard")

Steps: check the inputs and the budget; score clean accuracy; run the suite's stages in order,
each on the points still robust (as AutoAttack does), re-scoring every adversarial example with
the model itself and checking it lies within eps and inside [0, 1]; estimate margins; build the
entry. Robust accuracy counts every point, so a clean mistake is never robust. The model is put
in eval mode for the evaluation and handed back in the mode it came in.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from robustbench_alm import margins as margin_lib
from robustbench_alm.attacks import Budget, build_attack
from robustbench_alm.data import load_dataset
from robustbench_alm.entry import safe_entry_id, validate_entry
from robustbench_alm.suites import Suite, load_suite
from robustbench_alm.threat import BOUNDS, Dataset, ThreatModel, check_eps, eps_text

__all__ = ["evaluate", "run_evaluation", "Evaluation", "select_examples"]

logger = logging.getLogger(__name__)

#: Slack for the eps and box checks: float32 rounding of x + delta, not a real violation.
BUDGET_TOLERANCE = 1e-5


@dataclass
class Evaluation:
    """An entry with the per-example results it was computed from."""

    entry: dict[str, Any]
    per_example: dict[str, torch.Tensor] = field(default_factory=dict)


def select_examples(dataset: str, split: str, n_examples: int | None,
                    indices: list[int] | None = None, data_dir: str | Path | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, list[int], str]:
    """The evaluation points: the first ``n_examples`` of the split, or the given ``indices``.

    Returns:
        x, y, the indices used, and how they were chosen (``"first-n"`` or ``"indices"``).
    """
    x_all, y_all = load_dataset(dataset, split, data_dir=data_dir)
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < x_all.shape[0]]
        if bad:
            raise ValueError(f"example indices {bad[:5]} are outside the {split} split of "
                             f"{dataset} (0..{x_all.shape[0] - 1})")
        idx, how = list(indices), "indices"
    else:
        if n_examples is None or not 1 <= n_examples <= x_all.shape[0]:
            raise ValueError(f"n_examples must be between 1 and {x_all.shape[0]} for the "
                             f"{split} split of {dataset}, got {n_examples!r}")
        idx, how = list(range(n_examples)), "first-n"
    index = torch.tensor(idx, dtype=torch.long)
    return x_all[index], y_all[index], idx, how


def _indices_hash(dataset: str, split: str, idx: list[int]) -> str:
    text = f"{dataset}:{split}:" + ",".join(map(str, idx))
    return hashlib.sha256(text.encode()).hexdigest()


def _canonical_labels(y: torch.Tensor, n: int, num_classes: int, device) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y)
    if y.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor of class indices, got shape "
                         f"{tuple(y.shape)} (one-hot labels: pass y.argmax(1))")
    if y.shape[0] != n:
        raise ValueError(f"got {n} inputs but {y.shape[0]} labels")
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise ValueError("labels must be integer class indices, got non-integer floats")
    y = y.to(device=device, dtype=torch.int64)
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1} for a model with "
                         f"{num_classes} outputs, got values {y.min().item()}..{y.max().item()}")
    return y


def _check_inputs(x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"inputs must be floating point in [0, 1], got dtype {x.dtype}")
    lo, hi = x.min().item(), x.max().item()
    if lo < BOUNDS[0] - BUDGET_TOLERANCE or hi > BOUNDS[1] + BUDGET_TOLERANCE:
        raise ValueError(
            f"inputs must lie in {list(BOUNDS)}, got values in [{lo:.4g}, {hi:.4g}]; "
            "normalization belongs inside the model, so that eps is measured on the real input"
        )


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def _outside_budget(x_adv: torch.Tensor, x: torch.Tensor, budget: Budget) -> torch.Tensor:
    diff = (x_adv - x).flatten(1)
    dist = diff.abs().max(1).values if budget.threat_model is ThreatModel.LINF \
        else diff.norm(dim=1)
    out_of_box = (x_adv.flatten(1).min(1).values < BOUNDS[0] - BUDGET_TOLERANCE) | \
        (x_adv.flatten(1).max(1).values > BOUNDS[1] + BUDGET_TOLERANCE)
    return (dist > budget.eps + BUDGET_TOLERANCE) | out_of_box | ~torch.isfinite(dist)


def _run_stage(model, attack, x, y, robust, budget, batch_size, name, progress, flags):
    """Attack the still-robust points in batches; return how many this stage broke."""
    idx = robust.nonzero().squeeze(1)
    broken_total = 0
    batches = range(0, idx.numel(), batch_size)
    for start in tqdm(batches, desc=f"attack {name}", disable=not progress, leave=False):
        b = idx[start:start + batch_size]
        x_adv = attack(model, x[b], y[b])
        with torch.no_grad():
            logits = model(x_adv)
        outside = _outside_budget(x_adv, x[b], budget)
        if outside.any():
            flags.add(f"out-of-budget:{name}")
            logger.warning("%s returned %d inputs outside the eps-ball or the box; they do not "
                           "count as broken", name, int(outside.sum()))
        finite = torch.isfinite(logits).all(dim=1)
        broken = ((logits.argmax(1) != y[b]) | ~finite) & ~outside
        robust[b[broken]] = False
        broken_total += int(broken.sum())
    return broken_total


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("robustbench-alm", "torch", "pyautoattack", "foolbox", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _margin_stats(model, x, y, threat_model, seed, batch_size, margin_steps, scale,
                  progress, per_example) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    if getattr(model, "perturbation_points", None):
        alm = margin_lib.all_layer_margin(model, x, y, steps=margin_steps, scale=scale,
                                          batch_size=batch_size, progress=progress)
        per_example["all_layer_margin"] = alm
        stats["all_layer"] = margin_lib.summarize(
            alm, f"search ({margin_steps} steps, delta scaled by the {scale} norm)")
    else:
        logger.warning("the model declares no perturbation_points; all-layer margin skipped")
    dist = margin_lib.input_space_distance(model, x, y, threat_model=threat_model,
                                           steps=margin_steps, batch_size=batch_size,
                                           seed=seed, progress=progress)
    per_example["input_space_distance"] = dist
    stats["input_space"] = margin_lib.summarize(
        dist, f"foolbox FMN ({threat_model.value}, {margin_steps} steps)")
    return stats


def run_evaluation(
    model: nn.Module,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    *,
    dataset: str = "fashion-mnist",
    split: str = "test",
    n_examples: int | None = 500,
    indices: list[int] | None = None,
    data_dir: str | Path | None = None,
    threat_model: str = "Linf",
    eps: float,
    suite: str | Suite = "standard",
    seed: int = 0,
    batch_size: int = 250,
    margins: bool = True,
    margin_steps: int = 100,
    delta_scale: str = "input",
    name: str | None = None,
    entry_id: str | None = None,
    architecture: str | None = None,
    training: dict[str, Any] | None = None,
    weights_sha256: str | None = None,
    authors: str = "",
    link: str = "",
    venue: str = "",
    footnote: str | None = None,
    additional_data: bool = False,
    progress: bool = True,
) -> Evaluation:
    """Evaluate ``model`` and return the entry with its per-example results.

    Give ``x`` and ``y`` to evaluate your own points (recorded as ``"given"``); otherwise the
    first ``n_examples`` of ``split`` (or ``indices``) of ``dataset`` are used.
    """
    t_start = time.time()
    tm = ThreatModel.parse(threat_model)
    check_eps(eps, tm)
    ds = Dataset.parse(dataset)
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    suite.check_threat_model(tm)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device if any(True for _ in model.parameters()) \
        else torch.device("cpu")

    if x is None:
        x, y, idx, how = select_examples(ds.value, split, n_examples, indices, data_dir)
    else:
        if y is None:
            raise ValueError("pass the labels y together with the inputs x")
        idx, how = list(range(x.shape[0])), "given"
    x = x.to(device)
    _check_inputs(x)

    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        clean_logits = _predict(model, x, batch_size)
        y = _canonical_labels(y, x.shape[0], clean_logits.shape[1], device)
        evaluation = _evaluate_in_eval_mode(
            model, x, y, clean_logits, tm, eps, suite, seed, batch_size, margins,
            margin_steps, delta_scale, progress)
    finally:
        for module, mode in was_training.items():
            module.train(mode)

    n = x.shape[0]
    per_example = evaluation["per_example"]
    name = name or f"{architecture or type(model).__name__} ({suite.name}, seed {seed})"
    entry = {
        "schema_version": 1,
        "entry_id": safe_entry_id(entry_id or name),
        "name": name,
        "authors": authors,
        "link": link,
        "architecture": architecture or type(model).__name__,
        "dataset": ds.value,
        "threat_model": tm.value,
        "eps": float(eps),
        "eps_text": eps_text(eps),
        "clean_acc": 100.0 * float(per_example["clean_correct"].float().mean()),
        "autoattack_acc": None,
        "robust_acc": 100.0 * float(per_example["robust"].float().mean()),
        "additional_data": bool(additional_data),
        "number_forward_passes": 1,
        "venue": venue,
        "footnote": footnote,
        "suite": {"name": suite.name, "sha256": suite.sha256,
                  "attacks": [a.name for a in suite.attacks]},
        "seed": int(seed),
        "n_examples": n,
        "examples": {"split": split, "selection": how,
                     "indices_sha256": _indices_hash(ds.value, split, idx)},
        "attacks": evaluation["stages"],
        "margins": evaluation["margins"],
        "training": training,
        "weights_sha256": weights_sha256,
        "versions": _versions(),
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "seconds": round(time.time() - t_start, 2),
        "flags": sorted(evaluation["flags"]),
    }
    if suite.name == "standard" and tm in (ThreatModel.LINF, ThreatModel.L2):
        entry["autoattack_acc"] = entry["robust_acc"]
    validate_entry(entry)
    return Evaluation(entry=entry, per_example=per_example)


def _evaluate_in_eval_mode(model, x, y, clean_logits, tm, eps, suite, seed, batch_size,
                           margins, margin_steps, delta_scale, progress) -> dict[str, Any]:
    budget = Budget(tm, eps)
    clean_correct = (clean_logits.argmax(1) == y) & torch.isfinite(clean_logits).all(1)
    robust = clean_correct.clone()
    n, flags, stages = x.shape[0], set(), []
    logger.info("clean accuracy: %.2f%% on %d points", 100 * clean_correct.float().mean(), n)

    # Attacks reseed torch's global RNG (AutoAttack does); keep the caller's RNG untouched.
    with torch.random.fork_rng(devices=[] if x.device.type == "cpu" else [x.device]):
        for spec in suite.attacks:
            t0 = time.time()
            attack = build_attack(spec, budget, seed=seed, device=x.device)
            broken = _run_stage(model, attack, x, y, robust, budget, batch_size, spec.name,
                                progress, flags)
            stages.append({"name": spec.name, "robust_acc": 100.0 * float(robust.float().mean()),
                           "n_broken": broken, "seconds": round(time.time() - t0, 2)})
            logger.info("after %s: robust accuracy %.2f%% (%d broken, %.1f s)", spec.name,
                        stages[-1]["robust_acc"], broken, stages[-1]["seconds"])

    per_example = {"clean_correct": clean_correct.cpu(), "robust": robust.cpu(),
                   "label": y.cpu()}
    stats = {}
    if margins:
        stats = _margin_stats(model, x, y, tm, seed, batch_size, margin_steps, delta_scale,
                              progress, per_example)
    return {"per_example": per_example, "stages": stages, "margins": stats, "flags": flags}


def evaluate(model: nn.Module, x: torch.Tensor | None = None, y: torch.Tensor | None = None,
             **kwargs: Any) -> dict[str, Any]:
    """Evaluate ``model`` and return its validated leaderboard entry.

    Takes the keyword arguments of :func:`run_evaluation`; ``eps`` is required.

    Example:
        >>> entry = evaluate(model, dataset="fashion-mnist", n_examples=500, eps=0.1,
        ...                  suite="standard")  # doctest: +SKIP
        >>> entry["clean_acc"], entry["autoattack_acc"]  # doctest: +SKIP
    """
    return run_evaluation(model, x, y, **kwargs).entry
