"""The all-layer perturbation: one mechanism, shared by training and margin estimation.

Wei and Ma (ICLR 2020) perturb every layer of F = f_k o ... o f_1 at once:

    h_i = f_i(h_{i-1}) + delta_i * ||h_{i-1}||_2        (per example; h_0 = x)

and define the all-layer margin as the smallest ||delta|| = sqrt(sum_i ||delta_i||^2) that
changes the prediction. Here each f_i is a *perturbation point*, a submodule the architecture
declares (:func:`robustbench_alm.models.perturbation_points`). A forward hook adds delta_i times
the per-example L2 norm of the module's input (``scale="input"``, the paper's definition) or of
its own output (``scale="output"``, what the paper's released code does).

Deltas are held in a plain dict keyed by point name. A point missing from the dict gets a zero
delta of its output's shape, created during the forward pass with ``requires_grad=True``, so the
first pass both computes the logits and creates the deltas to differentiate against: no extra
pass to discover shapes. Norms are part of the graph, exactly as in the definition.

Nothing else in the package adds hidden-layer perturbations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from robustbench_alm.models import perturbation_points

__all__ = ["SCALES", "perturbed", "all_layer_forward", "delta_norm", "zero_like_deltas"]

SCALES = ("input", "output")

Deltas = dict[str, torch.Tensor]


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example, shaped to broadcast against ``t`` (B, 1, 1, ...).

    Reduced over the non-batch dimensions in place: ``flatten`` would copy a channels-last
    activation first.
    """
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())), keepdim=True)


class _AddZeroDelta(torch.autograd.Function):
    """``output + delta * ||ref||`` for a delta known to be zero, without computing it.

    The value is ``output``; the gradient to ``delta`` is ``grad * ||ref||``; the gradient to
    ``ref`` through the norm is ``delta * d||ref||/dref = 0``, so none flows there. Exactly the
    derivatives of the general expression at delta = 0, for less work: the passes that
    start every ascent (the AMO step, the fused PGD step, the margin search) take this path.
    """

    @staticmethod
    def forward(ctx, output, delta, ref):
        ctx.save_for_backward(_per_example_norm(ref.detach()))
        # A copy, not a view: a model may modify a point's output in place (ReLU(inplace)).
        return output.clone()

    @staticmethod
    def backward(ctx, grad):
        norm, = ctx.saved_tensors
        return grad, grad * norm, None


@contextlib.contextmanager
def perturbed(model: nn.Module, deltas: Deltas, *, scale: str = "input",
              points: list[str] | None = None) -> Iterator[Deltas]:
    """Within the block, every forward of ``model`` adds the all-layer perturbation.

    Args:
        model: a model whose perturbation points are declared (or given in ``points``).
        deltas: point name to delta, each of the point's output shape; filled with zero deltas
            (``requires_grad=True``) for points not yet in it.
        scale: ``"input"`` scales delta_i by ||h_{i-1}||, ``"output"`` by ||f_i(h_{i-1})||.
        points: override the model's declared points.

    Yields:
        ``deltas``, the same dict, holding every point's delta after the first forward.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown delta scale {scale!r}; expected one of {SCALES}")
    names = points if points is not None else perturbation_points(model)
    modules = dict(model.named_modules())
    handles = []

    def make_hook(name: str):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"perturbation point {name!r} returned {type(output).__name__}; "
                                "a point must return one tensor")
            delta = deltas.get(name)
            ref = args[0] if scale == "input" else output
            if delta is None:
                delta = torch.zeros_like(output, requires_grad=True)
                deltas[name] = delta
                return _AddZeroDelta.apply(output, delta, ref)
            if delta.shape != output.shape:
                raise ValueError(f"delta for {name!r} has shape {tuple(delta.shape)}, the "
                                 f"point's output has {tuple(output.shape)}")
            return output + delta * _per_example_norm(ref)
        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        yield deltas
    finally:
        for handle in handles:
            handle.remove()


def all_layer_forward(model: nn.Module, x: torch.Tensor, deltas: Deltas, *,
                      scale: str = "input") -> torch.Tensor:
    """Logits of F(x, delta); missing deltas are created as zeros in ``deltas``."""
    with perturbed(model, deltas, scale=scale):
        return model(x)


def delta_norm(deltas: Deltas) -> torch.Tensor:
    """Per-example ||delta|| = sqrt(sum over points of ||delta_i||_2^2), shape [B]."""
    squares = [d.flatten(1).pow(2).sum(dim=1) for d in deltas.values()]
    return torch.stack(squares).sum(dim=0).sqrt()


def zero_like_deltas(deltas: Deltas, *, requires_grad: bool = True) -> Deltas:
    """Fresh zero deltas of the same shapes."""
    return {k: torch.zeros_like(v).requires_grad_(requires_grad) for k, v in deltas.items()}
