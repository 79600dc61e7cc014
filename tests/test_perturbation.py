"""The all-layer perturbation and the AMO step against hand computations in NumPy."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustbench_alm.perturbation import all_layer_forward, delta_norm, perturbed
from robustbench_alm.training import TrainConfig, amo_perturbation, method_loss
from tests.conftest import TwoLayer


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _weights(model):
    return [p.detach().double().numpy() for p in (model.fc1.weight, model.fc1.bias,
                                                   model.fc2.weight, model.fc2.bias)]


def _numpy_forward(model, x, d1, d2, scale="input"):
    w1, b1, w2, b2 = _weights(model)
    pre1 = x @ w1.T + b1
    ref1 = x if scale == "input" else pre1
    h1 = pre1 + d1 * np.linalg.norm(ref1, axis=1, keepdims=True)
    a = np.maximum(h1, 0)
    pre2 = a @ w2.T + b2
    ref2 = a if scale == "input" else pre2
    return h1, a, pre2 + d2 * np.linalg.norm(ref2, axis=1, keepdims=True)


@pytest.fixture
def net_and_batch():
    torch.manual_seed(3)
    model = TwoLayer().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    return model, x, y


@pytest.mark.parametrize("scale", ["input", "output"])
def test_forward_matches_hand_computation(net_and_batch, scale):
    model, x, y = net_and_batch
    rng = np.random.default_rng(0)
    d1, d2 = rng.normal(size=(5, 4)), rng.normal(size=(5, 3))
    deltas = {"fc1": torch.tensor(d1), "fc2": torch.tensor(d2)}
    logits = all_layer_forward(model, x, deltas, scale=scale)
    _, _, expected = _numpy_forward(model, x.numpy(), d1, d2, scale)
    np.testing.assert_allclose(logits.detach().numpy(), expected, rtol=1e-12)


def test_amo_step_matches_hand_computation(net_and_batch):
    """One ascent step from delta = 0: delta_i = eta * ||h_{i-1}|| * dCE/dh_i, per example."""
    model, x, y = net_and_batch
    eta = 0.3
    deltas = amo_perturbation(model, x, y, steps=1, eta=eta)

    w1, b1, w2, b2 = _weights(model)
    xn = x.numpy()
    h1, a, z = _numpy_forward(model, xn, 0.0, 0.0)
    g_z = _softmax(z) - np.eye(3)[y.numpy()]  # dCE/dz per example
    g_h1 = (g_z @ w2) * (h1 > 0)  # the norm path through ||a|| vanishes at delta_2 = 0
    expected_d2 = eta * np.linalg.norm(a, axis=1, keepdims=True) * g_z
    expected_d1 = eta * np.linalg.norm(xn, axis=1, keepdims=True) * g_h1
    np.testing.assert_allclose(deltas["fc2"].numpy(), expected_d2, rtol=1e-10)
    np.testing.assert_allclose(deltas["fc1"].numpy(), expected_d1, rtol=1e-10)

    # The step of one example does not depend on the rest of the batch (sum, not mean).
    alone = amo_perturbation(model, x[:1], y[:1], steps=1, eta=eta)
    np.testing.assert_allclose(alone["fc1"].numpy(), expected_d1[:1], rtol=1e-10)

    # The weight step's loss is the CE of the perturbed network with delta held fixed.
    cfg = TrainConfig(method="amo", amo_eta=eta, amo_steps=1)
    loss, _ = method_loss(model, x, y, cfg, torch.Generator().manual_seed(0))
    _, _, z_pert = _numpy_forward(model, xn, expected_d1, expected_d2)
    ce = -np.log(_softmax(z_pert)[np.arange(5), y.numpy()]).mean()
    assert loss.item() == pytest.approx(ce, rel=1e-10)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_weight_decay_of_delta(net_and_batch):
    """delta <- (1 - eta lambda) delta + eta grad: two steps with lambda shrink the first one."""
    model, x, y = net_and_batch
    one = amo_perturbation(model, x, y, steps=1, eta=0.1, lam=0.0)
    two_decay = amo_perturbation(model, x, y, steps=2, eta=0.1, lam=5.0)
    two_plain = amo_perturbation(model, x, y, steps=2, eta=0.1, lam=0.0)
    # With lambda = 5 and eta = 0.1 the first step is multiplied by 0.5 before the second.
    diff = {k: two_plain[k] - two_decay[k] for k in one}
    for k in one:
        torch.testing.assert_close(diff[k], 0.5 * one[k], rtol=1e-9, atol=1e-12)


def test_hooks_are_removed_and_norm(net_and_batch):
    model, x, y = net_and_batch
    clean = model(x)
    deltas = {}
    with perturbed(model, deltas):
        model(x)
    assert set(deltas) == {"fc1", "fc2"}
    assert torch.equal(model(x), clean)  # no hook left behind
    torch.testing.assert_close(delta_norm(deltas), torch.zeros(5, dtype=torch.float64))
    deltas = {"fc1": torch.ones(5, 4, dtype=torch.float64),
              "fc2": torch.ones(5, 3, dtype=torch.float64)}
    torch.testing.assert_close(delta_norm(deltas), torch.full((5,), 7.0 ** 0.5,
                                                              dtype=torch.float64))


def test_bad_delta_shape_and_scale(net_and_batch):
    model, x, _ = net_and_batch
    with pytest.raises(ValueError, match="shape"):
        all_layer_forward(model, x, {"fc1": torch.zeros(5, 7, dtype=torch.float64)})
    with pytest.raises(ValueError, match="input, output|'input', 'output'"):
        all_layer_forward(model, x, {}, scale="weights")


def test_zero_delta_changes_nothing(net_and_batch):
    model, x, _ = net_and_batch
    deltas = {}
    torch.testing.assert_close(all_layer_forward(model, x, deltas), model(x))
    assert F.mse_loss(all_layer_forward(model, x, deltas, scale="output"), model(x)) == 0
