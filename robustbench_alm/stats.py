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
- :func:`t_interval`: the Student t interval of a mean from a few independent values (paired
  differences over training seeds), with :func:`t_quantile` computed here from the regularized
  incomplete beta function, so no SciPy is needed.

Plain numpy; no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

__all__ = ["Interval", "mcnemar_exact", "paired_bootstrap", "holm", "t_quantile",
           "t_interval"]


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


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta (modified Lentz evaluation)."""
    tiny, value = 1e-300, 1.0
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    value = d
    for m in range(1, 500):
        # Two terms per m: the even one, then the odd one.
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            value *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return value


def _regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # The fraction converges fast on the side of the mean; use the symmetry on the other.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _incomplete_beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_fraction(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF).

    >>> round(t_quantile(0.975, 2), 4)
    4.3027
    """
    if not 0 < p < 1:
        raise ValueError(f"p must lie strictly between 0 and 1, got {p!r}")
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive, got {df!r}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if _t_cdf(mid, df) < p else (low, mid)
    return 0.5 * (low + high)


def t_interval(values, *, confidence: float = 0.95) -> tuple[float, Interval]:
    """Mean of independent ``values`` and its Student t confidence interval.

    With one value the interval is unbounded (-inf, inf): one seed says nothing of the spread.
    """
    _check_level(confidence)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0 or not np.isfinite(v).all():
        raise ValueError(f"t_interval needs one or more finite values, got {v.tolist()}")
    mean = float(v.mean())
    if v.size == 1:
        return mean, Interval(-math.inf, math.inf)
    half = t_quantile(0.5 + confidence / 2, v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return mean, Interval(mean - half, mean + half)
