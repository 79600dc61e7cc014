"""Own gradient attacks: PGD (Madry et al., ICLR 2018) and FGSM (Goodfellow et al., ICLR 2015).

These are the attacks training uses too, so they are written for speed on small models: one
forward and one backward per step, no copies of the model, and a local random generator so that
an evaluation never disturbs the caller's global RNG.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_alm.attacks.base import (Attack, Budget, positive_int, project,
                                          resolve_step_size)
from robustbench_alm.threat import ThreatModel

__all__ = ["pgd", "PGD", "FGSM", "margin_loss", "ascent_direction"]

LOSSES = ("ce", "margin")


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example Carlini-Wagner margin: largest other logit minus the true logit."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.max(dim=1).values - true


def _loss(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="sum")
    return margin_loss(logits, y).sum()


def ascent_direction(grad: torch.Tensor, threat_model: ThreatModel) -> torch.Tensor:
    if threat_model is ThreatModel.LINF:
        return grad.sign()
    norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return grad / norms.view(-1, *([1] * (grad.dim() - 1)))


def _random_start(x: torch.Tensor, budget: Budget, gen: torch.Generator) -> torch.Tensor:
    if budget.threat_model is ThreatModel.LINF:
        noise = torch.rand(x.shape, generator=gen, device=x.device) * 2 - 1
        return project(x + budget.eps * noise, x, budget)
    noise = torch.randn(x.shape, generator=gen, device=x.device)
    noise = noise / noise.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
    radius = torch.rand(x.shape[0], generator=gen, device=x.device) * budget.eps
    return project(x + noise * radius.view(-1, *([1] * (x.dim() - 1))), x, budget)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, budget: Budget, *,
        steps: int, step_size: float, random_start: bool = True, loss: str = "ce",
        generator: torch.Generator | None = None, keep_best: bool = True) -> torch.Tensor:
    """Projected gradient ascent on ``loss`` within ``budget``.

    Args:
        steps: number of gradient steps (0 returns the start point).
        step_size: absolute step (Linf: per coordinate; L2: per example).
        random_start: start uniformly in the Linf ball (L2: uniform radius, random direction).
        loss: ``"ce"`` (cross-entropy) or ``"margin"`` (Carlini-Wagner).
        keep_best: return, for each point, the first iterate that was misclassified, else the
            last iterate; with ``False`` always the last iterate (what training wants).

    Returns:
        Adversarial inputs within eps of ``x`` and inside [0, 1], detached.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown PGD loss {loss!r}; expected one of {LOSSES}")
    if steps < 0:
        raise ValueError(f"PGD steps must be >= 0, got {steps}")
    x = x.detach()
    if budget.eps == 0:
        return x.clone()
    x_adv = _random_start(x, budget, generator) if random_start else x.clone()
    if not keep_best:
        for _ in range(steps):
            x_adv = _pgd_step(model, x_adv, x, y, budget, step_size, loss)[0]
        return x_adv.detach()

    # keep_best: a point is done at its first misclassified iterate, so it leaves the batch
    # there (later steps could not change what is returned for it, only cost time).
    best = x_adv.clone()
    active = torch.arange(x.shape[0], device=x.device)
    for _ in range(steps):
        stepped, logits = _pgd_step(model, x_adv[active], x[active], y[active], budget,
                                    step_size, loss)
        fooled = logits.argmax(dim=1) != y[active]
        best[active[fooled]] = x_adv[active[fooled]]
        x_adv[active] = stepped
        active = active[~fooled]
        if active.numel() == 0:
            return best
    best[active] = x_adv[active]  # never fooled on the way: the last iterate is the best try
    return best


def _pgd_step(model, x_adv, x, y, budget, step_size, loss) -> tuple[torch.Tensor, torch.Tensor]:
    """One projected ascent step from ``x_adv``; also the logits at ``x_adv`` (detached)."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x_adv)
        grad, = torch.autograd.grad(_loss(logits, y, loss), x_adv)
    stepped = x_adv.detach() + step_size * ascent_direction(grad, budget.threat_model)
    return project(stepped, x, budget), logits.detach()


class PGD(Attack):
    """Suite stage ``kind = "pgd"``: PGD with restarts; a point counts as broken by any restart."""

    def __init__(self, budget: Budget, *, steps: int = 20, step_size: float | str = "eps/4",
                 random_start: bool = True, restarts: int = 1, loss: str = "ce",
                 seed: int = 0, device: torch.device | None = None):
        super().__init__(budget, seed=seed, device=device)
        if not isinstance(random_start, bool):
            raise ValueError(f"random_start must be true or false, got {random_start!r}")
        if loss not in LOSSES:
            raise ValueError(f"unknown PGD loss {loss!r}; expected one of {LOSSES}")
        self.steps = positive_int("PGD steps", steps)
        self.restarts = positive_int("PGD restarts", restarts)
        self.loss, self.random_start = loss, random_start
        self.step_size = resolve_step_size(step_size, budget.eps)

    def __call__(self, model, x, y):
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        result = x.clone()
        remaining = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            idx = remaining.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            adv = pgd(model, x[idx], y[idx], self.budget, steps=self.steps,
                      step_size=self.step_size, random_start=self.random_start,
                      loss=self.loss, generator=gen)
            result[idx] = adv
            with torch.no_grad():
                remaining[idx] = model(adv).argmax(dim=1) == y[idx]
        return result


class FGSM(Attack):
    """Suite stage ``kind = "fgsm"``: one step of size eps from the clean input."""

    def __call__(self, model, x, y):
        return pgd(model, x, y, self.budget, steps=1, step_size=self.budget.eps,
                   random_start=False, keep_best=False)
