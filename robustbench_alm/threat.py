"""The field's vocabulary: threat models, datasets, eps and the input box.

This module is the lowest layer of the package: plain Python, no torch. Everything that names a
threat model or a dataset, or turns an eps into text, goes through here so that the command line,
the entries and the leaderboard cannot drift apart.
"""

from __future__ import annotations

import enum
import math
from fractions import Fraction

__all__ = [
    "ThreatModel",
    "Dataset",
    "BOUNDS",
    "parse_eps",
    "eps_text",
    "eps_label",
    "check_eps",
    "is_large_eps",
]

#: Inputs live in this box; normalization belongs inside the model.
BOUNDS = (0.0, 1.0)

#: Linf radii above this are unusual enough on [0, 1] inputs to be flagged.
LARGE_LINF_EPS = 0.3


class ThreatModel(str, enum.Enum):
    """The norm ball an adversary may move an input in."""

    LINF = "Linf"
    L2 = "L2"

    @classmethod
    def parse(cls, value: str | ThreatModel) -> ThreatModel:
        """Return the threat model named by ``value`` (case-insensitive)."""
        if isinstance(value, cls):
            return value
        for member in cls:
            if str(value).lower() == member.value.lower():
                return member
        accepted = ", ".join(m.value for m in cls)
        raise ValueError(f"unknown threat model {value!r}; expected one of: {accepted}")


class Dataset(str, enum.Enum):
    """Datasets the loaders know, with their shapes and class counts."""

    FASHION_MNIST = "fashion-mnist"
    MNIST = "mnist"
    CIFAR10 = "cifar10"
    CIFAR100 = "cifar100"
    SVHN = "svhn"

    @classmethod
    def parse(cls, value: str | Dataset) -> Dataset:
        """Return the dataset named by ``value`` (case-insensitive)."""
        if isinstance(value, cls):
            return value
        for member in cls:
            if str(value).lower() == member.value:
                return member
        accepted = ", ".join(m.value for m in cls)
        raise ValueError(f"unknown dataset {value!r}; expected one of: {accepted}")

    @property
    def num_classes(self) -> int:
        return 100 if self is Dataset.CIFAR100 else 10

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one input as (channels, height, width)."""
        if self in (Dataset.FASHION_MNIST, Dataset.MNIST):
            return (1, 28, 28)
        return (3, 32, 32)


def parse_eps(value: str | float | int) -> float:
    """Read an eps given as a number or as a fraction such as ``"8/255"``.

    Raises:
        ValueError: if the text is neither a number nor a fraction of two numbers.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        eps = float(value)
    else:
        text = str(value).strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                eps = float(num) / float(den)
            else:
                eps = float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(
                f"cannot read eps {value!r}; expected a number such as 0.1 or a fraction "
                "such as 8/255"
            ) from None
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {value!r}")
    return eps


def eps_text(eps: float) -> str:
    """Show eps as k/255 when it is one (to float precision), else as a plain number.

    >>> eps_text(8 / 255)
    '8/255'
    >>> eps_text(0.1)
    '25.5/255'
    """
    k = Fraction(eps * 255).limit_denominator(10)
    if math.isclose(float(k), eps * 255, rel_tol=1e-9, abs_tol=1e-12):
        return f"{k.numerator}/255" if k.denominator == 1 else f"{float(k):g}/255"
    return f"{eps * 255:.6g}/255"


def eps_label(eps: float, threat_model: ThreatModel) -> str:
    """How eps is shown: k/255 for Linf (pixel levels), a plain number for L2."""
    if threat_model is ThreatModel.LINF:
        return eps_text(eps)
    return f"{eps:g}"


def check_eps(eps: float, threat_model: ThreatModel) -> None:
    """Refuse an eps that makes no sense for the threat model on the [0, 1] box.

    A Linf eps of 1 or more lets the adversary reach any image, so every number it gives is
    meaningless; a negative or non-finite eps is always an error.
    """
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if threat_model is ThreatModel.LINF and eps >= BOUNDS[1] - BOUNDS[0]:
        hint = ""
        if eps <= 255:
            hint = f"; did you mean {eps:g}/255 = {eps / 255:.6g}?"
        raise ValueError(
            f"Linf eps {eps!r} covers the whole input box {BOUNDS}; expected eps < 1 "
            f"(for example 8/255 on CIFAR-10 or 0.1 on Fashion-MNIST){hint}"
        )


def is_large_eps(eps: float, threat_model: ThreatModel) -> bool:
    """An eps worth a warning: Linf above 0.3 on [0, 1] inputs (MNIST's usual maximum)."""
    return threat_model is ThreatModel.LINF and eps > LARGE_LINF_EPS
