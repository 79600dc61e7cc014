"""Margin estimates against exact values where the all-layer margin has a closed form."""

import numpy as np
import pytest
import torch
from torch import nn

from robustbench_alm.margins import all_layer_margin, first_order_margin, summarize


class OneLinear(nn.Module):
    """F(x, delta) = Wx + b + delta ||x||: linear in delta, so the margin has a closed form."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.perturbation_points = ["fc"]

    def forward(self, x):
        return self.fc(x.flatten(1))


def exact_margin(model, x, y):
    """min over j != y of (z_y - z_j) / (||x|| sqrt 2), 0 where already wrong."""
    z = model(x).detach().numpy()
    xn = np.linalg.norm(x.flatten(1).numpy(), axis=1)
    out = []
    for i in range(len(z)):
        gaps = [(z[i, y[i]] - z[i, j]) for j in range(z.shape[1]) if j != y[i]]
        out.append(max(min(gaps), 0.0) / (xn[i] * np.sqrt(2)))
    return np.array(out)


@pytest.fixture
def linear_case():
    torch.manual_seed(0)
    model = OneLinear().eval()
    x = torch.rand(40, 6)
    y = model(x).argmax(1)
    y[:5] = (y[:5] + 1) % 4  # five points the model gets wrong
    return model, x, y


def test_first_order_is_exact_when_linear(linear_case):
    model, x, y = linear_case
    np.testing.assert_allclose(first_order_margin(model, x, y).numpy(),
                               exact_margin(model, x, y), rtol=1e-5, atol=1e-7)


def test_search_bounds_the_exact_margin_tightly(linear_case):
    model, x, y = linear_case
    found = all_layer_margin(model, x, y, steps=100, progress=False).numpy()
    exact = exact_margin(model, x, y)
    assert (found[:5] == 0).all()
    # An upper bound: never below the true margin, and within 1% of it after 100 steps.
    assert (found[5:] >= exact[5:] * (1 - 1e-4)).all()
    np.testing.assert_allclose(found[5:], exact[5:], rtol=0.01)


def test_default_search_is_short_and_close(linear_case, trained_tiny, fmnist_test):
    # The default (10 steps, cheaper than PGD-20) against the closed form, and against a
    # 100-step search on a real model: still an upper bound, within a few percent.
    model, x, y = linear_case
    found = all_layer_margin(model, x, y, progress=False).numpy()
    exact = exact_margin(model, x, y)
    assert (found[5:] >= exact[5:] * (1 - 1e-4)).all()
    np.testing.assert_allclose(found[5:], exact[5:], rtol=0.02)
    x, y = fmnist_test[0][:60], fmnist_test[1][:60]
    short = all_layer_margin(trained_tiny, x, y, progress=False)
    long = all_layer_margin(trained_tiny, x, y, steps=100, progress=False)
    both = torch.isfinite(short) & (long > 0)
    assert both.sum() > 30
    assert (short[both] / long[both]).median() < 1.05


def test_search_on_a_real_model(trained_tiny, fmnist_test):
    x, y = fmnist_test[0][:60], fmnist_test[1][:60]
    found = all_layer_margin(trained_tiny, x, y, steps=60, progress=False)
    first = first_order_margin(trained_tiny, x, y)
    correct = trained_tiny(x).argmax(1) == y
    assert torch.isfinite(found).all()
    assert (found[~correct] == 0).all() and (found[correct] > 0).all()
    # Nearly linear in delta near a trained network's points: the two agree to within 2x.
    ratio = (found[correct] / first[correct]).median()
    assert 0.5 < ratio < 2.0


def test_summarize_counts_zero_and_not_found():
    stats = summarize(torch.tensor([0.0, 0.1, 0.2, float("inf"), float("inf")]), "search")
    assert stats["n"] == 5 and stats["n_zero"] == 1 and stats["n_not_found"] == 2
    assert stats["mean"] is None  # a mean over the found points only would flatter the model
    assert stats["median"] == pytest.approx(0.2)
    assert stats["quantiles"]["q75"] is None  # falls among the points with no bound
