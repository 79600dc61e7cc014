"""Adapters to the attacks of AutoAttack (Croce & Hein, ICML 2020), from ``pyautoattack``.

Each AutoAttack component is one suite stage: ``apgd-ce``, ``apgd-dlr``, ``apgd-t`` (targeted
DLR), ``fab``, ``fab-t`` and ``square``. The objects are built with exactly the settings that
``pyautoattack.AutoAttack(version="standard")`` gives them, overridden only by what the suite
file says, and each call reseeds them with the stage's seed as AutoAttack does for every batch;
so a suite that lists the standard stages in AutoAttack's order, run on the same points, batches
and seed, reproduces AutoAttack's own robust accuracy exactly.

Targeted stages use min(n_target_classes, C - 1) target classes, since a model with C classes has
only C - 1 wrong ones. The DLR losses need at least 3 classes (4 for targeted DLR); with fewer,
the stage runs APGD on the cross-entropy instead and says so in ``substitute``, rather than
crashing with an index error inside the library.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from robustbench_alm.attacks.base import Attack, Budget, positive_int

__all__ = ["AutoAttackStage", "AUTOATTACK_KINDS"]

logger = logging.getLogger(__name__)

AUTOATTACK_KINDS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")

# The settings pyautoattack's version="standard" gives each component (Linf and L2).
_STANDARD = {
    "apgd-ce": {"n_iter": 100, "n_restarts": 1, "rho": 0.75, "eot_iter": 1},
    "apgd-dlr": {"n_iter": 100, "n_restarts": 1, "rho": 0.75, "eot_iter": 1},
    "apgd-t": {"n_iter": 100, "n_restarts": 1, "rho": 0.75, "n_target_classes": 9,
               "eot_iter": 1},
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
        for key in ("n_iter", "n_restarts", "n_queries", "n_target_classes", "eot_iter"):
            if key in params:
                positive_int(f"{kind} {key}", params[key])
        self.kind = kind
        self.params = {**_STANDARD[kind], **params}
        self.n_target_classes_used: int | None = None
        self.substitute: str | None = None
        self.num_classes: int | None = None

    def configure(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._resolve(num_classes)

    def _resolve(self, num_classes: int) -> tuple[str, dict]:
        """The kind and parameters to run for a model with ``num_classes`` classes."""
        kind, p = self.kind, dict(self.params)
        if kind in _MIN_CLASSES and num_classes < _MIN_CLASSES[kind]:
            if self.substitute is None:  # warn once per stage, not once per batch
                logger.warning("%s needs at least %d classes for its DLR loss, the model has "
                               "%d: running apgd-ce in its place", kind, _MIN_CLASSES[kind],
                               num_classes)
            self.substitute = "apgd-ce"
            kind = "apgd-ce"
            p = {k: v for k, v in p.items() if k in _STANDARD["apgd-ce"]}
        if "n_target_classes" in p:
            p["n_target_classes"] = min(p["n_target_classes"], num_classes - 1)
            self.n_target_classes_used = p["n_target_classes"]
        return kind, p

    def _build(self, model: nn.Module, num_classes: int, device):
        from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
        from pyautoattack.fab_pt import FABAttack_PT
        from pyautoattack.square import SquareAttack

        kind, p = self._resolve(num_classes)
        norm, eps = self.budget.threat_model.value, self.budget.eps
        quiet = logging.getLogger("auto-attack")
        if kind in ("apgd-ce", "apgd-dlr"):
            return APGDAttack(model, norm=norm, eps=eps, seed=self.seed, verbose=False,
                              loss=kind.split("-")[1], device=device, logger=quiet, **p)
        if kind == "apgd-t":
            return APGDAttack_targeted(model, norm=norm, eps=eps, seed=self.seed, verbose=False,
                                       device=device, logger=quiet, **p)
        if kind in ("fab", "fab-t"):
            return FABAttack_PT(model, norm=norm, eps=eps, seed=self.seed, verbose=False,
                                targeted=kind == "fab-t", device=device, **p)
        return SquareAttack(model, norm=norm, eps=eps, seed=self.seed, verbose=False,
                            resc_schedule=False, device=device, **p)

    def __call__(self, model, x, y):
        if self.budget.eps == 0:
            return x.clone()
        num_classes = self.num_classes
        if num_classes is None:  # not configured by a harness: ask the model once
            with torch.no_grad():
                num_classes = self.num_classes = model(x[:1]).shape[1]
        attack = self._build(model, num_classes, self.device or x.device)
        return attack.perturb(x, y).detach()
