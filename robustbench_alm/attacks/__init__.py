"""Attacks behind one interface: own PGD and FGSM, AutoAttack's components, Foolbox's attacks.

:func:`build_attack` turns a suite stage (:class:`robustbench_alm.suites.AttackSpec`) and a
budget into a callable ``attack(model, x, y) -> x_adv``.
"""

from __future__ import annotations

import torch

from robustbench_alm.attacks.autoattack import AUTOATTACK_KINDS, AutoAttackStage
from robustbench_alm.attacks.base import Attack, Budget, project, resolve_step_size
from robustbench_alm.attacks.foolbox_adapter import FoolboxStage
from robustbench_alm.attacks.pgd import FGSM, PGD, ascent_direction, margin_loss, pgd
from robustbench_alm.attacks.square import AdaptiveSquare
from robustbench_alm.suites import AttackSpec

__all__ = ["Attack", "Budget", "build_attack", "pgd", "PGD", "FGSM", "project",
           "margin_loss", "resolve_step_size", "ascent_direction"]


def build_attack(spec: AttackSpec, budget: Budget, *, seed: int = 0,
                 device: torch.device | None = None) -> Attack:
    """The attack a suite stage describes, at ``budget``."""
    try:
        if spec.kind == "pgd":
            return PGD(budget, seed=seed, device=device, **spec.params)
        if spec.kind == "fgsm":
            return FGSM(budget, seed=seed, device=device, **spec.params)
        if spec.kind == "square-adaptive":
            return AdaptiveSquare(budget, seed=seed, device=device, **spec.params)
        if spec.kind == "foolbox":
            return FoolboxStage(budget, seed=seed, device=device, **spec.params)
        if spec.kind in AUTOATTACK_KINDS:
            return AutoAttackStage(spec.kind, budget, seed=seed, device=device, **spec.params)
    except TypeError as err:
        # An unexpected keyword in the suite file: name the stage and the offending key.
        raise ValueError(f"attack stage {spec.name!r} ({spec.kind}): {err}") from None
    raise ValueError(f"attack stage {spec.name!r} has unknown kind {spec.kind!r}")
