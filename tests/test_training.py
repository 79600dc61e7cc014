"""Every training method runs, learns, and its checkpoint round-trips with a model card."""

import json

import pytest
import torch

from robustbench_alm.models import available_models, create_model, perturbation_points
from robustbench_alm.training import (METHODS, TrainConfig, load_checkpoint, save_checkpoint,
                                      train)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_learns(method, fmnist_train, fmnist_test):
    cfg = TrainConfig(method=method, epochs=1, batch_size=50, train_subset=600, pgd_steps=2,
                      lr=3e-3, eps=0.1)
    model, history = train(cfg, data=fmnist_train, progress=False)
    x, y = fmnist_test[0][:300], fmnist_test[1][:300]
    acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.3, f"{method} reached only {acc:.2f} test accuracy"  # chance is 0.1
    assert history["epochs"][0]["loss"] > 0 and not model.training


def test_checkpoint_round_trip(tmp_path, fmnist_train):
    cfg = TrainConfig(method="amo", epochs=1, train_subset=200, amo_eta=0.003, seed=7)
    model, history = train(cfg, data=fmnist_train, progress=False)
    path = save_checkpoint(model, tmp_path / "m.safetensors", cfg, history)
    loaded, card = load_checkpoint(path)
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(loaded(x), model(x))
    saved = json.loads(path.with_suffix(".json").read_text())
    assert saved["training"]["method"] == "amo"
    assert saved["training"]["hyperparameters"]["amo_eta"] == 0.003
    assert saved["training"]["hyperparameters"]["seed"] == 7
    assert card["weights_sha256"] == saved["weights_sha256"]


def test_same_seed_same_weights(fmnist_train):
    cfg = TrainConfig(method="pgd-at", epochs=1, train_subset=100, pgd_steps=1, seed=3)
    a, _ = train(cfg, data=fmnist_train, progress=False)
    b, _ = train(cfg, data=fmnist_train, progress=False)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("field, value, message", [
    ("method", "fgsm-at", "expected one of standard"),
    ("optimizer", "lamb", "expected one of sgd, adam"),
    ("eps", 1.5, "whole input box"),
    ("epochs", 0, "positive integer"),
    ("pgd_step_size", "eps^2", "eps/K"),
    ("delta_scale", "weights", "input"),
])
def test_bad_config_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("name, shape, points", [
    ("cnn-small", (2, 1, 28, 28), 4),
    ("preact-resnet18", (2, 3, 32, 32), 16),
    ("wrn-16-1", (2, 3, 32, 32), 12),
    ("wrn-10-2", (2, 3, 32, 32), 6),
])
def test_registry_models_run_and_declare_points(name, shape, points):
    model = create_model(name, in_channels=shape[1]).eval()
    out = model(torch.rand(shape))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert len(perturbation_points(model)) == points


def test_registry_errors_name_choices():
    with pytest.raises(ValueError, match="cnn-small"):
        create_model("resnet-9000")
    with pytest.raises(ValueError, match="6n \\+ 4"):
        create_model("wrn-17-4")
    assert "wrn-D-K" in available_models()


# ---------------------------------------------------------------------------------------------
# Each method's loss and perturbation against a hand computation on a two-layer network:
# h = W1 x + b1 + d1 ||x||, a = relu(h), z = W2 a + b2 + d2 ||a||, written out here without the
# package's hooks, in float64.

import torch.nn.functional as F  # noqa: E402

from robustbench_alm.training import amo_perturbation, method_loss  # noqa: E402
from tests.conftest import TwoLayer  # noqa: E402


def _hand_logits(net, x, d1=None, d2=None):
    h = x @ net.fc1.weight.T + net.fc1.bias
    if d1 is not None:
        h = h + d1 * x.norm(dim=1, keepdim=True)
    a = torch.relu(h)
    z = a @ net.fc2.weight.T + net.fc2.bias
    if d2 is not None:
        z = z + d2 * a.norm(dim=1, keepdim=True)
    return z


def _hand_input_grad(net, x, dz):
    """d(sum_n <dz_n, z_n>)/dx for the unperturbed network: W1^T (relu'(h) * W2^T dz)."""
    h = x @ net.fc1.weight.T + net.fc1.bias
    return ((dz @ net.fc2.weight) * (h > 0)) @ net.fc1.weight


def _hand_project(x_adv, x, eps):
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)


@pytest.fixture
def tiny_case():
    torch.manual_seed(11)
    net = TwoLayer(d_in=3, d_hidden=4, n_classes=3).double()
    x = torch.rand(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    return net, x, y


def _cfg(method, **kw):
    return TrainConfig(method=method, eps=0.1, pgd_steps=1, **kw)


def _hand_amo_deltas(net, x, y, eta, lam=0.0, steps=1):
    """Ascent on sum CE; step 1 by the closed form, later steps by autograd on the hand net."""
    p_minus_y = F.softmax(_hand_logits(net, x), 1) - F.one_hot(y, 3).double()
    h = x @ net.fc1.weight.T + net.fc1.bias
    g1 = x.norm(dim=1, keepdim=True) * (h > 0) * (p_minus_y @ net.fc2.weight)
    g2 = torch.relu(h).norm(dim=1, keepdim=True) * p_minus_y
    d1, d2 = eta * g1, eta * g2
    for _ in range(steps - 1):
        d1, d2 = d1.detach().requires_grad_(), d2.detach().requires_grad_()
        loss = F.cross_entropy(_hand_logits(net, x, d1, d2), y, reduction="sum")
        g1, g2 = torch.autograd.grad(loss, (d1, d2))
        d1, d2 = (1 - eta * lam) * d1 + eta * g1, (1 - eta * lam) * d2 + eta * g2
    return d1.detach(), d2.detach()


def _hand_pgd_example(net, x, y, eps, gen):
    """One PGD step of 2.5 eps from the generator's uniform start, as method_loss draws it."""
    start = _hand_project(x + eps * (torch.rand(x.shape, generator=gen) * 2 - 1), x, eps)
    p_minus_y = F.softmax(_hand_logits(net, start), 1) - F.one_hot(y, 3).double()
    grad = _hand_input_grad(net, start, p_minus_y)
    return _hand_project(start + 2.5 * eps * grad.sign(), x, eps)


def test_standard_loss_by_hand(tiny_case):
    net, x, y = tiny_case
    loss, _ = method_loss(net, x, y, _cfg("standard"), torch.Generator().manual_seed(0))
    logits = _hand_logits(net, x)
    expected = -(logits.gather(1, y[:, None]) - logits.logsumexp(1, keepdim=True)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("steps, lam", [(1, 0.0), (3, 0.5)])
def test_amo_perturbation_and_loss_by_hand(tiny_case, steps, lam):
    net, x, y = tiny_case
    eta = 0.7  # large enough that the perturbation changes the loss visibly
    deltas = amo_perturbation(net, x, y, steps=steps, eta=eta, lam=lam)
    d1, d2 = _hand_amo_deltas(net, x, y, eta, lam, steps)
    torch.testing.assert_close(deltas["fc1"], d1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(deltas["fc2"], d2, rtol=1e-10, atol=1e-12)

    cfg = _cfg("amo", amo_steps=steps, amo_eta=eta, amo_lambda=lam)
    loss, _ = method_loss(net, x, y, cfg, torch.Generator().manual_seed(0))
    expected = F.cross_entropy(_hand_logits(net, x, d1, d2), y)
    clean = F.cross_entropy(_hand_logits(net, x), y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    assert loss.item() > clean.item() + 1e-3  # the ascent really raised the loss


def test_amo_output_scaling_by_hand(tiny_case):
    net, x, y = tiny_case
    deltas = amo_perturbation(net, x, y, steps=1, eta=0.3, scale="output")
    p_minus_y = F.softmax(_hand_logits(net, x), 1) - F.one_hot(y, 3).double()
    h = x @ net.fc1.weight.T + net.fc1.bias
    # d/d(d1) of <dz, z> with h' = h + d1 ||h||: ||h|| relu'(h) W2^T dz, at d = 0.
    g1 = h.norm(dim=1, keepdim=True) * (h > 0) * (p_minus_y @ net.fc2.weight)
    g2 = _hand_logits(net, x).norm(dim=1, keepdim=True) * p_minus_y
    torch.testing.assert_close(deltas["fc1"], 0.3 * g1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(deltas["fc2"], 0.3 * g2, rtol=1e-10, atol=1e-12)


def test_pgd_at_example_and_loss_by_hand(tiny_case):
    net, x, y = tiny_case
    loss, logits = method_loss(net, x, y, _cfg("pgd-at"), torch.Generator().manual_seed(5))
    x_adv = _hand_pgd_example(net, x, y, 0.1, torch.Generator().manual_seed(5))
    assert (x_adv - x).abs().max() <= 0.1 + 1e-12
    torch.testing.assert_close(logits, _hand_logits(net, x_adv), rtol=1e-12, atol=1e-12)
    assert loss.item() == pytest.approx(F.cross_entropy(_hand_logits(net, x_adv), y).item(),
                                        rel=1e-12)


def test_amo_pgd_loss_by_hand(tiny_case):
    # The plain form: AMO at the PGD example x'.
    net, x, y = tiny_case
    cfg = _cfg("amo-pgd", amo_steps=1, amo_eta=0.7, amo_form="plain")
    loss, _ = method_loss(net, x, y, cfg, torch.Generator().manual_seed(5))
    x_adv = _hand_pgd_example(net, x, y, 0.1, torch.Generator().manual_seed(5))
    d1, d2 = _hand_amo_deltas(net, x_adv, y, 0.7)
    expected = F.cross_entropy(_hand_logits(net, x_adv, d1, d2), y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)


def test_fused_amo_pgd_loss_by_hand(tiny_case):
    # The fused form with one PGD step: the deltas come from the same backward pass as that
    # step, so they are the AMO step at the random start; the weight loss is at x'.
    net, x, y = tiny_case
    cfg = _cfg("amo-pgd", amo_steps=1, amo_eta=0.7)
    assert cfg.amo_form == "fused"
    loss, _ = method_loss(net, x, y, cfg, torch.Generator().manual_seed(5))
    x_adv = _hand_pgd_example(net, x, y, 0.1, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    start = _hand_project(x + 0.1 * (torch.rand(x.shape, generator=gen) * 2 - 1), x, 0.1)
    d1, d2 = _hand_amo_deltas(net, start, y, 0.7)
    expected = F.cross_entropy(_hand_logits(net, x_adv, d1, d2), y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    plain = _hand_amo_deltas(net, x_adv, y, 0.7)
    assert not torch.allclose(d1, plain[0])  # the two forms really differ here


def test_trades_example_and_loss_by_hand(tiny_case):
    net, x, y = tiny_case
    cfg = _cfg("trades", trades_beta=6.0)
    loss, logits = method_loss(net, x, y, cfg, torch.Generator().manual_seed(9))

    # x' starts at x + 0.001 N(0, 1) from the generator, then one sign step on
    # KL(p(x) || p(x')), whose gradient in the logits of x' is q - p.
    gen = torch.Generator().manual_seed(9)
    start = (x + 0.001 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    p = F.softmax(_hand_logits(net, x), 1)
    q = F.softmax(_hand_logits(net, start), 1)
    x_adv = _hand_project(start + 0.25 * _hand_input_grad(net, start, q - p).sign(), x, 0.1)
    log_q = F.log_softmax(_hand_logits(net, x_adv), 1)
    kl = (p * (p.log() - log_q)).sum(1).mean()
    expected = F.cross_entropy(_hand_logits(net, x), y) + 6.0 * kl
    assert kl.item() > 0
    torch.testing.assert_close(logits, _hand_logits(net, x), rtol=1e-12, atol=1e-12)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)


# ---------------------------------------------------------------------------------------------
# AMO does what it is for: a few steps enlarge the all-layer margin of the batch it trains on.


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (torch.nn.Linear(20, 32), torch.nn.Linear(32, 32),
                                        torch.nn.Linear(32, 5))
        self.perturbation_points = ["fc1", "fc2", "fc3"]

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _margin_after(sign: float, seed: int, steps: int = 20):
    """Mean all-layer margin of a half-fitted batch before and after ``steps`` AMO weight steps
    (``sign`` -1 steps *up* the AMO loss instead: the control that must shrink the margin)."""
    from robustbench_alm.margins import all_layer_margin

    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(5, 20, generator=gen)
    y = torch.arange(64) % 5
    x = centers[y] + 0.8 * torch.randn(64, 20, generator=gen)  # 64 points, 5 classes
    torch.manual_seed(seed)
    net = _MLP()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(20):  # fit the batch first, so the margins are those of correct points
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def margin():
        m = all_layer_margin(net.eval(), x, y, steps=60, progress=False)
        assert torch.isfinite(m).all()  # a bound for every point: the mean is defined
        return m.mean().item()

    before = margin()
    cfg = TrainConfig(method="amo", amo_steps=1, amo_eta=0.5)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        loss, _ = method_loss(net.train(), x, y, cfg, torch.Generator().manual_seed(0))
        opt.zero_grad()
        (sign * loss).backward()
        opt.step()
    return before, margin()


@pytest.mark.parametrize("seed", [0, 1])
def test_amo_steps_enlarge_the_all_layer_margin_of_the_batch(seed):
    # Measured: +27% (seed 0) and +26% (seed 1); the control: -38% and -63%.
    before, after = _margin_after(+1.0, seed)
    assert after > 1.1 * before, f"mean all-layer margin {before:.4f} -> {after:.4f}"
    # The check can fail: the same steps taken up the AMO loss shrink the margin.
    before, after = _margin_after(-1.0, seed)
    assert after < 0.9 * before, f"ascent: mean all-layer margin {before:.4f} -> {after:.4f}"
