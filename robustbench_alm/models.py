"""The architecture registry: models by name, each declaring its perturbation points.

A perturbation point is a submodule whose output receives an all-layer perturbation (see
:mod:`robustbench_alm.perturbation`). Every architecture lists its points in the attribute
``perturbation_points`` (dotted submodule names, in forward order), so training and margin
estimation never guess where the hidden layers are.

Names: ``cnn-small`` (28x28 inputs), ``preact-resnet18``, and ``wrn-D-K`` for any WideResNet
with depth D = 6n + 4 and widen factor K (``wrn-16-4``, ``wrn-28-10``, ``wrn-34-10``...).
Inputs are in [0, 1]; a model that wants normalized inputs normalizes inside its forward.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["create_model", "available_models", "register_model", "perturbation_points",
           "GradientMasked"]

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_WRN_NAME = re.compile(r"^wrn-(\d+)-(\d+)$")


def register_model(name: str) -> Callable:
    """Register a model factory under ``name``; a second use of a name is an error."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return wrap


def available_models() -> list[str]:
    """Registered names; ``wrn-D-K`` stands for the whole WideResNet family."""
    return sorted(_REGISTRY) + ["wrn-D-K"]


def create_model(name: str, *, num_classes: int = 10, in_channels: int | None = None,
                 **kwargs: Any) -> nn.Module:
    """Build the architecture registered as ``name``.

    Raises:
        ValueError: for an unknown name or an impossible WideResNet depth.
    """
    match = _WRN_NAME.match(name)
    if match:
        depth, widen = int(match.group(1)), int(match.group(2))
        return WideResNet(depth, widen, num_classes=num_classes,
                          in_channels=in_channels or 3, **kwargs)
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown architecture {name!r}; expected one of {', '.join(available_models())}"
        )
    if in_channels is not None:
        kwargs["in_channels"] = in_channels
    return _REGISTRY[name](num_classes=num_classes, **kwargs)


def perturbation_points(model: nn.Module) -> list[str]:
    """The perturbation points a model declares, checked against its submodules."""
    points = getattr(model, "perturbation_points", None)
    if not points:
        raise ValueError(
            f"{type(model).__name__} declares no perturbation points; set its attribute "
            "perturbation_points to a list of submodule names (e.g. ['conv1', 'fc1'])"
        )
    names = dict(model.named_modules())
    missing = [p for p in points if p not in names]
    if missing:
        raise ValueError(f"{type(model).__name__} declares unknown perturbation points {missing}")
    return list(points)


class Normalize(nn.Module):
    """Per-channel normalization inside the model, so attacks see inputs in [0, 1]."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class _ZeroBackward(torch.autograd.Function):
    """Identity forward, zero backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


class GradientMasked(nn.Module):
    """A defense that only hides gradients: the wrapped model's predictions, zero input gradient.

    It is here to test evaluations, not to be used: every gradient attack sees a flat loss, and
    only a black-box stage can show how robust the wrapped model really is.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(_ZeroBackward.apply(x))


class CNNSmall(nn.Module):
    """Two convolutions and two linear layers for 28x28 inputs (0.2 M parameters at width 16).

    Every layer with weights is a perturbation point, as in the all-layer margin's definition.
    Sized so that AutoAttack's standard suite on 500 points runs in minutes on 2 CPU cores; the
    convolutions run in channels-last layout, which oneDNN computes faster on CPUs.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 7 * 7, 128)
        self.fc2 = nn.Linear(128, num_classes)
        self.perturbation_points = ["conv1", "conv2", "fc1", "fc2"]
        self.conv1.to(memory_format=torch.channels_last)
        self.conv2.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # B, w, 14, 14
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # B, 2w, 7, 7
        x = F.relu(self.fc1(x.flatten(1)))  # B, 128
        return self.fc2(x)  # B, num_classes


@register_model("cnn-small")
def _cnn_small(num_classes: int = 10, in_channels: int = 1, **kwargs: Any) -> nn.Module:
    return CNNSmall(num_classes=num_classes, in_channels=in_channels, **kwargs)


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al., ECCV 2016)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + skip


class PreActResNet18(nn.Module):
    """PreAct ResNet-18; perturbation points are both 3x3 convolutions of every block."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        super().__init__()
        self.normalize = Normalize(mean, std) if mean is not None else nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        blocks, in_planes = [], 64
        for planes, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1),
                               (512, 2), (512, 1)):
            blocks.append(PreActBlock(in_planes, planes, stride))
            in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(512)
        self.fc = nn.Linear(512, num_classes)
        self.perturbation_points = [f"blocks.{i}.conv{j}" for i in range(8) for j in (1, 2)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.conv1(self.normalize(x)))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
        return self.fc(out)


@register_model("preact-resnet18")
def _preact_resnet18(num_classes: int = 10, **kwargs: Any) -> nn.Module:
    return PreActResNet18(num_classes=num_classes, **kwargs)


class WideResNet(nn.Module):
    """WideResNet-D-K (Zagoruyko & Komodakis, BMVC 2016) with pre-activation blocks.

    Perturbation points: both 3x3 convolutions of every block, as in the all-layer margin paper's
    released code (not the stem, the 1x1 shortcuts or the final linear layer), so WRN-16-K has
    12 points and WRN-28-K has 24.
    """

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10,
                 in_channels: int = 3, dropout: float = 0.0,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, "
                             f"34, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"WideResNet widen factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.normalize = Normalize(mean, std) if mean is not None else nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks, in_planes = [], widths[0]
        for group, stride in zip(range(3), (1, 2, 2)):
            for i in range(n):
                blocks.append(PreActBlock(in_planes, widths[group + 1],
                                          stride if i == 0 else 1, dropout))
                in_planes = widths[group + 1]
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        self.perturbation_points = [f"blocks.{i}.conv{j}" for i in range(len(blocks))
                                    for j in (1, 2)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.conv1(self.normalize(x)))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
        return self.fc(out)
