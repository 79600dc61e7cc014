"""The evaluation harness: a model and a suite in, a validated leaderboard entry out.

    entry = robustbench_alm.evaluate(model, dataset="fashion-mnist", n_examples=500,
                                     threat_model="Linf", eps=0.1, suite="standard")

Steps: check the inputs, the budget and the model contract (:mod:`robustbench_alm.checks`);
score clean accuracy; run the suite's stages in order, each on the points still robust (as
AutoAttack does), re-scoring every adversarial example with the model itself and checking it
lies within eps and inside [0, 1]; estimate margins; build the entry with the flags raised on the
way (:mod:`robustbench_alm.flags`). Robust accuracy counts every point, so a clean mistake is
never robust. The model is put in eval mode for the evaluation and handed back in the mode, and
with the parameters and buffers, it came in with.

A stochastic model (repeated passes disagree) is scored by a majority over
``RANDOMIZED_PASSES`` forward passes, for clean and adversarial inputs alike.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import logging
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from robustbench_alm import checks
from robustbench_alm import margins as margin_lib
from robustbench_alm.attacks import Budget, build_attack
from robustbench_alm.data import load_dataset
from robustbench_alm.entry import indices_sha256, safe_entry_id, validate_entry
from robustbench_alm.suites import Suite, load_suite
from robustbench_alm.threat import (BOUNDS, Dataset, ThreatModel, check_eps, eps_label,
                                    is_large_eps, parse_eps)

__all__ = ["evaluate", "run_evaluation", "Evaluation", "select_examples"]

logger = logging.getLogger(__name__)

#: Slack for the eps and box checks: float32 rounding of x + delta, not a real violation.
BUDGET_TOLERANCE = 1e-5
#: Forward passes that decide each point of a stochastic model (majority vote).
RANDOMIZED_PASSES = 10
#: Attack kinds that use no gradients; breaking points the gradient stages missed hints masking.
BLACK_BOX_KINDS = ("square", "square-adaptive")
#: Points used for the contract and gradient checks before attacking.
CHECK_SAMPLE = 100


@dataclass
class Evaluation:
    """An entry with the per-example results it was computed from."""

    entry: dict[str, Any]
    per_example: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Index of each evaluated example in its split (0..n-1 for given inputs).
    indices: list[int] = field(default_factory=list)


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


def _read_eps(eps: Any) -> float:
    """eps as a float: a number, a one-element tensor, or text such as "8/255"."""
    if isinstance(eps, torch.Tensor):
        if eps.numel() != 1:
            raise ValueError(f"eps must be one number, got a tensor of shape {tuple(eps.shape)}")
        eps = eps.item()
    return parse_eps(eps)


def _check_settings(model, *, batch_size, seed, margin_steps, fmn_steps, weights_sha256,
                    training) -> None:
    """Refuse bad settings before any attack runs, so no work is lost to a late error."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}; wrap a "
                         "plain function in an nn.Module whose forward calls it")
    for name, value, low in (("batch_size", batch_size, 1), ("margin_steps", margin_steps, 1),
                             ("fmn_steps", fmn_steps, 1)):
        if name != "batch_size" and value is None:  # the estimate's own default
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    if weights_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", str(weights_sha256)):
        raise ValueError(f"weights_sha256 must be 64 lowercase hex digits, got {weights_sha256!r}")
    if training is not None and not (isinstance(training, dict) and "method" in training
                                     and isinstance(training.get("hyperparameters"), dict)):
        raise ValueError("training must be a dict with 'method' and 'hyperparameters', got "
                         f"{training!r}")


def _content_hash(x: torch.Tensor, y: Any) -> str:
    """sha256 of given inputs and labels, so that entries on the same points can be paired."""
    digest = hashlib.sha256(b"given:")
    digest.update(x.detach().cpu().contiguous().numpy().tobytes())
    digest.update(torch.as_tensor(y).detach().cpu().to(torch.int64).numpy().tobytes())
    return digest.hexdigest()


def _check_inputs(x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"inputs must be floating point in [0, 1], got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("inputs contain NaN or infinite values; expected finite values in [0, 1]")
    lo, hi = x.min().item(), x.max().item()
    if lo < BOUNDS[0] - BUDGET_TOLERANCE or hi > BOUNDS[1] + BUDGET_TOLERANCE:
        raise ValueError(
            f"inputs must lie in {list(BOUNDS)}, got values in [{lo:.4g}, {hi:.4g}]; "
            "normalization belongs inside the model, so that eps is measured on the real input"
        )


@dataclass
class _Scorer:
    """Scores inputs with the model under evaluation: predicted class and finiteness.

    ``passes`` > 1 decides each point by the most frequent prediction over that many forward
    passes (a stochastic defense); a point with a non-finite logit in any pass is not finite.
    """

    model: nn.Module
    passes: int = 1

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            votes, finite = [], torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            for _ in range(self.passes):
                logits = self.model(x)
                votes.append(logits.argmax(1))
                finite &= torch.isfinite(logits).all(1)
        pred = votes[0] if self.passes == 1 else torch.stack(votes).mode(dim=0).values
        return pred, finite

    def batched(self, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [self(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
        return torch.cat([p for p, _ in parts]), torch.cat([f for _, f in parts])


def _outside_budget(x_adv: torch.Tensor, x: torch.Tensor, budget: Budget) -> torch.Tensor:
    diff = (x_adv - x).flatten(1)
    dist = diff.abs().max(1).values if budget.threat_model is ThreatModel.LINF \
        else diff.norm(dim=1)
    out_of_box = (x_adv.flatten(1).min(1).values < BOUNDS[0] - BUDGET_TOLERANCE) | \
        (x_adv.flatten(1).max(1).values > BOUNDS[1] + BUDGET_TOLERANCE)
    return (dist > budget.eps + BUDGET_TOLERANCE) | out_of_box | ~torch.isfinite(dist)


def _run_stage(attack_model, scorer, attack, x, y, robust, budget, batch_size, name, progress,
               flags):
    """Attack the still-robust points in batches; return how many this stage broke.

    A stage that marks a batch ``provisional`` (it spent only a screening budget there) and
    ``escalated`` in any batch gets the still-robust points of its provisional batches once
    more, with ``revisit`` set (its full budget). Batches are decided independently, so that a
    job can run them anywhere and in any order; the revisit follows the whole pass.
    """
    batch_size = getattr(attack, "batch_size", None) or batch_size  # a stage may ask for more
    run = (attack_model, scorer, attack, x, y, robust, budget, batch_size, name, progress, flags)
    screened: list[torch.Tensor] = []
    broken = _attack_points(robust.nonzero().squeeze(1), *run, screened=screened)
    if screened and getattr(attack, "escalated", False):
        attack.revisit = True
        again = torch.cat(screened)
        broken += _attack_points(again[robust[again]], *run, desc=f"attack {name} (again)")
    return broken


def _attack_points(idx, attack_model, scorer, attack, x, y, robust, budget, batch_size, name,
                   progress, flags, *, screened=None, desc=None) -> int:
    """Attack the points ``idx`` batch by batch, mark the broken ones; return how many broke."""
    total = 0
    for b in _batches(idx, batch_size, desc or f"attack {name}", progress):
        broken = _attack_batch(attack_model, scorer, attack, x[b], y[b], budget, name, flags)
        robust[b[broken]] = False
        total += int(broken.sum())
        if screened is not None and getattr(attack, "provisional", False):
            screened.append(b)
    return total


def _batches(idx: torch.Tensor, batch_size: int, desc: str, progress: bool):
    starts = range(0, idx.numel(), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        yield idx[start:start + batch_size]


def _attack_batch(attack_model, scorer, attack, x, y, budget, name, flags) -> torch.Tensor:
    """Attack one batch of still-robust points; return which of them the attack broke.

    The unit that :mod:`robustbench_alm.resumable` commits and resumes: its result depends only
    on the model, the points and the attack's seed.
    """
    x_adv = attack(attack_model, x, y)
    outside = _outside_budget(x_adv, x, budget)
    if outside.any():
        flags.add(f"out-of-budget:{name}")
        logger.warning("%s returned %d inputs outside the eps-ball or the box; they do not "
                       "count as broken", name, int(outside.sum()))
    # Re-score with the model itself: an attack's own claim of success is not trusted.
    pred, finite = scorer(x_adv)
    if not (finite | outside).all():
        flags.add("non-finite-logits")
    # An input the attack left unchanged is the clean input, already decided (this keeps
    # eps = 0 exact even for stochastic models, whose votes could flip on a rescore).
    unchanged = (x_adv == x).flatten(1).all(1)
    return ((pred != y) | ~finite) & ~outside & ~unchanged


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("robustbench-alm", "torch", "pyautoattack", "foolbox", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _margin_stats(model, x, y, threat_model, seed, batch_size, margin_steps, fmn_steps, scale,
                  progress, per_example) -> dict[str, Any]:
    """Both margin estimates; a step count of None takes the estimate's own default."""
    stats: dict[str, Any] = {}
    alm_steps = margin_steps or margin_lib.SEARCH_STEPS
    fmn_steps = fmn_steps or margin_lib.FMN_STEPS
    if getattr(model, "perturbation_points", None):
        alm = margin_lib.all_layer_margin(model, x, y, steps=alm_steps, scale=scale,
                                          batch_size=batch_size, progress=progress)
        per_example["all_layer_margin"] = alm
        stats["all_layer"] = margin_lib.summarize(
            alm, f"search ({alm_steps} steps, delta scaled by the {scale} norm)")
    else:
        logger.warning("the model declares no perturbation_points; all-layer margin skipped")
    dist = margin_lib.input_space_distance(model, x, y, threat_model=threat_model,
                                           steps=fmn_steps, batch_size=batch_size,
                                           seed=seed, progress=progress)
    per_example["input_space_distance"] = dist
    stats["input_space"] = margin_lib.summarize(
        dist, f"foolbox FMN ({threat_model.value}, {fmn_steps} steps)")
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
    output: int | str | None = None,
    margins: bool = True,
    margin_steps: int | None = None,
    fmn_steps: int | None = None,
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
    first ``n_examples`` of ``split`` (or ``indices``) of ``dataset`` are used. ``output``
    picks the logits from a forward that returns a tuple (index) or a dict (key).

    Raises:
        ValueError: for bad input (:class:`robustbench_alm.checks.ContractError` when the model
            breaks the contract); the message names what was received and what is accepted.
    """
    t_start = time.time()
    tm = ThreatModel.parse(threat_model)
    eps = _read_eps(eps)
    check_eps(eps, tm)
    ds = Dataset.parse(dataset)
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    suite.check_threat_model(tm)
    _check_settings(model, batch_size=batch_size, seed=seed, margin_steps=margin_steps,
                    fmn_steps=fmn_steps,
                    weights_sha256=weights_sha256, training=training)
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")

    if x is None:
        x, y, idx, how = select_examples(ds.value, split, n_examples, indices, data_dir)
        hash_override = None
    else:
        if y is None:
            raise ValueError("pass the labels y together with the inputs x")
        x = torch.as_tensor(x)
        idx, how = list(range(x.shape[0])), "given"
        # Given points are not the split's first n: identify them by their content.
        hash_override = _content_hash(x, y)
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"need at least one input of shape [N, ...], got shape {tuple(x.shape)}")
    if x.dim() == 4 and tuple(x.shape[1:]) != ds.input_shape:
        raise ValueError(f"inputs of shape {tuple(x.shape[1:])} do not match dataset "
                         f"{ds.value} ({ds.input_shape}); pass the dataset the points come from")
    x = x.to(device)
    _check_inputs(x)

    flags: set[str] = set()
    if is_large_eps(eps, tm):
        flags.add("large-eps")
        logger.warning("Linf eps %g is unusually large for [0, 1] inputs", eps)
    evaluated = checks.OutputSelector(model, output) if output is not None else model
    snapshot = checks.state_snapshot(model)
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        evaluation = _evaluate_in_eval_mode(
            evaluated, x, y, tm, eps, suite, seed, batch_size, margins,
            (margin_steps, fmn_steps), delta_scale, progress, flags)
    finally:
        changed = checks.state_changed(model, snapshot)
        if changed:
            flags.add("model-state-changed")
            logger.warning("the evaluation changed %s; restoring them", ", ".join(changed[:5]))
            model.load_state_dict(snapshot)
        for module, mode in was_training.items():
            module.train(mode)

    if hash_override is not None:
        idx_hash = hash_override
    else:
        idx_hash = indices_sha256(ds.value, split, idx)
    entry = _build_entry(evaluation, flags, idx_hash=idx_hash, model=model, ds=ds, tm=tm,
                         eps=eps, suite=suite,
                         seed=seed, split=split, idx=idx, how=how, output=output, name=name,
                         entry_id=entry_id, architecture=architecture, training=training,
                         weights_sha256=weights_sha256, authors=authors, link=link,
                         venue=venue, footnote=footnote, additional_data=additional_data)
    entry["seconds"] = round(time.time() - t_start, 2)
    validate_entry(entry)
    return Evaluation(entry=entry, per_example=evaluation["per_example"], indices=idx)


def _build_entry(evaluation, flags, *, idx_hash, model, ds, tm, eps, suite, seed, split, idx, how,
                 output, name, entry_id, architecture, training, weights_sha256, authors, link,
                 venue, footnote, additional_data) -> dict[str, Any]:
    per_example = evaluation["per_example"]
    n = len(idx)
    n_correct = int(per_example["clean_correct"].sum())
    n_robust = int(per_example["robust"].sum())
    arch = architecture or type(model).__name__
    name = name or f"{arch} ({suite.name}, seed {seed})"
    entry = {
        "schema_version": 1,
        "entry_id": safe_entry_id(entry_id or name),
        "name": name,
        "authors": authors,
        "link": link,
        "architecture": arch,
        "dataset": ds.value,
        "threat_model": tm.value,
        "eps": float(eps),
        "eps_text": eps_label(eps, tm),
        "clean_acc": 100.0 * n_correct / n,
        "autoattack_acc": None,
        "robust_acc": 100.0 * n_robust / n,
        "n_clean_correct": n_correct,
        # Success rate: broken points over the points there were to break (clean-correct ones).
        "attack_success_rate": (100.0 * (n_correct - n_robust) / n_correct) if n_correct else None,
        "additional_data": bool(additional_data),
        "number_forward_passes": evaluation["passes"],
        "venue": venue,
        "footnote": footnote,
        "suite": {"name": suite.name, "sha256": suite.sha256,
                  "attacks": [a.name for a in suite.attacks]},
        "seed": int(seed),
        "n_examples": n,
        "examples": {"split": split, "selection": how,
                     "indices_sha256": idx_hash},
        "output_selector": output,
        "attacks": evaluation["stages"],
        "margins": evaluation["margins"],
        "training": training,
        "weights_sha256": weights_sha256,
        "versions": _versions(),
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "flags": sorted(flags),
    }
    if suite.name == "standard":
        entry["autoattack_acc"] = entry["robust_acc"]
    return entry


def _contract_checks(model, x, y, flags) -> tuple[torch.Tensor, int, int]:
    """Check the model on a sample; return canonical labels, passes per decision, classes."""
    sample = x[:CHECK_SAMPLE]
    logits = checks.check_forward(model, sample)
    y = checks.canonical_labels(y, x.shape[0], logits.shape[1], x.device)
    passes = 1
    if checks.is_randomized(model, sample):
        flags.add("randomized")
        passes = RANDOMIZED_PASSES
        logger.warning("repeated forward passes disagree: the model is stochastic; each point "
                       "is decided by a majority over %d passes (use --suite rand for EOT)",
                       passes)
    else:
        # Only a deterministic model can be compared across batchings.
        checks.check_batch_independence(model, sample)
    if checks.looks_like_probabilities(logits):
        flags.add("probability-outputs")
        logger.warning("the model's outputs look like probabilities, not logits")
    if checks.zero_gradient_count(model, sample, y[:CHECK_SAMPLE]):
        flags.add("zero-gradients")
        logger.warning("some correctly classified points have an exactly zero input gradient")
    return y, passes, logits.shape[1]


def _evaluate_in_eval_mode(model, x, y, tm, eps, suite, seed, batch_size, margins,
                           steps, delta_scale, progress, flags) -> dict[str, Any]:
    budget = Budget(tm, eps)
    # A half-precision model is attacked through a float32 copy and scored by itself.
    pair = checks.half_precision_pair(model)
    attack_model, score_model = pair if pair is not None else (model, model)
    if pair is not None:
        flags.add("half-precision")
    y, passes, num_classes = _contract_checks(score_model, x, y, flags)
    scorer = _Scorer(score_model, passes)

    pred, finite = scorer.batched(x, batch_size)
    if not finite.all():
        flags.add("non-finite-logits")
    clean_correct = (pred == y) & finite
    robust = clean_correct.clone()
    per_example = {"clean_correct": clean_correct.cpu(), "label": y.cpu()}
    logger.info("clean accuracy: %.2f%% on %d points", 100 * clean_correct.float().mean(),
                x.shape[0])

    stages, white_box_ran = [], False
    # Attacks reseed torch's global RNG (AutoAttack does); keep the caller's RNG untouched.
    with torch.random.fork_rng(devices=[] if x.device.type == "cpu" else [x.device]):
        for spec in suite.attacks:
            t0 = time.time()
            attack = build_attack(spec, budget, seed=seed, device=x.device)
            attack.configure(num_classes)
            broken = _run_stage(attack_model, scorer, attack, x, y, robust, budget, batch_size,
                                spec.name, progress, flags)
            stages.append(_stage_record(spec, attack, robust, broken, time.time() - t0, flags))
            per_example[f"robust_{spec.name}"] = robust.cpu().clone()
            if spec.kind in BLACK_BOX_KINDS and white_box_ran and broken:
                flags.add("black-box-beats-white-box")
                logger.warning("%s broke %d points the gradient attacks missed: possible "
                               "gradient masking", spec.name, broken)
            white_box_ran |= spec.kind not in BLACK_BOX_KINDS
    per_example["robust"] = robust.cpu()

    stats = {}
    if margins:
        # Foolbox's FMN draws from the global RNG too (and seeds it): keep the caller's intact.
        with torch.random.fork_rng(devices=[] if x.device.type == "cpu" else [x.device]):
            stats = _margin_stats(attack_model, x, y, tm, seed, batch_size, *steps,
                                  delta_scale, progress, per_example)
    return {"per_example": per_example, "stages": stages, "margins": stats, "passes": passes}


def _stage_record(spec, attack, robust, broken, seconds, flags) -> dict[str, Any]:
    record = {"name": spec.name, "kind": spec.kind,
              "robust_acc": 100.0 * int(robust.sum()) / robust.numel(),
              "n_broken": broken, "seconds": round(seconds, 2)}
    if getattr(attack, "n_target_classes_used", None) is not None:
        record["n_target_classes"] = attack.n_target_classes_used
    if getattr(attack, "substitute", None):
        record["substitute"] = attack.substitute
        flags.add(f"substitute-loss:{spec.name}")
    if hasattr(attack, "record"):
        record.update(attack.record())
    logger.info("after %s: robust accuracy %.2f%% (%d broken, %.1f s)", spec.name,
                record["robust_acc"], broken, seconds)
    return record


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
