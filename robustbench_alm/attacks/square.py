"""Square Attack with a query budget that follows the evidence of gradient masking.

Square (Andriushchenko et al., ECCV 2020) is AutoAttack's black-box stage: random square-shaped
updates, 5000 queries per point. It matters only where gradients lie (masked, shattered or
obfuscated), and on a model whose gradients are honest it almost never breaks a point that
APGD missed, yet on a robust model it is the costliest stage: every robust point pays all 5000
queries. ``kind = "square-adaptive"`` spends the full budget where there is evidence of masking
and a screening budget elsewhere:

1. A point whose input gradient of the logit margin at the clean input is exactly zero or not
   finite gets the full budget at once (the masked model of the benchmark panel).
2. Every other point gets ``screen_queries`` queries; the schedule of square sizes does not
   depend on the budget (``resc_schedule=False``), so the screen runs exactly the first
   ``screen_queries`` iterations of the full attack.
3. If the screen breaks even one such point, the gradients of this model cannot be trusted:
   the stage escalates and gives every point of that batch it has not broken the full budget;
   once the pass is over, the harness brings back the still-robust points of every batch that
   was only screened (``provisional``) with ``revisit`` set, and they get the full budget too.
   Each batch is decided on its own points, so a job may run the batches in any order.

So the stage is as strong as full Square wherever Square can show it is needed, and costs
``screen_queries / n_queries`` of it where it cannot. What it can miss: a model whose masking
leaves nonzero gradients and that the screen cannot break, but full Square could. The benchmark
script measures the difference against AutoAttack standard per example.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from robustbench_alm.attacks.base import Attack, Budget, positive_int
from robustbench_alm.attacks.pgd import margin_loss

__all__ = ["AdaptiveSquare", "degenerate_gradients"]

logger = logging.getLogger(__name__)


def degenerate_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per point: is the input gradient of the logit margin at ``x`` all zero or not finite?

    The margin (largest other logit minus the true one), not the cross-entropy: a confident
    point's cross-entropy gradient can underflow to zero in float32 with nothing masked.
    """
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = margin_loss(model(x), y).sum()
        grad, = torch.autograd.grad(loss, x, allow_unused=True)
    if grad is None:  # the output does not depend on the input through autograd at all
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    flat = grad.flatten(1)
    return ~torch.isfinite(flat).all(1) | (flat.abs().amax(1) == 0)


class AdaptiveSquare(Attack):
    """Suite stage ``kind = "square-adaptive"``: Square with a masking-driven query budget."""

    def __init__(self, budget: Budget, *, n_queries: int = 5000, screen_queries: int = 1000,
                 p_init: float = 0.8, batch_size: int | None = None, seed: int = 0,
                 device: torch.device | None = None):
        super().__init__(budget, seed=seed, device=device)
        # Square's cost is per iteration more than per point (one small forward and a dozen
        # small tensor operations each), so it pays to query many points at once: a stage
        # batch_size overrides the harness's.
        self.batch_size = None if batch_size is None else positive_int(
            "square-adaptive batch_size", batch_size)
        self.n_queries = positive_int("square-adaptive n_queries", n_queries)
        self.screen_queries = positive_int("square-adaptive screen_queries", screen_queries)
        if self.screen_queries > self.n_queries:
            raise ValueError(f"screen_queries ({screen_queries}) must not exceed n_queries "
                             f"({n_queries})")
        if not 0 < p_init <= 1:
            raise ValueError(f"p_init must be in (0, 1], got {p_init!r}")
        self.p_init = p_init
        # What the stage did, for the entry: points given the full budget, and escalation.
        self.n_full_budget = 0
        self.escalated = False
        #: True after a call whose points got only the screen (see the module docstring).
        self.provisional = False
        #: Set by the harness for the second pass: every point gets the full budget.
        self.revisit = False

    def _square(self, model, n_queries: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from pyautoattack.square import SquareAttack

        attack = SquareAttack(model, norm=self.budget.threat_model.value, eps=self.budget.eps,
                              n_queries=n_queries, p_init=self.p_init, n_restarts=1,
                              seed=self.seed, verbose=False, resc_schedule=False,
                              device=self.device or x.device)
        # Square only queries: no autograd graph is needed for any of its forward passes.
        with torch.inference_mode():
            x_adv = attack.perturb(x, y)
        return x_adv.clone()

    def __call__(self, model, x, y):
        self.provisional = False
        if self.budget.eps == 0:
            return x.clone()
        if self.revisit:  # the harness brings back points another batch showed to need it
            self.n_full_budget += x.shape[0]
            return self._square(model, self.n_queries, x, y)
        x_adv = x.clone()
        masked = degenerate_gradients(model, x, y)
        if masked.any():
            self.n_full_budget += int(masked.sum())
            x_adv[masked] = self._square(model, self.n_queries, x[masked], y[masked])

        healthy = (~masked).nonzero().squeeze(1)
        if healthy.numel() == 0:
            return x_adv
        screened = self._square(model, self.screen_queries, x[healthy], y[healthy])
        x_adv[healthy] = screened
        with torch.no_grad():
            broken = model(screened).argmax(1) != y[healthy]
        if not broken.any():
            # Only screened: if any batch escalates, the harness brings these points back.
            self.provisional = True
            return x_adv
        # The screen beat the gradient attacks on points with honest-looking gradients: trust
        # nothing, and give every point it did not break the full budget.
        logger.warning("square-adaptive: the %d-query screen broke %d points that the gradient "
                       "attacks missed; escalating to %d queries", self.screen_queries,
                       int(broken.sum()), self.n_queries)
        self.escalated = True
        rest = healthy[~broken]
        if rest.numel():
            self.n_full_budget += rest.numel()
            x_adv[rest] = self._square(model, self.n_queries, x[rest], y[rest])
        return x_adv

    def record(self) -> dict:
        """What goes into the entry's stage record beyond the common fields."""
        return {"n_full_budget": self.n_full_budget, "escalated": self.escalated}
