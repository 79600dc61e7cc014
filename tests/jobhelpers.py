"""Submissions for the job tests: a briefly trained cnn-small and the folders that hold it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustbench_alm.models import create_model

METADATA = {
    "name": "cnn-small job test",
    "authors": ["T. Tester"],
    "link": "https://example.org/paper",
    "dataset": "fashion-mnist",
    "threat_model": "Linf",
    "eps": "0.1",
    "architecture": "cnn-small",
    "training_method": "standard",
    "additional_data": False,
    "license": "MIT",
}

#: A suite with enough work per batch that a worker can be killed in the middle of a stage.
SLOW_SUITE = """name = "pgd-40-apgd"
description = "PGD-40 then APGD-CE (20 iterations): a test suite"
threat_models = ["Linf", "L2"]

[[attack]]
name = "pgd-40"
kind = "pgd"
steps = 40
step_size = "eps/4"
random_start = true
restarts = 1
loss = "ce"

[[attack]]
name = "apgd-ce-20"
kind = "apgd-ce"
n_iter = 20
"""


def train_cnn_small(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> nn.Module:
    """cnn-small after one pass of Adam over the given points (about 60% test accuracy)."""
    torch.manual_seed(seed)
    model = create_model("cnn-small")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for i in range(0, x.shape[0], 100):
        loss = nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, str, int, float)):
        return json.dumps(value)
    raise TypeError(value)


def write_metadata(folder: Path, **changes: Any) -> None:
    """submission.toml from METADATA with ``changes`` (a value of None drops the key)."""
    meta = {**METADATA, **changes}
    lines = [f"{k} = {_toml_value(v)}" for k, v in meta.items() if v is not None]
    (folder / "submission.toml").write_text("\n".join(lines) + "\n")


def make_submission(folder: Path, state: dict[str, torch.Tensor], **changes: Any) -> Path:
    """A submission folder with ``state`` as model.safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()},
              str(folder / "model.safetensors"))
    write_metadata(folder, **changes)
    return folder


def perturbed(state: dict[str, torch.Tensor], scale: float = 0.9) -> dict[str, torch.Tensor]:
    """Another model: the same weights with the last layer scaled (a different submission)."""
    state = copy.deepcopy(state)
    state["fc2.weight"] = state["fc2.weight"] * scale
    return state


def comparable(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry without its timing fields (date, seconds, each stage's seconds)."""
    out = {k: v for k, v in entry.items() if k not in ("date", "seconds")}
    out["attacks"] = [{k: v for k, v in s.items() if k != "seconds"} for s in entry["attacks"]]
    return out
