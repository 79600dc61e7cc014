"""Adapters to the attacks of AutoAttack (Croce & Hein, ICML 2020), from ``pyautoattack``.

Each AutoAttack component is one suite stage: ``apgd-ce``, ``apgd-dlr``, ``apgd-t`` (targeted
DLR), ``fab``, ``fab-t`` and ``square``. The objects are built with exactly the settings that
``pyautoattack.AutoAttack(version="standard")`` gives them, overridden only by what the suite
file says, and each call reseeds them with the stage's seed as AutoAttack does for every batch;
so a suite that lists the standard stages in AutoAttack's order, run on the same points, batches
and seed, reproduces AutoAttack's own robust accuracy exactly.

Targeted stages use min(n_target_classes, C - 1) target classes, since a model with C classes has
only C - 1 wrong ones. The DLR losses need at least 3 classes (4 for targeted DLR); with fewer
the stage is refused with a message rather than crashing inside the library.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from robustbench_alm.attacks.base import Attack, Budget

__all__ = ["AutoAttackStage", "AUTOATTACK_KINDS"]

logger = logging.getLogger(__name__)

AUTOATTACK_KINDS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")

# The settings pyautoattack's version="standard" gives each component (Linf and L2).
_STANDARD = {
    "apgd-ce": {"n_iter": 100, "n_restarts": 1, "rho": 0.75},
    "apgd-dlr": {"n_iter": 100, "n_restarts": 1, "rho": 0.75},
    "apgd-t": {"n_iter": 100, "n_restarts": 1, "rho": 0.75, "n_target_classes": 9},
    "fab": {"n_iter": 100, "n_restarts": 1, "alpha_max": 0.1, "eta": 1.05, "beta": 0.9},
    "fab-t": {"n_iter": 100, "n_restarts": 1, "alpha_max": 0.1, "eta": 1.05, "beta": 0.9,
              "n_target_classes": 9},
    "square": {"n_queries": 5000, "p_init": 0.8, "n_restarts": 1},
}
_MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4}


class AutoAttackStage(Attack):
    """One AutoAttack component as a suite stage."""

    def __init__(self, kind: str, budget: Budget, *, seed: int = 0,
                 device: torch.device | None = None, **params):
        super().__init__(budget, seed=seed, device=device)
        if kind not in AUTOATTACK_KINDS:
            raise ValueError(f"unknown AutoAttack component {kind!r}; expected one of "
                             f"{', '.join(AUTOATTACK_KINDS)}")
        unknown = set(params) - set(_STANDARD[kind])
        if unknown:
            raise ValueError(f"{kind} takes {sorted(_STANDARD[kind])}, got unknown "
                             f"parameters {sorted(unknown)}")
        self.kind = kind
        self.params = {**_STANDARD[kind], **params}
        self.n_target_classes_used: int | None = None

    def _build(self, model: nn.Module, num_classes: int, device):
        from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
        from pyautoattack.fab_pt import FABAttack_PT
        from pyautoattack.square import SquareAttack

        p, norm, eps = dict(self.params), self.budget.threat_model.value, self.budget.eps
        if self.kind in _MIN_CLASSES and num_classes < _MIN_CLASSES[self.kind]:
            raise ValueError(f"{self.kind} uses the DLR loss, which needs at least "
                             f"{_MIN_CLASSES[self.kind]} classes; the model has {num_classes}. "
                             "Use apgd-ce or fab in the suite instead")
        if "n_target_classes" in p:
            p["n_target_classes"] = min(p["n_target_classes"], num_classes - 1)
            self.n_target_classes_used = p["n_target_classes"]
        quiet = logging.getLogger("auto-attack")
        if self.kind in ("apgd-ce", "apgd-dlr"):
            return APGDAttack(model, norm=norm, eps=eps, seed=self.seed, verbose=False,
                              loss=self.kind.split("-")[1], eot_iter=1, device=device,
                              logger=quiet, **p)
        if self.kind == "apgd-t":
            return APGDAttack_targeted(model, norm=norm, eps=eps, seed=self.seed, verbose=False,
                                       eot_iter=1, device=device, logger=quiet, **p)
        if self.kind in ("fab", "fab-t"):
            return FABAttack_PT(model, norm=norm, eps=eps, seed=self.seed, verbose=False,
                                targeted=self.kind == "fab-t", device=device, **p)
        return SquareAttack(model, norm=norm, eps=eps, seed=self.seed, verbose=False,
                            resc_schedule=False, device=device, **p)

    def __call__(self, model, x, y):
        if self.budget.eps == 0:
            return x.clone()
        with torch.no_grad():
            num_classes = model(x[:1]).shape[1]
        attack = self._build(model, num_classes, self.device or x.device)
        return attack.perturb(x, y).detach()
