"""Adapter to Foolbox 3 (Rauber et al., JOSS 2020): any of its fixed-eps attacks as a stage.

A stage ``kind = "foolbox"`` names the Foolbox class in ``attack`` and passes every other key to
its constructor, e.g. ``attack = "LinfPGD"``, ``steps = 40``.
"""

from __future__ import annotations

import os

import torch

from robustbench_alm.attacks.base import Attack, Budget
from robustbench_alm.threat import BOUNDS, ThreatModel

__all__ = ["FoolboxStage", "import_foolbox"]


def import_foolbox():
    """``import foolbox``, also where no ``git`` program exists (a slim container).

    Foolbox imports GitPython for its model zoo, and GitPython raises ImportError at import time
    when it finds no git executable, unless GIT_PYTHON_REFRESH says otherwise. The zoo is never
    used here; a value the user set is kept.
    """
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import foolbox

    return foolbox


class FoolboxStage(Attack):
    """A Foolbox attack run at the budget's eps."""

    def __init__(self, budget: Budget, *, attack: str, seed: int = 0,
                 device: torch.device | None = None, **params):
        super().__init__(budget, seed=seed, device=device)
        foolbox = import_foolbox()

        cls = getattr(foolbox.attacks, attack, None)
        if cls is None or not isinstance(cls, type):
            raise ValueError(f"foolbox has no attack named {attack!r} (see foolbox.attacks)")
        try:
            self.attack = cls(**params)
        except ImportError as err:
            raise ValueError(f"foolbox's {attack} needs a package that is not installed: "
                             f"{err}") from None
        # A Linf attack in an L2 suite (or the reverse) would measure another threat model.
        norm = getattr(getattr(self.attack, "distance", None), "p", None)
        expected = float("inf") if budget.threat_model is ThreatModel.LINF else 2
        if norm is not None and norm != expected:
            raise ValueError(f"foolbox's {attack} works in the L{norm:g} norm, but the suite "
                             f"runs at {budget.threat_model.value}; pick the matching attack")
        self.attack_name = attack

    def __call__(self, model, x, y):
        foolbox = import_foolbox()

        if self.budget.eps == 0:
            return x.clone()
        fmodel = foolbox.PyTorchModel(model, bounds=BOUNDS, device=x.device)
        torch.manual_seed(self.seed)  # foolbox draws its random starts from the global RNG
        _, clipped, _ = self.attack(fmodel, x, y, epsilons=self.budget.eps)
        return clipped.detach()
