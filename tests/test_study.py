"""The study runner end to end on a tiny configuration, its resumption, its configuration
errors, the t interval it reports, and the paper's CIFAR-10 configuration for two batches."""

import json
import math
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from robustbench_alm.stats import t_interval, t_quantile
from robustbench_alm.study import load_study_config, run_study

STUDY_DIR = Path(__file__).resolve().parent.parent / "studies" / "all-layer-margin"


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                     *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_data(tmp_path):
    """Learnable 28x28 data in IDX files: each class lights its own band of rows."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "data"
    folder.mkdir()
    for prefix, n in (("train", 400), ("t10k", 60)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, label in enumerate(labels):
            images[i, 2 * label + 4:2 * label + 7, 4:24] += 180
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
    return folder


def _tiny_study(tmp_path) -> Path:
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "study.toml").write_text(f"""
name = "tiny"
description = "A smoke test."
dataset = "fashion-mnist"
architecture = "cnn-small"
methods = ["standard", "amo"]
seeds = [0, 1]
entry_prefix = "tiny"
leaderboard_dir = "{(tmp_path / 'board').as_posix()}"
runs_dir = "{(tmp_path / 'runs').as_posix()}"
sweep = "sweep.toml"

[[pair]]
method = "amo"
baseline = "standard"

[[claim]]
text = "AMO improves clean accuracy"
method = "amo"
baseline = "standard"
metric = "clean_acc"

[train]
epochs = 1
batch_size = 64
train_subset = 256
lr = 0.003
amo_eta = 0.002

[evaluation]
n_examples = 20
pgd_suite = "pgd-20"
autoattack_suite = "quick"
margin_steps = 8
margin_train_examples = 16
batch_size = 20
bootstrap = 200
""")
    (tmp_path / "study" / "sweep.toml").write_text("""
seed = 0
validation_start = 300
validation_examples = 20
suite = "pgd-20"

[[method]]
name = "amo"
amo_eta = [0.002, 0.008]
amo_steps = [1]
""")
    return tmp_path / "study" / "study.toml"


def test_tiny_study_writes_results_entries_and_resumes(tmp_path, idx_data):
    config = load_study_config(_tiny_study(tmp_path))
    start = time.time()
    results = run_study(config, data_dir=idx_data, progress=False)
    first = time.time() - start

    text = results.read_text()
    for heading in ("## What holds at this scale", "## Per method", "## Paired differences",
                    "## Every model", "## Plots", "## Sensitivity of AMO", "## Caveats"):
        assert heading in text, heading
    assert "AMO improves clean accuracy" in text
    assert any(word in text for word in ("**holds", "**inconclusive", "**does not hold"))
    assert str(tmp_path) not in text, "RESULTS.md must hold no machine paths"
    for method in ("standard", "amo"):
        for seed in (0, 1):
            entry = tmp_path / "board" / "fashion-mnist" / "Linf" / f"tiny-{method}-s{seed}.json"
            data = json.loads(entry.read_text())
            assert data["suite"]["name"] == "quick" and data["n_examples"] == 20
            assert data["margins"]["all_layer"]["n"] == 20
            assert (tmp_path / "study" / "entries" / "fashion-mnist" / "Linf"
                    / f"tiny-{method}-s{seed}-pgd-20.json").is_file()
            record = json.loads((tmp_path / "study" / "models"
                                 / f"tiny-{method}-s{seed}.json").read_text())
            assert record["alm_train"]["n"] == 16 and record["train_seconds"] > 0
    assert (tmp_path / "study" / "plots" / "summary.png").is_file()
    assert (tmp_path / "study" / "plots" / "amo-vs-standard-margins.png").is_file()
    assert (tmp_path / "board" / "README.md").is_file()
    sweep = sorted(p.name for p in (tmp_path / "study" / "sweep").glob("*.json"))
    assert sweep == ["amo-eta0.002-t1-s0.json", "amo-eta0.008-t1-s0.json"]
    # The sweep's default point is the study's own seed-0 model, not a second training.
    assert not list((tmp_path / "runs").glob("*sweep*eta0.002*"))

    # A second run finds every model done and only rewrites the report.
    stamp = (tmp_path / "runs" / "tiny-amo-s1.safetensors").stat().st_mtime_ns
    start = time.time()
    run_study(config, data_dir=idx_data, progress=False)
    assert time.time() - start < first / 2
    assert (tmp_path / "runs" / "tiny-amo-s1.safetensors").stat().st_mtime_ns == stamp


def test_changed_training_setting_retrains(tmp_path, idx_data):
    path = _tiny_study(tmp_path)
    overrides = {"methods": ["standard"], "seeds": [0], "sweep": ""}
    config = load_study_config(path, overrides)
    run_study(config, data_dir=idx_data, progress=False)
    record = tmp_path / "study" / "models" / "tiny-standard-s0.json"
    before = json.loads(record.read_text())["weights_sha256"]
    config = load_study_config(path, {**overrides, "train.lr": 0.001})
    run_study(config, data_dir=idx_data, progress=False)
    after = json.loads(record.read_text())
    assert after["weights_sha256"] != before and after["hyperparameters"]["lr"] == 0.001


@pytest.mark.parametrize("overrides, message", [
    ({"methods": ["standard", "fgsm"]}, "methods must be distinct names"),
    ({"train.method": "amo"}, "belong at the top level"),
    ({"train.epoch": 3}, "unknown keys \\['epoch'\\]"),
    ({"train.lr": -1.0}, "lr must be a positive number"),
    ({"evaluation.suites": "x"}, "unknown keys \\['suites'\\]"),
    ({"sweep.validation_start": 100}, "overlap the training subset"),
    ({"seeds": [0, 0]}, "repeats a value"),
])
def test_bad_study_config_named(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_study_config(_tiny_study(tmp_path), overrides)


def test_shipped_study_files_parse():
    config = load_study_config(STUDY_DIR / "study.toml")
    assert config.methods == ["standard", "amo", "pgd-at", "amo-pgd", "trades"]
    assert len(config.seeds) >= 3 and config.evaluation["n_examples"] >= 1000
    # One budget for every method: the same settings apart from the method itself.
    budgets = {json.dumps({k: v for k, v in config.train_config(m, 0).to_dict().items()
                           if k != "method"}, sort_keys=True) for m in config.methods}
    assert len(budgets) == 1
    assert config.sweep is not None and config.sweep.validation_start >= \
        config.train["train_subset"]


def test_t_interval_matches_tables():
    # Student t quantiles from printed tables.
    for df, expected in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)):
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    mean, ci = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and ci.high - 2.0 == pytest.approx(4.3027 / math.sqrt(3), abs=1e-4)
    assert t_interval([5.0])[1].low == -math.inf
    with pytest.raises(ValueError, match="finite"):
        t_interval([1.0, float("nan")])


# ---------------------------------------------------------------------------------------------
# The paper's CIFAR-10 configuration, for two batches on the CPU.


def _paper_smoke(arch: str, methods=("standard", "amo")):
    from robustbench_alm.training import train

    config = load_study_config(STUDY_DIR / "cifar10-paper.toml", {"architecture": arch})
    # CIFAR-shaped random images: the configuration's real batch size of 128, two batches.
    gen = torch.Generator().manual_seed(0)
    data = (torch.rand(256, 3, 32, 32, generator=gen),
            torch.randint(0, 10, (256,), generator=gen))
    for method in methods:
        cfg = config.train_config(method, 0, max_steps=2)
        model, history = train(cfg, data=data, progress=False)
        assert len(history["epochs"]) == 1 and math.isfinite(history["epochs"][0]["loss"])
        assert model(data[0][:2]).shape == (2, 10)
    return config


def test_paper_config_runs_two_batches():
    config = _paper_smoke("wrn-10-1")
    cfg = config.train_config("amo", 0)
    # The released code's settings, as the README of the study quotes them.
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay) == \
        ("sgd", 0.1, 0.9, True, 5e-4)
    assert (cfg.epochs, cfg.batch_size, cfg.milestones, cfg.lr_gamma, cfg.augment) == \
        (200, 128, (60, 120, 150), 0.2, True)
    assert cfg.amo_eta == pytest.approx(0.01 / 128) and cfg.amo_steps == 1
    assert config.architecture == "wrn-10-1"
    assert load_study_config(STUDY_DIR / "cifar10-paper.toml").architecture == "wrn-16-10"


@pytest.mark.slow
def test_paper_config_real_architecture_two_batches():
    _paper_smoke("wrn-16-10", methods=("amo",))


def test_study_command_refuses_missing_device(tmp_path):
    from robustbench_alm.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal cannot be shown here")
    code = main(["study", str(_tiny_study(tmp_path)), "--device", "cuda", "--quiet"])
    assert code == 2
