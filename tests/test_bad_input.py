"""Bad input found by trying to break the tool: each is refused early with a clear message,
or gives the right number."""

import json

import pytest
import torch
from torch import nn

from robustbench_alm.attacks import Budget, build_attack, resolve_step_size
from robustbench_alm.cli import main
from robustbench_alm.entry import EntryError, iter_entries, validate_entry, write_entry
from robustbench_alm.evaluation import run_evaluation
from robustbench_alm.margins import summarize
from robustbench_alm.suites import AttackSpec, load_suite
from robustbench_alm.threat import ThreatModel, eps_label, eps_text
from robustbench_alm.training import TrainConfig, load_checkpoint, save_checkpoint
from tests.conftest import TinyCNN
from tests.test_entry import make_entry

LINF = Budget(ThreatModel.LINF, 0.1)


def quiet(model, x, y, **kwargs):
    kwargs.setdefault("suite", "pgd-20")
    kwargs.setdefault("margins", False)
    return run_evaluation(model, x, y, progress=False, **kwargs)


def test_robust_above_clean_is_not_a_valid_entry(tmp_path):
    with pytest.raises(EntryError, match="exceeds clean_acc"):
        validate_entry(make_entry(clean_acc=10.0, robust_acc=90.0, autoattack_acc=None,
                                  attacks=[]))
    with pytest.raises(EntryError, match="exceeds the accuracy before that stage"):
        validate_entry(make_entry(attacks=[
            {"name": "a", "robust_acc": 50.0, "n_broken": 1, "seconds": 1.0},
            {"name": "b", "robust_acc": 61.2, "n_broken": 0, "seconds": 1.0}]))


def test_misfiled_entry_refused(tmp_path):
    path = write_entry(tmp_path, make_entry())
    wrong = tmp_path / "fashion-mnist" / "L2" / path.name
    wrong.parent.mkdir()
    path.rename(wrong)
    with pytest.raises(EntryError, match="filed in the wrong place"):
        iter_entries(tmp_path)


def test_given_points_are_not_the_first_n(trained_tiny, fmnist_test):
    x, y = fmnist_test[0][:20], fmnist_test[1][:20]
    first_n = quiet(trained_tiny, None, None, n_examples=20, eps=0.05).entry
    given = quiet(trained_tiny, x.flip(-1), y, eps=0.05).entry
    same = quiet(trained_tiny, x.flip(-1).clone(), y.clone(), eps=0.05).entry
    assert given["examples"]["indices_sha256"] != first_n["examples"]["indices_sha256"]
    assert given["examples"]["indices_sha256"] == same["examples"]["indices_sha256"]


def test_wrong_dataset_for_given_points(trained_tiny, fmnist_test):
    with pytest.raises(ValueError, match="do not match dataset cifar10"):
        quiet(trained_tiny, fmnist_test[0][:4], fmnist_test[1][:4], eps=0.05,
              dataset="cifar10")


def test_randomized_model_at_eps_zero_keeps_clean_accuracy(trained_tiny, fmnist_test):
    class Noisy(nn.Module):
        def forward(self, x):
            logits = trained_tiny(x)
            return logits + 3 * torch.randn_like(logits)

    entry = quiet(Noisy(), fmnist_test[0][:30], fmnist_test[1][:30], eps=0.0).entry
    assert "randomized" in entry["flags"]
    assert entry["robust_acc"] == entry["clean_acc"]


@pytest.mark.parametrize("x, message", [
    (torch.zeros(0, 1, 28, 28), "at least one input"),
    (torch.full((2, 1, 28, 28), float("nan")), "NaN"),
])
def test_bad_inputs(trained_tiny, x, message):
    with pytest.raises(ValueError, match=message):
        quiet(trained_tiny, x, torch.zeros(x.shape[0], dtype=torch.long), eps=0.1)


@pytest.mark.parametrize("kwargs, message", [
    ({"margin_steps": 0}, "margin_steps"),
    ({"seed": 2 ** 64}, "seed"),
    ({"weights_sha256": "xyz"}, "weights_sha256"),
    ({"training": {"foo": 1}}, "training"),
])
def test_bad_settings_refused_before_attacking(trained_tiny, fmnist_test, kwargs, message):
    with pytest.raises(ValueError, match=message):
        quiet(trained_tiny, fmnist_test[0][:4], fmnist_test[1][:4], eps=0.1, **kwargs)


def test_eps_as_text_or_tensor(trained_tiny, fmnist_test):
    x, y = fmnist_test[0][:10], fmnist_test[1][:10]
    assert quiet(trained_tiny, x, y, eps="8/255").entry["eps_text"] == "8/255"
    assert quiet(trained_tiny, x, y, eps=torch.tensor(0.1)).entry["eps"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="torch.nn.Module"):
        quiet(lambda t: trained_tiny(t), x, y, eps=0.1)


@pytest.mark.parametrize("spec, message", [
    (AttackSpec("p", "pgd", {"steps": 0}), "steps must be an integer >= 1"),
    (AttackSpec("p", "pgd", {"step_size": -0.1}), "positive"),
    (AttackSpec("p", "pgd", {"step_size": "eps/0"}), "K > 0"),
    (AttackSpec("p", "pgd", {"random_start": "no"}), "true or false"),
    (AttackSpec("s", "square", {"n_queries": 0}), "n_queries"),
    (AttackSpec("a", "apgd-ce", {"eot_iter": 0}), "eot_iter"),
    (AttackSpec("f", "foolbox", {"attack": "L2PGD"}), "L2 norm"),
])
def test_attack_parameters_that_would_do_nothing(spec, message):
    with pytest.raises(ValueError, match=message):
        build_attack(spec, LINF)


@pytest.mark.parametrize("body, message", [
    ('[[attack]]\nkind = "pgd"\n', "needs a name"),
    ('[[attack]]\nname = "my stage"\nkind = "pgd"\n', "needs a name of letters"),
    ('attack = [1, 2]\n', "must be a \\[\\[attack\\]\\] table"),
    ('threat_models = "Linf"\n[[attack]]\nname = "a"\nkind = "fgsm"\n', "non-empty list"),
])
def test_malformed_suites(tmp_path, body, message):
    path = tmp_path / "s.toml"
    path.write_text(body)
    with pytest.raises(ValueError, match=message):
        load_suite(str(path))


def test_step_size_text_numbers():
    assert resolve_step_size("0.01", 0.3) == 0.01


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "pgd-at", "pgd_steps": 0}, "pgd_steps >= 1"),
    ({"method": "amo", "amo_eta": -1.0}, "amo_eta"),
    ({"trades_beta": -5.0}, "trades_beta"),
    ({"eps_warmup_epochs": float("nan")}, "eps_warmup_epochs"),
    ({"milestones": (3,), "lr_schedule": "cosine"}, "multistep"),
    ({"milestones": (9,), "lr_schedule": "multistep", "epochs": 5}, "1..5"),
])
def test_training_configs_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_broken_checkpoints(tmp_path):
    cfg = TrainConfig()
    from robustbench_alm.models import create_model

    path = save_checkpoint(create_model("cnn-small"), tmp_path / "m.safetensors", cfg)
    with pytest.raises(ValueError, match="do not fit preact-resnet18"):
        load_checkpoint(path, architecture="preact-resnet18")
    card = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**card, "num_classes": 100}))
    with pytest.raises(ValueError, match="do not fit cnn-small"):
        load_checkpoint(path)
    path.with_suffix(".json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_checkpoint(path)
    path.with_suffix(".json").write_text(json.dumps(card))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_checkpoint(path)


def test_margin_mean_needs_every_point():
    assert summarize(torch.tensor([0.0, 0.2, float("inf")]), "x")["mean"] is None
    assert summarize(torch.tensor([0.0, 0.2]), "x")["mean"] == pytest.approx(0.1)


def test_eps_labels():
    assert eps_text(0.99999) != "255/255"
    assert eps_label(0.5, ThreatModel.L2) == "0.5"
    assert eps_label(8 / 255, ThreatModel.LINF) == "8/255"


def test_cli_errors_exit_2(tmp_path, capsys):
    bad = tmp_path / "idx.json"
    bad.write_text("[true, 1]")
    model = tmp_path / "m.safetensors"
    from robustbench_alm.models import create_model

    save_checkpoint(create_model("cnn-small"), model, TrainConfig())
    assert main(["evaluate", str(model), "--eps", "0.1", "--indices-file", str(bad)]) == 2
    assert "non-empty JSON list of integers" in capsys.readouterr().err
    assert main(["leaderboard", "--dir", str(tmp_path / "typo")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--device", "bogus", "--train-subset", "10"]) == 2
    assert "device 'bogus'" in capsys.readouterr().err


def test_import_never_overwrites_an_evaluated_entry(tmp_path, capsys):
    lb = tmp_path / "lb"
    write_entry(lb, make_entry(entry_id="m"))
    records = tmp_path / "mi" / "fashion-mnist" / "Linf"
    records.mkdir(parents=True)
    (records / "m.json").write_text(json.dumps({
        "link": "", "name": "m", "authors": "", "additional_data": False,
        "number_forward_passes": 1, "dataset": "fashion-mnist", "venue": "",
        "architecture": "cnn", "eps": "0.1", "clean_acc": "90.0", "reported": "80.0",
        "autoattack_acc": "80.0", "footnote": None}))
    assert main(["import-robustbench", str(tmp_path / "mi"), "--dir", str(lb)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert json.loads((lb / "fashion-mnist" / "Linf" / "m.json").read_text())["robust_acc"] \
        == 61.2


def test_tiny_cnn_import():
    assert TinyCNN()(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
