"""Shared fixtures: tiny models and real Fashion-MNIST points, all on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustbench_alm.data import DataNotFoundError, load_dataset


class TwoLayer(nn.Module):
    """Linear -> ReLU -> Linear, small enough to differentiate by hand."""

    def __init__(self, d_in: int = 3, d_hidden: int = 4, n_classes: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, n_classes)
        self.perturbation_points = ["fc1", "fc2"]

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class TinyCNN(nn.Module):
    """A 28x28 classifier with a few thousand weights."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 5, stride=2)
        self.fc = nn.Linear(8 * 12 * 12, n_classes)
        self.perturbation_points = ["conv", "fc"]

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="session")
def fmnist_test():
    """The first 1000 real Fashion-MNIST test points (skips when no copy is on this machine)."""
    try:
        x, y = load_dataset("fashion-mnist", "test", download=False)
    except DataNotFoundError as err:
        pytest.skip(f"Fashion-MNIST is not on this machine: {err}")
    return x[:1000], y[:1000]


@pytest.fixture(scope="session")
def fmnist_train():
    try:
        x, y = load_dataset("fashion-mnist", "train", download=False)
    except DataNotFoundError as err:
        pytest.skip(f"Fashion-MNIST is not on this machine: {err}")
    return x[:4000], y[:4000]


@pytest.fixture(scope="session")
def trained_tiny(fmnist_train):
    """TinyCNN trained for two epochs on 4000 real points: about 75% test accuracy."""
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = fmnist_train
    for _ in range(2):
        for i in range(0, x.shape[0], 100):
            loss = nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
