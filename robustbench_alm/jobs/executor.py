"""Executors: where a job's units run. In this process (``local``), or as Ray tasks (``ray``).

Both take the units of one phase and yield each unit with its payload as soon as it is done;
the worker commits each one to the store. Because every unit's result depends only on the
model, its points and the seed (:mod:`robustbench_alm.resumable`), both give the same results.

Ray: each unit is one task (``num_cpus=1``, and ``num_gpus=1`` when the cluster has GPUs). The
submission's files travel through Ray's object store once per job, so the nodes need no shared
file system; each task process rebuilds the model from those files with the same safe loader
as the intake, and keeps it for the next unit of the same submission. The nodes need
robustbench-alm installed (with the same torch: bitwise equal results need the same kernels).
A Ray instance started here (no ``--ray-address``) listens on 127.0.0.1 only and sends no usage
statistics.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from robustbench_alm.jobs import EXECUTORS
from robustbench_alm.jobs.archive import tree_sha256
from robustbench_alm.jobs.submission import load_model
from robustbench_alm.resumable import Settings, Unit, run_unit

__all__ = ["JobContext", "LocalExecutor", "RayExecutor", "make_executor", "start_local_ray",
           "EXECUTORS"]

logger = logging.getLogger(__name__)


@dataclass
class JobContext:
    """What every unit of one job needs: its submission, points and settings."""

    job_id: int
    root: Path
    sha256: str
    settings: Settings
    x: torch.Tensor
    y: torch.Tensor


#: Units of local jobs run one at a time: attacks seed torch's global RNG, which threads share.
_LOCAL_UNIT_LOCK = threading.Lock()


class LocalExecutor:
    """Runs units one after another in this process, on ``device``.

    Jobs of several worker threads take turns unit by unit: attacks (AutoAttack, Foolbox)
    reseed and draw from torch's global RNG, which two units running at once would share.
    """

    name = "local"

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._model = None

    def start(self, ctx: JobContext) -> None:
        self._model = load_model(ctx.root).model.to(self.device)

    def run(self, units: list[Unit], ctx: JobContext, checked: dict[str, Any] | None
            ) -> Iterator[tuple[Unit, dict[str, Any]]]:
        for unit in units:
            pos = torch.tensor(unit.positions, dtype=torch.long)
            with _LOCAL_UNIT_LOCK:
                payload = run_unit(self._model, unit, ctx.x[pos], ctx.y[pos], ctx.settings,
                                   checked)
            yield unit, payload

    def finish(self) -> None:
        self._model = None


# --- Ray -------------------------------------------------------------------------------------

_RAY_LOCK = threading.Lock()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("the ray executor needs Ray, which is not installed here; "
                         "pip install 'robustbench-alm[ray]'") from None
    return ray


def start_local_ray(num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Start a Ray instance on this machine that listens on 127.0.0.1 only.

    Ray binds its servers to the node's address; with clusters disabled it takes the loopback
    address, and with usage statistics disabled it contacts nothing outside. Both settings are
    read when ``ray`` is first imported, so this must run before anything imports it.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if "ray" in sys.modules:
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            raise RuntimeError("ray was imported before start_local_ray, so a local instance "
                               "would listen on every interface; start it first, or connect to "
                               "a running cluster with --ray-address")
    ray = _import_ray()
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False, logging_level=logging.WARNING)


def _connect(address: str | None, num_cpus: int | None) -> Any:
    with _RAY_LOCK:
        if "ray" not in sys.modules or not sys.modules["ray"].is_initialized():
            if address:
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                _import_ray().init(address=address, log_to_driver=False,
                                   logging_level=logging.WARNING)
            else:
                start_local_ray(num_cpus=num_cpus)
        return sys.modules["ray"]


_TASK_MODELS: dict[str, torch.nn.Module] = {}


def _task_model(files: dict[str, bytes], sha256: str, device: str) -> torch.nn.Module:
    """The submission's model in a Ray task process, rebuilt from its files once per process."""
    key = f"{sha256}:{device}"
    if key not in _TASK_MODELS:
        folder = Path(tempfile.mkdtemp(prefix="rbalm-submission-"))
        try:
            for rel, data in files.items():
                path = folder.joinpath(*rel.split("/"))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            if tree_sha256(folder) != sha256:
                raise ValueError(f"the submission's files arrived changed (sha256 differs from "
                                 f"{sha256[:12]}...)")
            model = load_model(folder).model.to(device)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        _TASK_MODELS.clear()  # one submission per task process at a time
        _TASK_MODELS[key] = model
    return _TASK_MODELS[key]


def _ray_unit(files: dict[str, bytes], sha256: str, unit: Unit, x: torch.Tensor,
              y: torch.Tensor, settings: dict[str, Any], checked: dict[str, Any] | None,
              device: str) -> dict[str, Any]:
    model = _task_model(files, sha256, device)
    return run_unit(model, unit, x, y, Settings(**settings), checked)


def _read_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


class RayExecutor:
    """Runs each unit as one Ray task; yields the units in the order they finish."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        self.ray = _connect(address, num_cpus)
        self.gpus = self.ray.cluster_resources().get("GPU", 0) >= 1
        self._remote = self.ray.remote(_ray_unit)
        self._files = None

    def start(self, ctx: JobContext) -> None:
        self._files = self.ray.put(_read_files(ctx.root))

    def run(self, units: list[Unit], ctx: JobContext, checked: dict[str, Any] | None
            ) -> Iterator[tuple[Unit, dict[str, Any]]]:
        ray = self.ray
        task = self._remote.options(num_cpus=1, num_gpus=1 if self.gpus else 0, max_retries=2)
        device = "cuda" if self.gpus else "cpu"
        settings = ctx.settings.to_dict()
        pending = {}
        for unit in units:
            pos = torch.tensor(unit.positions, dtype=torch.long)
            ref = task.remote(self._files, ctx.sha256, unit, ctx.x[pos], ctx.y[pos], settings,
                              checked, device)
            pending[ref] = unit
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    unit = pending.pop(ref)
                    try:
                        payload = ray.get(ref)
                    except ray.exceptions.RayTaskError as err:
                        # The job records the task's own message, not Ray's wrapper.
                        cause = getattr(err, "cause", None)
                        text = f"{type(cause).__name__}: {cause}" if cause is not None \
                            else str(err).strip().splitlines()[-1]
                        raise RuntimeError(f"{unit.phase} batch {unit.batch} failed on Ray: "
                                           f"{text}") from None
                    yield unit, payload
        finally:
            for ref in pending:  # stopped early (an error, or the worker shutting down)
                ray.cancel(ref)

    def finish(self) -> None:
        self._files = None


def make_executor(name: str, *, device: str = "cpu", ray_address: str | None = None,
                  ray_num_cpus: int | None = None):
    """An executor by name: ``local`` or ``ray``."""
    if name == "local":
        return LocalExecutor(device)
    if name == "ray":
        return RayExecutor(ray_address, ray_num_cpus)
    raise ValueError(f"unknown executor {name!r}; expected one of {', '.join(EXECUTORS)}")
