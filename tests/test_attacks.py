"""Attacks keep their promises: inside the eps-ball, inside [0, 1], no NaNs, and they work."""

import numpy as np
import pytest
import torch

from robustbench_alm.attacks import PGD, Budget, build_attack, pgd, project, resolve_step_size
from robustbench_alm.suites import AttackSpec, load_suite
from robustbench_alm.threat import ThreatModel
from tests.conftest import TinyCNN

BUDGETS = [Budget(ThreatModel.LINF, 0.1), Budget(ThreatModel.LINF, 8 / 255),
           Budget(ThreatModel.L2, 1.5)]


def _dist(x_adv, x, tm):
    diff = (x_adv - x).flatten(1).numpy().astype(np.float64)
    return np.abs(diff).max(1) if tm is ThreatModel.LINF else np.linalg.norm(diff, axis=1)


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: f"{b.threat_model.value}-{b.eps:.3f}")
@pytest.mark.parametrize("seed", [0, 1])
def test_pgd_stays_in_ball_and_box(budget, seed):
    torch.manual_seed(seed)
    model = TinyCNN().eval()
    x = torch.rand(16, 1, 28, 28)
    x[:4] = 0.0  # corners of the box: the projection must clip, not step outside
    x[4:8] = 1.0
    y = torch.randint(0, 10, (16,))
    x_adv = pgd(model, x, y, budget, steps=10, step_size=budget.eps / 4,
                generator=torch.Generator().manual_seed(seed))
    assert torch.isfinite(x_adv).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (_dist(x_adv, x, budget.threat_model) <= budget.eps * (1 + 1e-6) + 1e-7).all()


def test_pgd_breaks_a_trained_model(trained_tiny, fmnist_test):
    x, y = fmnist_test[0][:200], fmnist_test[1][:200]
    clean = (trained_tiny(x).argmax(1) == y).float().mean()
    attack = PGD(Budget(ThreatModel.LINF, 0.1), steps=20, step_size="eps/4")
    robust = (trained_tiny(attack(trained_tiny, x, y)).argmax(1) == y).float().mean()
    assert clean > 0.6
    assert robust < 0.5 * clean  # an undefended model loses most of its accuracy at eps 0.1


def test_pgd_eps_zero_returns_inputs():
    model = TinyCNN().eval()
    x, y = torch.rand(4, 1, 28, 28), torch.arange(4)
    assert torch.equal(pgd(model, x, y, Budget(ThreatModel.LINF, 0.0), steps=5,
                           step_size=0.1, generator=torch.Generator()), x)


def test_project_l2_matches_numpy():
    x = torch.full((3, 1, 4, 4), 0.5)
    x_adv = x + torch.randn(3, 1, 4, 4)
    out = project(x_adv, x, Budget(ThreatModel.L2, 0.3))
    assert (_dist(out, x, ThreatModel.L2) <= 0.3 + 1e-6).all()


@pytest.mark.parametrize("text, eps, value", [("eps/4", 0.1, 0.025), ("2.5*eps", 0.1, 0.25),
                                              (0.01, 0.3, 0.01)])
def test_step_size_forms(text, eps, value):
    assert resolve_step_size(text, eps) == pytest.approx(value)


def test_step_size_refuses_unknown_form():
    with pytest.raises(ValueError, match="eps/K"):
        resolve_step_size("eps**2", 0.1)


@pytest.mark.parametrize("name", ["standard", "pgd-20", "quick"])
def test_shipped_suites_build(name):
    suite = load_suite(name)
    for spec in suite.attacks:
        build_attack(spec, Budget(ThreatModel.LINF, 0.1))


def test_unknown_parameter_is_named():
    with pytest.raises(ValueError, match="stepz"):
        build_attack(AttackSpec("x", "pgd", {"stepz": 3}), Budget(ThreatModel.LINF, 0.1))
    with pytest.raises(ValueError, match="n_querys"):
        build_attack(AttackSpec("x", "square", {"n_querys": 3}), Budget(ThreatModel.LINF, 0.1))


def test_foolbox_stage_in_ball(trained_tiny, fmnist_test):
    x, y = fmnist_test[0][:32], fmnist_test[1][:32]
    attack = build_attack(AttackSpec("fb", "foolbox", {"attack": "LinfPGD", "steps": 20,
                                                          "rel_stepsize": 0.25}),
                          Budget(ThreatModel.LINF, 0.1))
    x_adv = attack(trained_tiny, x, y)
    assert (_dist(x_adv, x, ThreatModel.LINF) <= 0.1 + 1e-6).all()
    clean = (trained_tiny(x).argmax(1) == y).float().mean()
    assert (trained_tiny(x_adv).argmax(1) == y).float().mean() < 0.5 * clean
