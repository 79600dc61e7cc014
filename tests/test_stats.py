"""Paired statistics against hand computations and an independent implementation."""

import math

import numpy as np
import pytest

from robustbench_alm.stats import holm, mcnemar_exact, paired_bootstrap


def test_mcnemar_small_table_by_hand():
    # b = 3, c = 12: n = 15 disagreements; P[X <= 3] for X ~ Bin(15, 1/2) is
    # (C(15,0) + C(15,1) + C(15,2) + C(15,3)) / 2^15 = (1 + 15 + 105 + 455) / 32768 = 576 / 32768;
    # two-sided: 1152 / 32768 = 0.03515625.
    assert mcnemar_exact(3, 12) == 0.03515625
    assert mcnemar_exact(12, 3) == 0.03515625
    # b = 1, c = 5: (1 + 6) / 64 doubled = 14 / 64.
    assert mcnemar_exact(1, 5) == 14 / 64


@pytest.mark.parametrize("b, c", [(0, 0), (4, 4), (7, 6)])
def test_mcnemar_no_evidence_is_one(b, c):
    assert mcnemar_exact(b, c) == 1.0


def test_mcnemar_agrees_with_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for b, c in [(0, 9), (2, 11), (30, 48), (120, 95), (400, 470)]:
        expected = scipy_stats.binomtest(b, b + c, 0.5).pvalue
        assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9), (b, c)


@pytest.mark.parametrize("b, c", [(-1, 3), (2.5, 3), (True, 2)])
def test_mcnemar_refuses_non_counts(b, c):
    with pytest.raises(ValueError, match="must be a count"):
        mcnemar_exact(b, c)


def test_bootstrap_intervals_cover_and_are_reproducible():
    rng = np.random.default_rng(1)
    correct = rng.random((400, 2)) < [0.7, 0.6]
    models, pairs = paired_bootstrap(correct, n_bootstrap=2000, seed=3)
    for j in range(2):
        assert 100 * correct[:, j].mean() in models[j]
        # Roughly +-1.96 binomial standard errors.
        p = correct[:, j].mean()
        half = 1.96 * 100 * math.sqrt(p * (1 - p) / 400)
        assert models[j].high - models[j].low == pytest.approx(2 * half, rel=0.2)
    diff = 100 * (correct[:, 0].mean() - correct[:, 1].mean())
    assert diff in pairs[(0, 1)]
    again, _ = paired_bootstrap(correct, n_bootstrap=2000, seed=3)
    assert again == models


def test_bootstrap_by_patterns_equals_resampling_rows():
    """Multinomial counts over distinct rows give the same distribution as resampling rows."""
    rng = np.random.default_rng(2)
    correct = rng.random((300, 2)) < [0.55, 0.5]
    _, pairs = paired_bootstrap(correct, n_bootstrap=4000, seed=0)
    rows = rng.integers(0, 300, size=(4000, 300))
    naive = 100 * (correct[rows, 0].mean(1) - correct[rows, 1].mean(1))
    low, high = np.percentile(naive, [2.5, 97.5])
    assert pairs[(0, 1)].low == pytest.approx(low, abs=0.5)
    assert pairs[(0, 1)].high == pytest.approx(high, abs=0.5)


def test_bootstrap_refuses_bad_input():
    with pytest.raises(ValueError, match="boolean"):
        paired_bootstrap(np.zeros((5, 2)))
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(np.ones((5, 2), bool), confidence=95)


def test_holm_by_hand():
    # Sorted: 0.01 * 3 = 0.03; 0.03 * 2 = 0.06; 0.04 * 1 = 0.04 -> raised to 0.06 (monotone).
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]
    assert holm([0.6, 0.7]) == [1.0, 1.0]
