"""What every attack takes and returns.

An attack is built once from a suite stage (its hyperparameters) and a budget (threat model and
eps); it is then called on a batch: ``attack(model, x, y)`` returns adversarial inputs of the
same shape, inside the eps-ball and the [0, 1] box. The caller re-scores them itself; an attack's
own claim of success is never trusted.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from robustbench_alm.threat import BOUNDS, ThreatModel

__all__ = ["Budget", "Attack", "project", "resolve_step_size", "positive_int"]

_STEP_FORMS = (
    (re.compile(r"^\s*eps\s*/\s*([0-9.eE+-]+)\s*$"), lambda v, eps: eps / v),
    (re.compile(r"^\s*([0-9.eE+-]+)\s*\*\s*eps\s*$"), lambda v, eps: v * eps),
)


@dataclass(frozen=True)
class Budget:
    """The adversary's allowance: a norm ball of radius eps around each input."""

    threat_model: ThreatModel
    eps: float


class Attack(abc.ABC):
    """A fixed-budget attack: returns the inputs it found within ``budget``."""

    name: str = "attack"

    def __init__(self, budget: Budget, *, seed: int = 0, device: torch.device | None = None):
        self.budget = budget
        self.seed = seed
        self.device = device

    def configure(self, num_classes: int) -> None:
        """Adapt to a model with ``num_classes`` classes (target counts, substitute losses)."""

    @abc.abstractmethod
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial inputs for the batch ``(x, y)``, same shape as ``x``."""


def resolve_step_size(step_size: float | str, eps: float) -> float:
    """A step size given as a number, or relative to eps as ``"eps/4"`` or ``"2.5*eps"``."""
    if isinstance(step_size, (int, float)) and not isinstance(step_size, bool):
        value = float(step_size)
    else:
        value = _parse_step_text(str(step_size).strip(), eps)
    # eps = 0 gives a zero step from 'eps/K'; any other zero or negative step does nothing.
    if value is None or not 0 <= value < float("inf") or (value == 0 and eps > 0):
        raise ValueError(f"cannot read step size {step_size!r}; expected a positive number, "
                         "'eps/K' or 'K*eps' with K > 0")
    return value


def _parse_step_text(text: str, eps: float) -> float | None:
    try:
        return float(text)  # a plain number given as text, as the command line does
    except ValueError:
        pass
    for pattern, rule in _STEP_FORMS:
        match = pattern.match(text)
        if match and float(match.group(1)) > 0:
            return rule(float(match.group(1)), eps)
    return None


def positive_int(name: str, value: Any) -> int:
    """A suite or config parameter that must be an integer >= 1 (True is not an integer)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def project(x_adv: torch.Tensor, x: torch.Tensor, budget: Budget) -> torch.Tensor:
    """Project onto the eps-ball around ``x``, then clip to the input box."""
    delta = x_adv - x
    if budget.threat_model is ThreatModel.LINF:
        delta = delta.clamp(-budget.eps, budget.eps)
    else:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        factor = (budget.eps / norms).clamp(max=1.0)
        delta = delta * factor.view(-1, *([1] * (x.dim() - 1)))
    return (x + delta).clamp(*BOUNDS)
