"""The fast paths: the `fast` suite, adaptive Square, PGD's early stop and fused AMO-PGD.

None of these tests is timed; the speed-ups are measured by benchmarks/speed.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustbench_alm import evaluation
from robustbench_alm.attacks import Budget, pgd
from robustbench_alm.attacks.square import AdaptiveSquare, degenerate_gradients
from robustbench_alm.evaluation import run_evaluation
from robustbench_alm.models import GradientMasked
from robustbench_alm.threat import ThreatModel
from robustbench_alm.training import (TrainConfig, amo_perturbation, frozen_norm_stats,
                                      fused_amo_pgd, method_loss)

from .conftest import TinyCNN

LINF = Budget(ThreatModel.LINF, 0.1)


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_pgd_early_stop_is_per_point_exact(trained_tiny, fmnist_test, loss):
    # A point leaves the batch at its first misclassified iterate: each point's result must be
    # what PGD gives when that point is attacked alone.
    x, y = fmnist_test[0][:24], fmnist_test[1][:24]
    together = pgd(trained_tiny, x, y, LINF, steps=8, step_size=0.025, random_start=False,
                   loss=loss)
    alone = torch.cat([pgd(trained_tiny, x[i:i + 1], y[i:i + 1], LINF, steps=8,
                           step_size=0.025, random_start=False, loss=loss) for i in range(24)])
    assert torch.allclose(together, alone, atol=1e-6)
    fooled = trained_tiny(together).argmax(1) != y
    assert 0 < fooled.sum() < 24  # the test covers both the stopped and the running points


def test_degenerate_gradients_finds_masked_points(trained_tiny, fmnist_test):
    x, y = fmnist_test[0][:8], fmnist_test[1][:8]
    assert not degenerate_gradients(trained_tiny, x, y).any()
    assert degenerate_gradients(GradientMasked(trained_tiny), x, y).all()


def test_adaptive_square_spends_full_budget_on_masked_points(trained_tiny, fmnist_test):
    x, y = fmnist_test[0][:16], fmnist_test[1][:16]
    attack = AdaptiveSquare(LINF, n_queries=200, screen_queries=20)
    x_adv = attack(GradientMasked(trained_tiny), x, y)
    assert attack.n_full_budget == 16 and not attack.provisional
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_adaptive_square_refuses_screen_above_budget():
    with pytest.raises(ValueError, match="screen_queries \\(600\\) must not exceed"):
        AdaptiveSquare(LINF, n_queries=500, screen_queries=600)


def test_harness_revisits_batches_screened_before_an_escalation():
    # Batch 1 is only screened (provisional); batch 2 escalates; the harness must bring the
    # points of batch 1 that are still robust back once, and nothing else.
    class Recorder:
        def __init__(self):
            self.calls, self.provisional, self.escalated, self.revisit = [], False, False, False

        def __call__(self, model, x, y):
            self.calls.append([round(v, 3) for v in x[:, 0].tolist()])
            self.provisional = len(self.calls) == 1
            self.escalated = self.escalated or len(self.calls) == 2
            return x.clone()  # breaks nothing

    model = nn.Linear(1, 2)
    x = torch.arange(6, dtype=torch.float32)[:, None] / 10
    y = torch.zeros(6, dtype=torch.long)
    robust = torch.tensor([True, True, False, True, True, True])
    attack = Recorder()
    scorer = evaluation._Scorer(model)
    broken = evaluation._run_stage(model, scorer, attack, x, y, robust, LINF, 2, "s", False,
                                   set())
    assert broken == 0
    assert attack.calls == [[0.0, 0.1], [0.3, 0.4], [0.5], [0.0, 0.1]]
    assert attack.revisit  # the second pass ran with the full budget


def _entry_pair(model, x, y, **kwargs):
    runs = {}
    for suite in ("standard", "fast"):
        ev = run_evaluation(model, x, y, dataset="fashion-mnist", eps=0.1, suite=suite,
                            seed=0, batch_size=64, margins=False, progress=False, **kwargs)
        runs[suite] = ev
    return runs


def test_fast_breaks_every_point_standard_breaks(trained_tiny, fmnist_test):
    x, y = fmnist_test[0][:48], fmnist_test[1][:48]
    runs = _entry_pair(trained_tiny, x, y)
    standard, fast = (runs[s].per_example["robust"] for s in ("standard", "fast"))
    assert standard.sum() < runs["standard"].per_example["clean_correct"].sum()  # it did break
    assert not (fast & ~standard).any(), "fast calls robust a point standard broke"
    stages = [s["name"] for s in runs["fast"].entry["attacks"]]
    assert stages == ["pgd-10", "apgd-ce", "apgd-t-3", "square-adaptive"]


def test_fast_breaks_a_masked_model_through_square(trained_tiny, fmnist_test):
    x, y = fmnist_test[0][:16], fmnist_test[1][:16]
    runs = _entry_pair(GradientMasked(trained_tiny), x, y)
    standard, fast = (runs[s].per_example["robust"] for s in ("standard", "fast"))
    assert not (fast & ~standard).any()
    square = runs["fast"].entry["attacks"][-1]
    assert square["n_broken"] > 0 and square["n_full_budget"] > 0
    assert "black-box-beats-white-box" in runs["fast"].entry["flags"]
    assert not any(f.startswith("substitute-loss") for f in runs["fast"].entry["flags"])


def _train_batch(fmnist_train):
    return fmnist_train[0][:64], fmnist_train[1][:64]


def test_fused_and_plain_amo_pgd_nearly_agree(trained_tiny, fmnist_train):
    # Same PGD example; the fused deltas are the plain ones taken one PGD step earlier. Measure:
    # per-example cosine similarity of the concatenated deltas, and their norm ratio.
    x, y = _train_batch(fmnist_train)
    model = trained_tiny.train()
    with frozen_norm_stats(model):
        x_fused, fused = fused_amo_pgd(model, x, y, LINF, pgd_steps=3, step_size=0.083,
                                       amo_steps=1, eta=0.002,
                                       generator=torch.Generator().manual_seed(0))
        x_plain = pgd(model, x, y, LINF, steps=3, step_size=0.083, random_start=True,
                      generator=torch.Generator().manual_seed(0), keep_best=False)
        plain = amo_perturbation(model, x_plain, y, steps=1, eta=0.002)
    model.eval()
    assert torch.equal(x_fused, x_plain)
    flat_f = torch.cat([d.flatten(1) for d in fused.values()], 1)
    flat_p = torch.cat([d.flatten(1) for d in plain.values()], 1)
    cos = nn.functional.cosine_similarity(flat_f, flat_p, dim=1)
    ratio = flat_f.norm(dim=1) / flat_p.norm(dim=1)
    assert cos.median() > 0.9, cos
    assert 0.7 < ratio.median() < 1.3, ratio
    # and they are not trivially the same computation
    assert not torch.allclose(flat_f, flat_p)


def test_fused_amo_pgd_with_one_pgd_step_takes_deltas_at_the_start(trained_tiny, fmnist_train):
    # With one PGD step, the fused deltas are the AMO step at the random start point.
    x, y = _train_batch(fmnist_train)
    gen = torch.Generator().manual_seed(3)
    x_adv, fused = fused_amo_pgd(trained_tiny, x, y, LINF, pgd_steps=1, step_size=0.1,
                                 amo_steps=1, eta=0.01, generator=gen)
    start = pgd(trained_tiny, x, y, LINF, steps=0, step_size=0.1, random_start=True,
                generator=torch.Generator().manual_seed(3), keep_best=False)
    expected = amo_perturbation(trained_tiny, start, y, steps=1, eta=0.01)
    for name in expected:
        assert torch.allclose(fused[name], expected[name], atol=1e-6)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6


def test_fused_form_is_the_default_and_trains(fmnist_train):
    x, y = _train_batch(fmnist_train)
    cfg = TrainConfig(method="amo-pgd", pgd_steps=2, eps=0.1)
    assert cfg.amo_form == "fused"
    torch.manual_seed(0)
    model = TinyCNN().train()
    loss, logits = method_loss(model, x, y, cfg, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and logits.shape == (64, 10)
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="unknown amo_form 'fast'"):
        TrainConfig(method="amo-pgd", amo_form="fast")


def test_resumable_units_match_the_harness_through_an_escalation(trained_tiny, fmnist_test,
                                                                 tmp_path):
    # A Square-only suite on a model with honest gradients: some batches escalate, others are
    # only screened and must be revisited. The units a job runs (in reverse order here, as a
    # Ray cluster might) must give the harness's per-example results and stage record.
    from robustbench_alm import resumable

    suite = tmp_path / "square-only.toml"
    suite.write_text('name = "square-only"\nthreat_models = ["Linf"]\n[[attack]]\n'
                     'name = "sq"\nkind = "square-adaptive"\nn_queries = 60\n'
                     'screen_queries = 3\nbatch_size = 4\n')
    x, y = fmnist_test[0][:24], fmnist_test[1][:24]
    ref = run_evaluation(trained_tiny, x, y, dataset="fashion-mnist", eps=0.06,
                         suite=str(suite), batch_size=8, margins=False, progress=False)
    record = ref.entry["attacks"][0]
    assert record["escalated"], "the test needs an escalation to revisit"

    settings = resumable.Settings(dataset="fashion-mnist", threat_model="Linf", eps=0.06,
                                  suite=str(suite), n_examples=24, batch_size=8, margins=False)
    results: dict = {}
    while (step := resumable.next_units(settings, 24, results)) is not None:
        phase, units = step
        for unit in reversed(units):
            pos = list(unit.positions)
            results.setdefault(phase, {})[unit.batch] = resumable.run_unit(
                trained_tiny, unit, x[pos], y[pos], settings, results.get("checks", {}).get(0))
    assert results.get("stage:sq:again"), "no revisit phase ran"
    entry, per_example = resumable.assemble(settings, results, y=y, idx=list(range(24)),
                                            how="given", idx_hash=ref.entry["examples"][
                                                "indices_sha256"], architecture="TinyCNN")
    assert torch.equal(per_example["robust"], ref.per_example["robust"])
    for key in ("n_broken", "robust_acc", "n_full_budget", "escalated"):
        assert entry["attacks"][0][key] == record[key], key
