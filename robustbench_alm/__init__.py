"""robustbench-alm: train, attack and compare adversarially robust classifiers.

    robustbench-alm train --method amo-pgd --epochs 3 --out runs/amo-pgd.safetensors
    robustbench-alm evaluate runs/amo-pgd.safetensors --suite standard --eps 0.1
    robustbench-alm leaderboard

From Python, :func:`evaluate` takes a model you hold and returns its leaderboard entry. Torch is
imported only when a torch-using name is first touched, so the leaderboard tools run without it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["evaluate", "train", "TrainConfig", "load_suite", "__version__"]

_LAZY = {
    "evaluate": "robustbench_alm.evaluation",
    "train": "robustbench_alm.training",
    "TrainConfig": "robustbench_alm.training",
    "load_suite": "robustbench_alm.suites",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'robustbench_alm' has no attribute {name!r}")
