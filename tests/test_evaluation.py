"""The harness: parity with raw AutoAttack, exact eps = 0, refused inputs, mode kept."""

import pytest
import torch
from torch import nn

from robustbench_alm.evaluation import run_evaluation


def test_standard_suite_equals_raw_autoattack(trained_tiny, fmnist_test):
    """Same points, seed and batch size: the same robust points as pyautoattack's own run."""
    from pyautoattack import AutoAttack

    x, y = fmnist_test[0][:100], fmnist_test[1][:100]
    eps, batch_size = 0.05, 40  # several batches, and points left for every stage
    ours = run_evaluation(trained_tiny, x, y, eps=eps, suite="standard", seed=0,
                          batch_size=batch_size, margins=False, progress=False)
    adversary = AutoAttack(trained_tiny, norm="Linf", eps=eps, seed=0, version="standard",
                           device="cpu")
    _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    raw_robust = (y_adv == y)

    stages = {s["name"]: s for s in ours.entry["attacks"]}
    assert list(stages) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert 0 < ours.entry["robust_acc"] < ours.entry["clean_acc"]
    assert stages["apgd-t"]["n_broken"] > 0  # the later stages were really exercised
    assert torch.equal(ours.per_example["robust"], raw_robust)
    assert ours.entry["robust_acc"] == pytest.approx(100 * raw_robust.float().mean().item())
    assert ours.entry["autoattack_acc"] == ours.entry["robust_acc"]


@pytest.mark.parametrize("suite", ["pgd-20", "quick"])
def test_eps_zero_gives_clean_accuracy_exactly(trained_tiny, fmnist_test, suite):
    x, y = fmnist_test[0][:50], fmnist_test[1][:50]
    entry = run_evaluation(trained_tiny, x, y, eps=0.0, suite=suite, margins=False,
                           progress=False).entry
    assert entry["robust_acc"] == entry["clean_acc"]
    assert all(stage["n_broken"] == 0 for stage in entry["attacks"])


def test_robust_never_above_clean_and_stages_monotone(trained_tiny, fmnist_test):
    x, y = fmnist_test[0][:80], fmnist_test[1][:80]
    result = run_evaluation(trained_tiny, x, y, eps=0.05, suite="quick", progress=False,
                            margin_steps=20)
    entry, per = result.entry, result.per_example
    accs = [entry["clean_acc"]] + [s["robust_acc"] for s in entry["attacks"]]
    assert accs == sorted(accs, reverse=True)
    assert not (per["robust"] & ~per["clean_correct"]).any()  # a clean mistake is not robust
    # Margins: 0 exactly on the clean mistakes, positive on the correct points.
    alm = per["all_layer_margin"]
    assert (alm[~per["clean_correct"]] == 0).all()
    assert (alm[per["clean_correct"]] > 0).all()
    assert entry["margins"]["all_layer"]["n_zero"] == int((~per["clean_correct"]).sum())
    dist = per["input_space_distance"]
    # A point the suite broke at eps 0.05 has a minimal distance at most ~eps (FMN may overshoot
    # a little, so only most of them are checked).
    broken = per["clean_correct"] & ~per["robust"]
    assert (dist[broken] <= 0.05 * 1.5).float().mean() > 0.8


def test_normalized_inputs_are_refused(trained_tiny):
    x = (torch.rand(4, 1, 28, 28) - 0.2860) / 0.3530  # Fashion-MNIST mean/std normalization
    with pytest.raises(ValueError, match="normalization belongs inside the model"):
        run_evaluation(trained_tiny, x, torch.zeros(4, dtype=torch.long), eps=0.1,
                       suite="pgd-20", progress=False)


@pytest.mark.parametrize("labels, message", [
    (torch.eye(10)[:4], "looks one-hot"),
    (torch.zeros(4, 2, dtype=torch.long), "1-D"),
    (torch.tensor([0, 1, 2, 10]), "0..9"),
    (torch.tensor([0, 1, 2]), "4 inputs but 3 labels"),
])
def test_bad_labels_are_refused(trained_tiny, labels, message):
    with pytest.raises(ValueError, match=message):
        run_evaluation(trained_tiny, torch.rand(4, 1, 28, 28), labels, eps=0.1,
                       suite="pgd-20", progress=False)


def test_linf_eps_of_whole_box_refused(trained_tiny):
    with pytest.raises(ValueError, match="whole input box"):
        run_evaluation(trained_tiny, torch.rand(2, 1, 28, 28), torch.tensor([0, 1]), eps=1.0,
                       suite="pgd-20", progress=False)


def test_train_mode_model_is_evaluated_in_eval_mode_and_handed_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                          nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(20, 1, 28, 28), torch.randint(0, 10, (20,))
    a = run_evaluation(model, x, y, eps=0.0, suite="pgd-20", margins=False, progress=False)
    b = run_evaluation(model, x, y, eps=0.0, suite="pgd-20", margins=False, progress=False)
    assert a.entry["clean_acc"] == b.entry["clean_acc"]  # dropout was off
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed during evaluation"


def test_entry_records_suite_and_examples(trained_tiny, fmnist_test):
    x, y = fmnist_test[0][:20], fmnist_test[1][:20]
    entry = run_evaluation(trained_tiny, x, y, eps=8 / 255, suite="pgd-20", margins=False,
                           progress=False, architecture="tiny-cnn").entry
    assert entry["eps"] == 8 / 255 and entry["eps_text"] == "8/255"
    assert entry["suite"]["name"] == "pgd-20" and len(entry["suite"]["sha256"]) == 64
    assert entry["examples"]["selection"] == "given" and entry["n_examples"] == 20
    assert entry["autoattack_acc"] is None  # pgd-20 is not AutoAttack


def test_caller_rng_untouched(trained_tiny, fmnist_test):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_evaluation(trained_tiny, fmnist_test[0][:10], fmnist_test[1][:10], eps=0.05,
                   suite="quick", margin_steps=5, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_model_without_points_still_evaluates(fmnist_test):
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    entry = run_evaluation(model, fmnist_test[0][:10], fmnist_test[1][:10], eps=0.05,
                           suite="pgd-20", margin_steps=5, progress=False).entry
    assert "all_layer" not in entry["margins"] and "input_space" in entry["margins"]


def test_tiny_cnn_fixture_is_not_trivial(trained_tiny, fmnist_test):
    x, y = fmnist_test
    assert (trained_tiny(x).argmax(1) == y).float().mean() > 0.7
