"""The command line end to end on a few hundred real Fashion-MNIST images."""

import json
import subprocess
import sys

import pytest

from robustbench_alm.cli import main
from robustbench_alm.entry import read_entry
from robustbench_alm.per_example import read_examples


def test_train_evaluate_leaderboard(tmp_path, capsys, fmnist_test):
    ckpt = tmp_path / "tiny.safetensors"
    lb = tmp_path / "lb"
    assert main(["train", "--method", "amo-pgd", "--train-subset", "600", "--epochs", "2",
                 "--batch-size", "50", "--pgd-steps", "2", "--lr", "3e-3",
                 "--eps-warmup-epochs", "1",
                 "--out", str(ckpt), "--quiet"]) == 0
    card = json.loads(ckpt.with_suffix(".json").read_text())
    assert card["training"]["method"] == "amo-pgd" and card["architecture"] == "cnn-small"

    assert main(["evaluate", str(ckpt), "--eps", "0.1", "--suite", "quick",
                 "--n-examples", "200", "--margin-steps", "10", "--leaderboard-dir", str(lb),
                 "--quiet"]) == 0
    entry = read_entry(lb / "fashion-mnist" / "Linf" / "tiny.json")
    assert entry["n_examples"] == 200 and entry["examples"]["selection"] == "first-n"
    assert entry["training"]["hyperparameters"]["pgd_steps"] == 2
    assert entry["weights_sha256"] == card["weights_sha256"]
    assert 0 <= entry["robust_acc"] <= entry["clean_acc"] and entry["clean_acc"] > 30
    assert entry["margins"]["all_layer"]["n"] == 200

    # The per-example results beside the entry, one row per evaluated point.
    rows = read_examples(lb / "fashion-mnist" / "Linf" / "tiny.examples.parquet", entry)
    assert list(rows["index"]) == list(range(200))
    assert rows["input_space_distance"].notna().all()

    site = tmp_path / "site"
    assert main(["leaderboard", "--dir", str(lb), "--html", str(site),
                 "--csv", str(tmp_path / "lb.csv"), "--plots", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "## fashion-mnist, Linf" in out and "tiny" in out
    assert (lb / "README.md").read_text() in out
    assert (site / "entries" / "fashion-mnist" / "Linf" / "tiny.html").is_file()
    assert (tmp_path / "plots" / "fashion-mnist-Linf-tiny-robustness.svg").is_file()
    assert "tiny" in (tmp_path / "lb.csv").read_text()


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing.safetensors"), "--eps", "0.1"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "x.safetensors", "--eps", "eight"])
    assert "cannot read eps 'eight'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--method", "magic"])
    assert "invalid choice: 'magic'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "evaluate", "leaderboard", "compare",
                                     "import-robustbench", "export-robustbench"])
def test_help(command):
    out = subprocess.run([sys.executable, "-m", "robustbench_alm.cli", command, "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "example" in out
    assert "usage: robustbench-alm" in out


def test_evaluate_never_silently_replaces_another_evaluation(tmp_path, capsys):
    from robustbench_alm.models import create_model
    from robustbench_alm.training import TrainConfig, save_checkpoint

    ckpt = save_checkpoint(create_model("cnn-small"), tmp_path / "m.safetensors", TrainConfig())
    common = [str(ckpt), "--eps", "0.1", "--n-examples", "20", "--no-margins", "--quiet",
              "--leaderboard-dir", str(tmp_path / "lb")]
    assert main(["evaluate", *common, "--suite", "pgd-20"]) == 0
    assert main(["evaluate", *common, "--suite", "pgd-20"]) == 0  # a re-run replaces itself
    capsys.readouterr()
    assert main(["evaluate", *common, "--suite", "quick"]) == 2
    assert "another suite" in capsys.readouterr().err
    entry = read_entry(tmp_path / "lb" / "fashion-mnist" / "Linf" / "m.json")
    assert entry["suite"]["name"] == "pgd-20"
    assert main(["evaluate", *common, "--suite", "quick", "--force"]) == 0


MODELS_FILE = '''
import torch
from torch import nn


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


class Softmaxed(Base):
    def forward(self, x):
        return super().forward(x).softmax(1)


class Pair(Base):
    def forward(self, x):
        return super().forward(x), x


class Offset(Base):
    def forward(self, x):
        return super().forward(x) + 1e10


class NaNOnDark(Base):
    def forward(self, x):
        logits = super().forward(x)
        return torch.where(x.flatten(1).mean(1, keepdim=True) < 0.25, float("nan"), logits)
'''


@pytest.mark.parametrize("factory, extra, code, expect", [
    ("Softmaxed", [], 0, "probability-outputs"),
    ("NaNOnDark", [], 0, "non-finite-logits"),
    ("Pair", [], 2, "Pass output=<index or key> (CLI: --output)"),
    ("Pair", ["--output", "0"], 0, "output_selector=0"),
    ("Offset", [], 2, "float32 cannot tell classes apart"),
])
def test_evaluate_models_that_fool_other_tools(tmp_path, capsys, fmnist_test, factory, extra,
                                               code, expect):
    """On the command line too, each ends in an entry with the right flag or a clear error."""
    models = tmp_path / "models.py"
    models.write_text(MODELS_FILE)
    args = ["evaluate", "--model-factory", f"{models}:{factory}", "--eps", "0.1",
            "--suite", "pgd-20", "--no-margins", "--quiet", "--leaderboard-dir",
            str(tmp_path / "lb"), "--n-examples", "30", *extra]
    assert main(args) == code
    captured = capsys.readouterr()
    if code == 2:
        assert expect in captured.err
        assert "Traceback" not in captured.err
        return
    entry = read_entry(tmp_path / "lb" / "fashion-mnist" / "Linf" / f"{factory}.json")
    if expect.startswith("output_selector"):
        assert entry["output_selector"] == 0
    else:
        assert expect in entry["flags"]
