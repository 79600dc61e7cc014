"""Paired statistics for accuracies measured on the same examples.

- :func:`mcnemar_exact`: the exact McNemar test. Two classifiers scored on the same points differ
  only on the points where exactly one of them is right; under "equally accurate", each such
  point is a fair coin, so the count ``b`` (A right, B wrong) is Binomial(b + c, 1/2). The
  two-sided p-value doubles the smaller tail, computed in exact rational arithmetic.
- :func:`paired_bootstrap`: percentile confidence intervals for every accuracy and every pairwise
  difference, resampling examples (rows) with replacement, all models together so the pairing is
  kept. Resampling n rows is the same as drawing multinomial counts over the distinct rows, which
  is what it does: memory grows with the number of distinct correctness patterns, not with n.
- :func:`holm`: Holm's step-down adjustment when several pairs are tested at once.

Plain numpy; no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

__all__ = ["Interval", "mcnemar_exact", "paired_bootstrap", "holm"]


@dataclass(frozen=True)
class Interval:
    """A confidence interval, in the unit of the estimate (here percentage points)."""

    low: float
    high: float

    def __contains__(self, value: float) -> bool:
        return self.low <= value <= self.high


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs.

    ``p = min(1, 2 * P[X <= min(b, c)])`` with ``X ~ Binomial(b + c, 1/2)``; 1 when there are no
    discordant pairs at all.

    >>> mcnemar_exact(3, 12)   # 2 * (1 + 15 + 105 + 455) / 2**15
    0.03515625
    """
    for name, value in (("b", b), ("c", c)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a count (an integer >= 0), got {value!r}")
    n, k = int(b) + int(c), min(int(b), int(c))
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2 ** n)))


def _check_level(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")


def paired_bootstrap(correct: np.ndarray, *, n_bootstrap: int = 10_000,
                     confidence: float = 0.95, seed: int = 0
                     ) -> tuple[list[Interval], dict[tuple[int, int], Interval]]:
    """Percentile bootstrap intervals for accuracies (in %) and their pairwise differences.

    Args:
        correct: boolean array of shape (n_examples, n_models), one column per model, rows
            paired (the same example in every column).
        n_bootstrap: number of resamples.
        confidence: coverage of each interval, e.g. 0.95.
        seed: seed of the resampling, so that a comparison is reproducible.

    Returns:
        One interval per model, and for each pair ``(i, j)`` with ``i < j`` the interval of
        ``accuracy_i - accuracy_j`` in percentage points.
    """
    correct = np.asarray(correct)
    if correct.ndim != 2 or correct.dtype != np.bool_ or correct.shape[0] == 0:
        raise ValueError(f"correct must be a non-empty boolean (n_examples, n_models) array, "
                         f"got shape {correct.shape} and dtype {correct.dtype}")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap!r}")
    _check_level(confidence)

    # Resampling rows = multinomial counts over the distinct rows, weighted by how often each
    # occurs. patterns: (n_patterns, n_models); draws: (n_bootstrap, n_patterns).
    n = correct.shape[0]
    patterns, counts = np.unique(correct, axis=0, return_counts=True)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, counts / n, size=n_bootstrap)
    accuracies = 100.0 * (draws @ patterns.astype(np.float64)) / n  # (n_bootstrap, n_models)

    tails = [50 * (1 - confidence), 100 - 50 * (1 - confidence)]

    def interval(samples: np.ndarray) -> Interval:
        low, high = np.percentile(samples, tails)
        return Interval(float(low), float(high))

    per_model = [interval(accuracies[:, j]) for j in range(correct.shape[1])]
    pairs = {(i, j): interval(accuracies[:, i] - accuracies[:, j])
             for i in range(correct.shape[1]) for j in range(i + 1, correct.shape[1])}
    return per_model, pairs


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values (step-down, monotone, capped at 1), in the input order."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
