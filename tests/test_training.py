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
