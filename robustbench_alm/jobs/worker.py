"""Submitting jobs and working on them.

    submit("my-model.tar.gz", "jobs/store.sqlite", suite="quick", n_examples=500)
    run_worker("jobs/store.sqlite", drain=True)           # or executor="ray"

:func:`submit` unpacks the submission safely into a scratch folder beside the store, validates
it (metadata, weights, test forward pass; every problem at once) and only then moves it to
``submissions/<sha256>/`` and queues the job, so a refused submission leaves nothing behind.
The same submission with the same settings is recognized by its sha256 and not queued twice.

:func:`run_worker` claims jobs one at a time (``concurrent`` jobs at once in threads) and runs
each phase by phase: it plans the phase's units from the committed results, hands the missing
ones to the executor, and commits each unit's payload as it arrives. A worker killed at any
moment loses at most the units in flight; the next worker plans the same units from the same
committed results and carries on. The last step builds the entry from the merged results and
writes it, with its per-example Parquet file, under the leaderboard folder. A job that raises
is marked failed with the message; the worker goes on with the next job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustbench_alm.entry import entry_path, indices_sha256, measurement_differences, \
    read_entry, validate_entry, write_entry
from robustbench_alm.evaluation import select_examples
from robustbench_alm.jobs import DEFAULT_LEASE
from robustbench_alm.jobs.archive import MAX_BYTES, MAX_FILES, SubmissionError, \
    tree_sha256, unpack
from robustbench_alm.jobs.executor import JobContext, make_executor
from robustbench_alm.jobs.store import JobStore, LostJob, new_owner, submissions_folder
from robustbench_alm.jobs.submission import Submission, load_model, read_metadata, validate
from robustbench_alm.per_example import build_frame, check_against_entry, examples_path, \
    write_examples
from robustbench_alm.resumable import CHECKS, Settings, assemble, next_units, phases
from robustbench_alm.suites import load_suite
from robustbench_alm.threat import ThreatModel

__all__ = ["submit", "Submitted", "run_worker", "WorkerReport", "run_job", "DEFAULT_LEASE"]

logger = logging.getLogger(__name__)


@dataclass
class Submitted:
    """The outcome of :func:`submit`."""

    job_id: int
    created: bool  # False: the same submission with the same settings was already there
    state: str
    sha256: str
    name: str


def submit(source: str | Path, store_path: str | Path, *, suite: str = "standard",
           n_examples: int = 500, split: str = "test", seed: int = 0, batch_size: int = 250,
           margins: bool = True, margin_steps: int | None = None,
           fmn_steps: int | None = None, delta_scale: str = "input",
           max_bytes: int = MAX_BYTES, max_files: int = MAX_FILES) -> Submitted:
    """Validate the submission at ``source`` and queue its evaluation.

    Raises:
        SubmissionError: listing every problem of the submission; nothing is queued or kept.
        ValueError: for bad settings (suite, eps, counts); nothing is queued or kept.
    """
    folder = submissions_folder(store_path)
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / f".incoming-{secrets.token_hex(6)}"
    try:
        root = unpack(source, scratch, max_bytes=max_bytes, max_files=max_files)
        try:
            sub = validate(root)
        except SubmissionError as err:  # name the submission as given, not the scratch folder
            raise SubmissionError(Path(source).name, err.problems) from None
        suite_obj = load_suite(suite)
        suite_obj.check_threat_model(ThreatModel.parse(sub.meta["threat_model"]))
        settings = Settings(
            dataset=sub.meta["dataset"], threat_model=sub.meta["threat_model"],
            eps=sub.meta["eps"], suite=suite, split=split, n_examples=n_examples, seed=seed,
            batch_size=batch_size, margins=margins, margin_steps=margin_steps,
            fmn_steps=fmn_steps,
            delta_scale=delta_scale, suite_text=suite_obj.path.read_text(encoding="utf-8"))
        sha = tree_sha256(root)
        final = folder / sha
        if not final.exists():
            try:
                os.replace(root, final)
            except OSError:
                if not final.exists():  # not a concurrent submit of the same content
                    raise
        key = hashlib.sha256(json.dumps({"submission": sha, "settings": settings.to_dict()},
                                        sort_keys=True).encode()).hexdigest()
        with JobStore(store_path) as store:
            job, created = store.add(key=key, submission_sha256=sha,
                                     submission_dir=str(Path("submissions") / sha),
                                     name=sub.name, settings=settings.to_dict())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return Submitted(job.id, created, job.state, sha, sub.name)


@dataclass
class WorkerReport:
    """What a worker did before it stopped."""

    done: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)


class _Heartbeat(threading.Thread):
    """Renews a job's lease while the worker works on it (its own store connection)."""

    def __init__(self, store_path: Path, job_id: int, owner: str, lease: float):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.args = (store_path, job_id, owner, lease)
        self.stopped = threading.Event()
        self.lost = False

    def run(self) -> None:
        store_path, job_id, owner, lease = self.args
        with JobStore(store_path) as store:
            while not self.stopped.wait(lease / 4):
                try:
                    store.renew(job_id, owner, lease)
                except LostJob:
                    self.lost = True
                    return

    def stop(self) -> None:
        self.stopped.set()
        self.join()


def _progress(phase: str, names: list[str], done: int, total: int) -> str:
    label = phase.removeprefix("stage:")
    return f"{label}: {done}/{total} batches (phase {names.index(phase) + 1} of {len(names)})"


def _job_context(job, store_path: Path, data_dir) -> tuple[JobContext, Submission, list, str]:
    settings = Settings(**job.settings)
    root = store_path.parent / job.submission_dir
    if not root.is_dir():
        raise FileNotFoundError(f"the job's submission folder {str(root)!r} is gone")
    sha = tree_sha256(root)
    if sha != job.submission_sha256:
        raise ValueError(f"the stored submission {str(root)!r} changed since it was submitted "
                         f"(sha256 {sha[:12]}..., expected {job.submission_sha256[:12]}...)")
    loaded = load_model(root)  # raises SubmissionError with the problems
    sub = Submission(root=root, meta=read_metadata(root, []), loaded=loaded)
    x, y, idx, how = select_examples(settings.dataset, settings.split, settings.n_examples,
                                     None, data_dir)
    ctx = JobContext(job.id, root, sha, settings, x, y)
    return ctx, sub, idx, how


def run_job(store: JobStore, job, owner: str, executor, *, leaderboard_dir: Path,
            data_dir=None, lease_seconds: float = DEFAULT_LEASE) -> str:
    """Run one claimed job to its end; return its final state (``done``, ``failed``, ``lost``)."""
    heartbeat = _Heartbeat(store.path, job.id, owner, lease_seconds)
    heartbeat.start()
    try:
        ctx, sub, idx, how = _job_context(job, store.path, data_dir)
        settings, n = ctx.settings, len(idx)
        suite = settings.load_suite()
        # Refuse before any work an entry file that another evaluation already holds.
        meta = sub.entry_meta()
        _check_replace(entry_path(leaderboard_dir, {
            "dataset": settings.dataset, "threat_model": settings.threat_model,
            "entry_id": meta["entry_id"]}), {
            "suite": {"sha256": suite.sha256}, "eps": settings.eps,
            "threat_model": settings.threat_model, "seed": settings.seed,
            "examples": {"indices_sha256": indices_sha256(settings.dataset, settings.split, idx)},
            "weights_sha256": meta["weights_sha256"]})
        executor.start(ctx)
        names = phases(settings, suite)
        results = store.results(job.id)
        while (step := next_units(settings, n, results, suite)) is not None:
            phase, units = step
            done = results.setdefault(phase, {})
            todo = [u for u in units if u.batch not in done]
            checked = results.get(CHECKS, {}).get(0)
            logger.info("job %d: %s, %d of %d batches to run", job.id, phase, len(todo),
                        len(units))
            for unit, payload in executor.run(todo, ctx, checked):
                done[unit.batch] = payload
                store.commit(job.id, owner, phase, unit.batch, payload,
                             progress=_progress(phase, names, len(done), len(units)),
                             lease_seconds=lease_seconds)
        path = _write_results(job, sub, settings, results, ctx, idx, how, leaderboard_dir)
        entry = read_entry(path)
        store.finish(job.id, owner, entry, str(path))
        logger.info("job %d done: robust accuracy %.2f%%, wrote %s", job.id,
                    entry["robust_acc"], path)
        return "done"
    except LostJob as err:
        logger.warning("job %d: %s; leaving it to its new owner", job.id, err)
        return "lost"
    except Exception as err:  # a job's failure is recorded; the worker goes on
        message = f"{type(err).__name__}: {err}"
        logger.error("job %d failed: %s", job.id, message)
        try:
            store.fail(job.id, owner, message, traceback.format_exc())
        except LostJob:
            return "lost"
        return "failed"
    finally:
        heartbeat.stop()
        executor.finish()


def _write_results(job, sub: Submission, settings: Settings, results, ctx: JobContext,
                   idx: list[int], how: str, leaderboard_dir: Path) -> Path:
    meta = sub.entry_meta()
    architecture = meta.pop("architecture")
    entry, per_example = assemble(
        settings, results, y=ctx.y, idx=idx, how=how,
        idx_hash=indices_sha256(settings.dataset, settings.split, idx),
        architecture=architecture, **meta)
    entry["submission"] = {"sha256": job.submission_sha256, "license": sub.meta["license"]}
    validate_entry(entry)
    arrays = {name: t.detach().cpu().numpy() for name, t in per_example.items()}
    rows = build_frame(arrays, dataset=settings.dataset, split=settings.split, indices=idx)
    check_against_entry(rows, entry)
    target = entry_path(leaderboard_dir, entry)
    _check_replace(target, entry)
    path = write_entry(leaderboard_dir, entry)
    write_examples(examples_path(path), rows)
    return path


def _check_replace(path: Path, entry: dict[str, Any]) -> None:
    """A job replaces an entry of its own evaluation only, never another one's."""
    if not path.exists():
        return
    try:
        old = read_entry(path)
    except ValueError:
        return  # an unreadable file is no measurement to protect
    differ = measurement_differences(old, entry)
    if differ:
        raise ValueError(f"{path} already holds an entry evaluated with another "
                         f"{', '.join(differ)}; move that entry away, or set entry_id in "
                         "submission.toml to file this one under another name")


def run_worker(store_path: str | Path, *, executor: str = "local", ray_address: str | None = None,
               ray_num_cpus: int | None = None, once: bool = False, drain: bool = False,
               leaderboard_dir: str | Path = "leaderboards", data_dir: str | Path | None = None,
               device: str = "cpu", lease_seconds: float = DEFAULT_LEASE,
               poll_seconds: float = 2.0, concurrent: int = 1,
               stop: threading.Event | None = None) -> WorkerReport:
    """Take queued jobs and run them until stopped.

    Args:
        once: run at most one job (per thread), then return.
        drain: return when no job is left to claim, instead of waiting for new ones.
        concurrent: jobs run at once, each in its own thread (with Ray, several submissions
            share the cluster).
        stop: an event that ends the worker after its current jobs.
    """
    if isinstance(concurrent, bool) or not isinstance(concurrent, int) or concurrent < 1:
        raise ValueError(f"concurrent must be an integer >= 1, got {concurrent!r}")
    store_path, leaderboard_dir = Path(store_path), Path(leaderboard_dir)
    if not store_path.exists():
        raise FileNotFoundError(f"no job store at {str(store_path)!r}; `robustbench-alm submit` "
                                "creates one (--store to choose the file)")
    stop = stop or threading.Event()
    report = WorkerReport()
    lock = threading.Lock()

    def loop() -> None:
        runner = make_executor(executor, device=device, ray_address=ray_address,
                               ray_num_cpus=ray_num_cpus)
        with JobStore(store_path) as store:
            while not stop.is_set():
                owner = new_owner()
                job = store.claim(owner, lease_seconds)
                if job is None:
                    if once or drain:
                        return
                    stop.wait(poll_seconds)
                    continue
                logger.info("job %d (%s): claimed, attempt %d", job.id, job.name, job.attempts)
                state = run_job(store, job, owner, runner, leaderboard_dir=leaderboard_dir,
                                data_dir=data_dir, lease_seconds=lease_seconds)
                with lock:
                    getattr(report, state).append(job.id)
                if once:
                    return

    if concurrent == 1:
        loop()
        return report
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            loop()
        except BaseException as err:  # surfaced to the caller below
            errors.append(err)

    threads = [threading.Thread(target=guarded, name=f"worker-{i}") for i in range(concurrent)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return report
