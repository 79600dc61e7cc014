"""Paired comparison: two models trained differently on real points, and the refusals."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from robustbench_alm.cli import main
from robustbench_alm.compare import check_comparable, compare, load_entries
from robustbench_alm.entry import read_entry, write_entry
from robustbench_alm.evaluation import run_evaluation
from robustbench_alm.per_example import build_frame, examples_path, write_examples
from robustbench_alm.robustbench_io import from_model_info
from tests.conftest import TinyCNN
from tests.test_per_example import make_arrays, write_evaluated

EPS = 0.1


def _hand_mcnemar(b: int, c: int) -> float:
    """Two-sided exact binomial test of b successes in b + c fair coin flips, by hand."""
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def _fgsm_trained(fmnist_train) -> nn.Module:
    """TinyCNN trained on FGSM examples at eps 0.1: the same real points, another objective.

    One pass over the first 2000 training points (seconds on a CPU).
    """
    torch.manual_seed(1)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = fmnist_train[0][:2000], fmnist_train[1][:2000]
    for i in range(0, x.shape[0], 100):
        xb, yb = x[i:i + 100], y[i:i + 100]
        xb_req = xb.clone().requires_grad_(True)
        grad, = torch.autograd.grad(nn.functional.cross_entropy(model(xb_req), yb), xb_req)
        x_adv = (xb + 0.1 * grad.sign()).clamp(0, 1)
        loss = nn.functional.cross_entropy(model(x_adv), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _save(result, root, split="test"):
    """Write an evaluation the way ``robustbench-alm evaluate`` does: entry, then its rows."""
    path = write_entry(root, result.entry)
    arrays = {k: v.numpy() for k, v in result.per_example.items()}
    n = result.entry["n_examples"]
    write_examples(examples_path(path), build_frame(arrays, dataset=result.entry["dataset"],
                                                    split=split, indices=range(n)))
    return path


def test_two_models_on_real_points(tmp_path, trained_tiny, fmnist_train, capsys):
    """Standard vs FGSM training, PGD-20 on the same 200 real Fashion-MNIST test points."""
    models = {"standard": trained_tiny, "fgsm-at": _fgsm_trained(fmnist_train)}
    results = {name: run_evaluation(model, dataset="fashion-mnist", n_examples=200, eps=EPS,
                                    suite="pgd-20", margins=False, progress=False,
                                    entry_id=name, name=name)
               for name, model in models.items()}
    paths = [_save(results[name], tmp_path) for name in models]

    # The 2x2 table of robust flags, counted by hand from the harness's own tensors.
    a, b = results["standard"].per_example["robust"], results["fgsm-at"].per_example["robust"]
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    assert only_a + only_b > 10, "the two models should disagree on some points"

    out = tmp_path / "comparison.json"
    assert main(["compare", *map(str, paths), "--json", str(out), "--bootstrap", "2000"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    pair = result["pairs"][0]
    assert (pair["first_only"], pair["second_only"]) == (only_a, only_b)
    assert pair["p_value"] == pytest.approx(_hand_mcnemar(only_a, only_b), rel=1e-12)
    assert result["n_examples"] == 200
    for model, name in zip(result["models"], models):
        assert model["robust_acc"] == pytest.approx(results[name].entry["robust_acc"])
        assert model["robust_ci"]["low"] <= model["robust_acc"] <= model["robust_ci"]["high"]
    # FGSM training at eps 0.1 buys robustness at that eps that 200 points can show.
    assert pair["p_value"] < 0.01 and pair["difference"] < 0
    assert "fgsm-at is more robust than standard" in printed


def _two(tmp_path, first=None, second=None, arrays_a=None, arrays_b=None):
    a = write_evaluated(tmp_path / "a", "a", arrays_a or make_arrays(seed=0), **(first or {}))
    b = write_evaluated(tmp_path / "b", "b", arrays_b or make_arrays(seed=1), **(second or {}))
    return [a, b]


@pytest.mark.parametrize("second, named", [
    ({"eps": 0.2}, "eps: a has 0.1, b has 0.2"),
    ({"suite": {"name": "standard", "sha256": "e" * 64, "attacks": ["apgd-ce"]}},
     "suite (name and sha256)"),
    ({"threat_model": "L2"}, "threat model"),
])
def test_refuses_entries_evaluated_differently(tmp_path, second, named):
    paths = _two(tmp_path, second=second)
    with pytest.raises(ValueError, match="differ") as err:
        load_entries(paths)
    assert named in str(err.value)
    assert "dataset" not in str(err.value)  # only what differs is named


def test_refuses_other_example_set(tmp_path, capsys):
    paths = _two(tmp_path)
    other = write_evaluated(tmp_path / "c", "c", make_arrays(seed=2),
                            indices=range(100, 140))
    assert main(["compare", str(paths[0]), str(other)]) == 2
    err = capsys.readouterr().err
    assert "example set (indices sha256)" in err and "Traceback" not in err


def test_refuses_reported_and_repeated(tmp_path):
    reported = from_model_info(
        {"name": "r", "authors": "", "link": "", "architecture": "x", "dataset": "fashion-mnist",
         "eps": "0.1", "clean_acc": "80", "autoattack_acc": "50", "reported": "55",
         "additional_data": False, "number_forward_passes": 1, "venue": ""},
        threat_model="Linf", entry_id="r")
    evaluated = read_entry(_two(tmp_path)[0])
    with pytest.raises(ValueError, match="reported, not evaluated here"):
        check_comparable([evaluated, reported])
    with pytest.raises(ValueError, match="more than once"):
        check_comparable([evaluated, evaluated])
    with pytest.raises(ValueError, match="at least two"):
        check_comparable([evaluated])


def test_verdict_says_not_significant(tmp_path):
    # Identical flags except 3 vs 2 disagreements: p = 1, and the verdict says so.
    arrays = make_arrays(n=200, seed=4)
    other = {k: v.copy() for k, v in arrays.items()}
    robust = np.flatnonzero(arrays["robust"])
    fragile = np.flatnonzero(arrays["clean_correct"] & ~arrays["robust"])
    other["robust"][robust[:3]] = False
    other["robust"][fragile[:2]] = True
    paths = _two(tmp_path, arrays_a=arrays, arrays_b=other)
    entries, frames = load_entries(paths)
    result = compare(entries, frames, n_bootstrap=500)
    pair = result.pairs[0]
    assert (pair.first_only, pair.second_only) == (3, 2)
    assert pair.p_value == pytest.approx(_hand_mcnemar(pair.first_only, pair.second_only))
    assert not pair.significant
    assert pair.verdict.startswith("not significant at the 5% level")
    assert 0.0 in pair.difference_ci


def test_three_entries_are_holm_adjusted(tmp_path):
    paths = _two(tmp_path)
    paths.append(write_evaluated(tmp_path / "c", "c", make_arrays(seed=5)))
    entries, frames = load_entries(paths)
    result = compare(entries, frames, n_bootstrap=200)
    assert [(p.first, p.second) for p in result.pairs] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert all(p.p_adjusted >= p.p_value for p in result.pairs)
    assert "Holm-adjusted" in result.pairs[0].verdict


def test_verdict_warns_when_bootstrap_and_exact_test_disagree(tmp_path):
    # 0 vs 5 disagreements: exact p = 2 / 32 = 0.0625, yet every resample has B ahead.
    arrays = make_arrays(n=200, seed=4)
    other = {k: v.copy() for k, v in arrays.items()}
    other["robust"][np.flatnonzero(arrays["clean_correct"] & ~arrays["robust"])[:5]] = True
    entries, frames = load_entries(_two(tmp_path, arrays_a=arrays, arrays_b=other))
    pair = compare(entries, frames, n_bootstrap=500).pairs[0]
    assert pair.p_value == 0.0625 and not pair.significant
    assert 0.0 not in pair.difference_ci
    assert "trust the exact test" in pair.verdict
