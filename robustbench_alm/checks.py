"""The model contract and the sanity checks the harness runs before and after attacking.

Contract, checked on a sample before any attack:

- the forward returns one finite floating-point tensor of shape [N, C] (a tuple or dict output
  needs an explicit output selector, which the entry records);
- predictions do not depend on batch size or batch contents;
- logits are small enough for float32 to rank classes (an offset of 1e10 erases them);
- labels are 1-D int64 class indices on the model's device.

Checks that raise flags instead of refusing: probability outputs, zero input gradients,
randomized forward passes, parameters or buffers that change. See :mod:`robustbench_alm.flags`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ContractError", "OutputSelector", "check_forward", "canonical_labels",
           "is_randomized", "zero_gradient_count", "state_snapshot", "state_changed",
           "half_precision_pair", "LOGIT_LIMIT"]

logger = logging.getLogger(__name__)

#: Beyond this magnitude float32 logits are spaced more than 0.06 apart: classes cannot be ranked.
LOGIT_LIMIT = 1e6
_BATCH_TOLERANCE = 1e-4


class ContractError(ValueError):
    """The model breaks the contract the harness needs to measure it."""


class OutputSelector(nn.Module):
    """Picks the logits out of a forward that returns a tuple (by index) or a dict (by key)."""

    def __init__(self, model: nn.Module, output: int | str):
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        try:
            return out[self.output]
        except (KeyError, IndexError, TypeError):
            kind = f"dict with keys {sorted(out)}" if isinstance(out, Mapping) \
                else type(out).__name__
            raise ContractError(f"output selector {self.output!r} does not fit the model's "
                                f"output, a {kind}") from None


def _describe_output(out: Any) -> str:
    if isinstance(out, Mapping):
        return f"a dict with keys {sorted(map(str, out))}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} items"
    return f"a {type(out).__name__}"


def check_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run one forward on ``x`` and return its logits, or raise :class:`ContractError`."""
    try:
        with torch.no_grad():
            out = model(x)
    except ContractError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        # Usually inputs of the wrong shape: a model for another dataset.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ContractError(f"the model's forward failed on inputs of shape "
                            f"{tuple(x.shape)} and dtype {x.dtype}: {first}") from err
    if not isinstance(out, torch.Tensor):
        raise ContractError(
            f"the model's forward returned {_describe_output(out)}; expected one logits tensor "
            "of shape [N, C]. Pass output=<index or key> (CLI: --output) to pick the logits")
    if out.dim() != 2 or out.shape[0] != x.shape[0]:
        raise ContractError(f"the model returned shape {tuple(out.shape)} for {x.shape[0]} "
                            "inputs; expected [N, C] logits")
    if not out.is_floating_point():
        raise ContractError(f"the model returned dtype {out.dtype}; expected float logits")
    if out.shape[1] < 2:
        raise ContractError(f"the model returned {out.shape[1]} class score; a classifier "
                            "needs at least 2 classes")
    finite = out[torch.isfinite(out)]
    if finite.numel() and finite.abs().max() >= LOGIT_LIMIT:
        raise ContractError(
            f"the model's logits reach {finite.abs().max().item():.3g}; beyond {LOGIT_LIMIT:g} "
            "float32 cannot tell classes apart (a constant offset such as +1e10 erases them). "
            "Remove the offset or scale the logits down")
    return out.float()


def check_batch_independence(model: nn.Module, x: torch.Tensor) -> None:
    """Refuse a model whose outputs depend on the batch they are computed in."""
    k = min(8, x.shape[0])
    with torch.no_grad():
        together = model(x[:k])
        alone = torch.cat([model(x[i:i + 1]) for i in range(k)])
        reordered = model(x[:k].flip(0)).flip(0)
    for name, other in (("one at a time", alone), ("in reverse order", reordered)):
        both = torch.isfinite(together) & torch.isfinite(other)
        if not both.any():
            continue
        gap = (together[both] - other[both]).abs().max()
        if gap > _BATCH_TOLERANCE * (1 + together[both].abs().max()):
            raise ContractError(
                f"the model's outputs change when the same inputs are scored {name}; "
                "predictions must not depend on batch size or contents (is BatchNorm or a "
                "per-batch statistic used at test time?)")


def canonical_labels(y: Any, n: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """Labels as 1-D int64 class indices on ``device``, or a specific error."""
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y)
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]  # [N, 1] column: unambiguous
    if y.dim() == 2 and y.shape[1] == num_classes and y.shape[0] == n:
        raise ValueError(f"labels have shape {tuple(y.shape)}, which looks one-hot; pass class "
                         "indices, e.g. y.argmax(1)")
    if y.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor of class indices, got shape "
                         f"{tuple(y.shape)}")
    if y.shape[0] != n:
        raise ValueError(f"got {n} inputs but {y.shape[0]} labels")
    if y.dtype == torch.bool:
        raise ValueError("labels must be class indices, got a boolean tensor")
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise ValueError("labels must be integer class indices, got non-integer floats")
    y = y.to(device=device, dtype=torch.int64)
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1} for a model with "
                         f"{num_classes} outputs, got values {y.min().item()}..{y.max().item()}")
    return y


def looks_like_probabilities(logits: torch.Tensor) -> bool:
    """Rows that are non-negative and sum to 1: softmax outputs, not logits."""
    finite = torch.isfinite(logits).all(1)
    if not finite.any():
        return False
    z = logits[finite]
    return bool((z >= 0).all() and torch.allclose(z.sum(1), torch.ones(len(z)), atol=1e-3))


def is_randomized(model: nn.Module, x: torch.Tensor, passes: int = 3) -> bool:
    """Whether repeated forward passes on the same inputs disagree."""
    with torch.no_grad():
        first = model(x)
        for _ in range(passes - 1):
            again = model(x)
            same = (first == again) | (first.isnan() & again.isnan())
            if not same.all():
                return True
    return False


def zero_gradient_count(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """How many of the correctly classified points have an exactly zero input gradient."""
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        grad, = torch.autograd.grad(loss, x, allow_unused=True)
    correct = logits.detach().argmax(1) == y
    if grad is None:
        return int(correct.sum())
    zero = grad.flatten(1).abs().amax(1) == 0
    return int((zero & correct).sum())


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def state_changed(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> list[str]:
    """Names of parameters and buffers that differ from ``snapshot``."""
    now = model.state_dict()
    return [k for k, v in snapshot.items()
            if k not in now or not torch.equal(now[k].detach(), v)]


class _CastInputs(nn.Module):
    """Runs a half-precision model on float32 inputs and returns float32 logits."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


def half_precision_pair(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """For a half-precision model: (a float32 copy to attack, the model itself to score).

    Returns None for a float32 (or float64) model.
    """
    dtypes = {p.dtype for p in model.parameters()}
    half = dtypes & {torch.float16, torch.bfloat16}
    if not half:
        return None
    attack_copy = copy.deepcopy(model).float()
    return attack_copy, _CastInputs(model, half.pop())
