"""Cases that fool other evaluation tools: each asserts the right value, flag or message."""

import math

import pytest
import torch
from torch import nn

from robustbench_alm.checks import ContractError
from robustbench_alm.evaluation import _Scorer, run_evaluation
from robustbench_alm.flags import FLAGS, describe
from robustbench_alm.models import GradientMasked


def evaluate(model, x, y, **kwargs):
    kwargs.setdefault("eps", 0.05)
    kwargs.setdefault("suite", "pgd-20")
    kwargs.setdefault("margins", False)
    return run_evaluation(model, x, y, progress=False, **kwargs)


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 5, stride=2)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6 * 12 * 12, 10)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


@pytest.fixture
def bn_net(fmnist_train):
    torch.manual_seed(0)
    net = BNNet()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x, y = fmnist_train
    for i in range(0, 1000, 100):  # a few steps so that the running statistics mean something
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[i:i + 100]), y[i:i + 100]).backward()
        opt.step()
    return net.train()  # handed over in train mode, as careless users do


def test_case1_train_mode_model_scored_as_eval_function(bn_net, fmnist_test):
    x, y = fmnist_test[0][:100], fmnist_test[1][:100]
    before = {k: v.clone() for k, v in bn_net.state_dict().items()}
    entry = evaluate(bn_net, x, y, eps=0.0).entry
    bn_net.eval()
    expected = 100 * (bn_net(x).argmax(1) == y).float().mean().item()
    bn_net.train()
    assert entry["clean_acc"] == pytest.approx(expected)
    for k, v in bn_net.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    assert bn_net.training and "model-state-changed" not in entry["flags"]


def test_case2_batch_size_does_not_change_results(bn_net, fmnist_test):
    x, y = fmnist_test[0][:100], fmnist_test[1][:100]
    results = [evaluate(bn_net, x, y, batch_size=bs, suite="quick", eps=0.02)
               for bs in (1, 7, 100)]
    bn_net.eval()
    logits = [torch.cat([bn_net(x[i:i + bs]) for i in range(0, 100, bs)]) for bs in (1, 7, 100)]
    bn_net.train()
    torch.testing.assert_close(logits[0], logits[2], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1], logits[2], rtol=0, atol=1e-5)
    accs = {(r.entry["clean_acc"], r.entry["attacks"][0]["robust_acc"]) for r in results}
    assert len(accs) == 1, f"accuracies depend on the batch size: {accs}"  # FGSM: no randomness
    assert all(torch.equal(r.per_example["robust_fgsm"], results[0].per_example["robust_fgsm"])
               for r in results)


def test_case3_cifar_normalized_inputs_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2471, 0.2435, 0.2616]).view(1, 3, 1, 1)
    x = (torch.rand(4, 3, 32, 32) - mean) / std
    with pytest.raises(ValueError, match="normalization belongs inside the model"):
        evaluate(model, x, torch.zeros(4, dtype=torch.long), dataset="cifar10")


def test_case4_eps_8_means_8_over_255(trained_tiny, fmnist_test):
    with pytest.raises(ValueError, match=r"did you mean 8/255 = 0\.0313725"):
        evaluate(trained_tiny, fmnist_test[0][:4], fmnist_test[1][:4], eps=8)


class TupleOut(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(x), x.flatten(1)


class DictOut(TupleOut):
    def forward(self, x):
        return {"logits": self.base(x), "features": x.flatten(1)}


@pytest.mark.parametrize("wrapper, selector, message", [
    (TupleOut, 0, "a tuple of 2 items"),
    (DictOut, "logits", r"a dict with keys \['features', 'logits'\]"),
])
def test_case5_structured_outputs(trained_tiny, fmnist_test, wrapper, selector, message):
    x, y = fmnist_test[0][:20], fmnist_test[1][:20]
    model = wrapper(trained_tiny)
    with pytest.raises(ContractError, match=message):
        evaluate(model, x, y)
    entry = evaluate(model, x, y, output=selector).entry
    assert entry["output_selector"] == selector
    assert entry["clean_acc"] == evaluate(trained_tiny, x, y).entry["clean_acc"]
    with pytest.raises(ContractError, match="does not fit"):
        evaluate(model, x, y, output="missing" if wrapper is DictOut else 5)


def test_case6_softmax_outputs_flagged(trained_tiny, fmnist_test):
    x, y = fmnist_test[0][:100], fmnist_test[1][:100]
    with_softmax = nn.Sequential(trained_tiny, nn.Softmax(dim=1))
    flagged = evaluate(with_softmax, x, y).entry
    plain = evaluate(trained_tiny, x, y).entry
    assert "probability-outputs" in flagged["flags"]
    assert "probability-outputs" not in plain["flags"]
    assert flagged["clean_acc"] == plain["clean_acc"]


class StdNormalized(nn.Module):
    """Divides each image by its own standard deviation: a constant image gives NaN."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        std = x.flatten(1).std(1).view(-1, 1, 1, 1)
        return self.base((x - x.mean((1, 2, 3), keepdim=True)) / std)


def test_case7_nan_logits_counted_not_robust(trained_tiny, fmnist_test):
    x, y = fmnist_test[0][:20].clone(), fmnist_test[1][:20]
    x[:5] = 0.5  # constant images: zero standard deviation
    result = evaluate(StdNormalized(trained_tiny), x, y, eps=0.02)
    assert "non-finite-logits" in result.entry["flags"]
    assert not result.per_example["clean_correct"][:5].any()
    assert not result.per_example["robust"][:5].any()


def test_case7_huge_logit_offset_refused(trained_tiny, fmnist_test):
    class Offset(nn.Module):
        def forward(self, x):
            return trained_tiny(x) + 1e10

    with pytest.raises(ContractError, match="1e\\+10.*offset"):
        evaluate(Offset(), fmnist_test[0][:8], fmnist_test[1][:8])


@pytest.mark.parametrize("convert", [
    lambda y: y.to(torch.uint8), lambda y: y.to(torch.int32), lambda y: y[:, None],
    lambda y: y.float(), lambda y: y.numpy(),
], ids=["uint8", "int32", "column", "float", "numpy"])
def test_case8_label_dtypes_do_not_matter(trained_tiny, fmnist_test, convert):
    x, y = fmnist_test[0][:30], fmnist_test[1][:30]
    expected = evaluate(trained_tiny, x, y, suite="quick").entry
    got = evaluate(trained_tiny, x, convert(y), suite="quick").entry
    assert (got["clean_acc"], got["robust_acc"]) == (expected["clean_acc"],
                                                     expected["robust_acc"])


def test_case8_one_hot_refused(trained_tiny, fmnist_test):
    x, y = fmnist_test[0][:30], fmnist_test[1][:30]
    with pytest.raises(ValueError, match="looks one-hot.*argmax"):
        evaluate(trained_tiny, x, nn.functional.one_hot(y, 10))


def test_case9_gradient_masking_flagged(trained_tiny, fmnist_test, tmp_path):
    suite = tmp_path / "masking.toml"
    suite.write_text('name = "masking"\nthreat_models = ["Linf"]\n'
                     '[[attack]]\nname = "apgd-ce"\nkind = "apgd-ce"\nn_iter = 20\n'
                     '[[attack]]\nname = "square"\nkind = "square"\nn_queries = 300\n')
    x, y = fmnist_test[0][:40], fmnist_test[1][:40]
    entry = evaluate(GradientMasked(trained_tiny), x, y, eps=0.1, suite=str(suite)).entry
    stages = {s["name"]: s for s in entry["attacks"]}
    assert stages["apgd-ce"]["n_broken"] == 0  # the gradient attack is blind
    assert stages["square"]["n_broken"] > 0  # the black-box attack is not
    assert {"black-box-beats-white-box", "zero-gradients"} <= set(entry["flags"])
    assert "black-box-beats-white-box" not in evaluate(trained_tiny, x, y, eps=0.1,
                                                       suite=str(suite)).entry["flags"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_case10_half_precision(dtype, fmnist_test):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    model = model.to(dtype)
    x, y = fmnist_test[0][:20], fmnist_test[1][:20]
    entry = evaluate(model, x, y, suite="quick").entry
    assert "half-precision" in entry["flags"]
    assert next(model.parameters()).dtype == dtype  # the caller's model is not converted
    assert 0 <= entry["robust_acc"] <= entry["clean_acc"]


class Linear(nn.Module):
    def __init__(self, n_classes):
        super().__init__()
        torch.manual_seed(n_classes)
        self.fc = nn.Linear(784, n_classes)
        self.perturbation_points = ["fc"]

    def forward(self, x):
        return self.fc(x.flatten(1))


def _few_class_points(fmnist_test, n_classes, n=12):
    x, y = fmnist_test
    keep = y < n_classes
    return x[keep][:n], y[keep][:n]


@pytest.mark.parametrize("n_classes, targets", [(4, 3), (8, 7)])
def test_case11_target_classes_follow_class_count(fmnist_test, n_classes, targets):
    x, y = _few_class_points(fmnist_test, n_classes)
    entry = evaluate(Linear(n_classes), x, y, suite="standard", eps=0.01).entry
    stages = {s["name"]: s for s in entry["attacks"]}
    assert stages["apgd-t"]["n_target_classes"] == targets
    assert stages["fab-t"]["n_target_classes"] == targets


@pytest.mark.parametrize("n_classes", [2, 3])
def test_case12_two_and_three_classes(fmnist_test, n_classes):
    x, y = _few_class_points(fmnist_test, n_classes)
    entry = evaluate(Linear(n_classes), x, y, suite="standard", eps=0.01).entry
    stages = {s["name"]: s for s in entry["attacks"]}
    assert stages["apgd-t"]["substitute"] == "apgd-ce"
    assert "substitute-loss:apgd-t" in entry["flags"]
    assert stages["fab-t"]["n_target_classes"] == n_classes - 1


def test_case13_clean_mistakes_are_not_robust(trained_tiny, fmnist_test):
    x, y = fmnist_test[0][:100], fmnist_test[1][:100].clone()
    pred = trained_tiny(x).argmax(1)
    y[:50] = (pred[:50] + 1) % 10  # the model now gets the first half wrong
    result = evaluate(trained_tiny, x, y, eps=0.05)
    entry, per = result.entry, result.per_example
    assert not per["robust"][:50].any()
    assert entry["robust_acc"] <= entry["clean_acc"] <= 50.0
    n_correct = entry["n_clean_correct"]
    assert n_correct == int(per["clean_correct"].sum())
    broken = n_correct - int(per["robust"].sum())
    assert entry["attack_success_rate"] == pytest.approx(100 * broken / n_correct)


def test_randomized_model_flagged_and_decided_by_majority(trained_tiny, fmnist_test):
    class Noisy(nn.Module):
        def forward(self, x):
            return trained_tiny(x) + 0.01 * torch.randn(x.shape[0], 10)

    x, y = fmnist_test[0][:30], fmnist_test[1][:30]
    entry = evaluate(Noisy(), x, y, suite="quick").entry
    assert "randomized" in entry["flags"] and entry["number_forward_passes"] == 10
    # Tiny noise: the majority vote gives the deterministic model's clean accuracy.
    assert entry["clean_acc"] == evaluate(trained_tiny, x, y, suite="quick").entry["clean_acc"]


def test_state_change_flagged_and_restored(trained_tiny, fmnist_test):
    class Drifting(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls += 1
            return trained_tiny(x)

    model = Drifting()
    entry = evaluate(model, fmnist_test[0][:10], fmnist_test[1][:10]).entry
    assert "model-state-changed" in entry["flags"] and model.calls.item() == 0


def test_majority_scorer():
    class Flip(nn.Module):
        calls = 0

        def forward(self, x):
            Flip.calls += 1
            out = torch.zeros(x.shape[0], 3)
            out[:, 1 if Flip.calls % 3 else 2] = 1.0  # class 1 twice out of three passes
            return out

    pred, finite = _Scorer(Flip(), passes=9)(torch.zeros(4, 2))
    assert pred.tolist() == [1, 1, 1, 1] and finite.all()


def test_every_flag_documented():
    for flag in FLAGS:
        assert len(describe(flag)) > 40
    assert describe("out-of-budget:fgsm") == FLAGS["out-of-budget"]
    with pytest.raises(ValueError, match="unknown flag"):
        describe("fine")
    assert math.isfinite(len(FLAGS))


def test_batch_statistics_refused(trained_tiny, fmnist_test):
    class BatchCentered(nn.Module):
        def forward(self, x):
            return trained_tiny(x - x.mean(0, keepdim=True) + 0.5)

    with pytest.raises(ContractError, match="must not depend on batch size or contents"):
        evaluate(BatchCentered(), fmnist_test[0][:20], fmnist_test[1][:20])
