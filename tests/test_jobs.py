"""The job store and workers: exclusive claims, leases, failures, and resume after SIGKILL."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from robustbench_alm.jobs.store import JobStore, LostJob, new_owner
from robustbench_alm.jobs.worker import run_worker, submit
from tests.jobhelpers import (SLOW_SUITE, comparable, make_submission, perturbed,
                              train_cnn_small)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cnn_state(fmnist_train):
    x, y = fmnist_train
    return train_cnn_small(x[:1200], y[:1200]).state_dict()


def _add(store: JobStore, i: int):
    return store.add(key=f"k{i}", submission_sha256="0" * 64, submission_dir="submissions/x",
                     name=f"job {i}", settings={"suite": "quick"})[0]


def _claim_all(path: str, queue, release) -> None:
    """Claim jobs until none is left (in a separate process); report the ids taken.

    The process stays alive until released: a dead owner's jobs are claimable again.
    """
    store = JobStore(path)
    taken = []
    while (job := store.claim(new_owner(), lease_seconds=600)) is not None:
        taken.append(job.id)
    queue.put(taken)
    release.wait(60)


def test_two_workers_never_take_the_same_job(tmp_path):
    path = tmp_path / "store.sqlite"
    with JobStore(path) as store:
        for i in range(40):
            _add(store, i)
    ctx = multiprocessing.get_context("fork")
    queue, release = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_claim_all, args=(str(path), queue, release))
             for _ in range(3)]
    for p in procs:
        p.start()
    taken = [queue.get(timeout=60) for _ in procs]
    release.set()
    for p in procs:
        p.join(timeout=60)
    ids = [i for t in taken for i in t]
    assert sorted(ids) == list(range(1, 41))  # every job once, none twice


def test_stale_running_job_is_claimed_again(tmp_path):
    with JobStore(tmp_path / "store.sqlite") as store:
        job = _add(store, 0)
        live = new_owner()
        assert store.claim(live, lease_seconds=600).id == job.id
        assert store.claim(new_owner(), lease_seconds=600) is None  # a live owner keeps it

        # Its owner dies (a process of this machine that is gone): claimable at once.
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        host, pidns, _, token = live.split("/")
        ghost = f"{host}/{pidns}/{dead.pid}/{token}"
        store._db.execute("UPDATE jobs SET owner = ? WHERE id = ?", (ghost, job.id))
        second = new_owner()
        assert store.claim(second, lease_seconds=600).attempts == 2
        with pytest.raises(LostJob):
            store.commit(job.id, ghost, "clean", 0, {}, progress="", lease_seconds=1)

        # An owner elsewhere (another machine) whose lease ran out: claimable too.
        store._db.execute("UPDATE jobs SET owner = 'elsewhere/1/1/x', lease_until = ? "
                          "WHERE id = ?", (time.time() - 1, job.id))
        third = new_owner()
        assert store.claim(third, lease_seconds=600).attempts == 3
        with pytest.raises(LostJob):
            store.renew(job.id, second, 600)
        store.renew(job.id, third, 600)


def test_job_entry_equals_run_evaluation_and_failures_are_recorded(tmp_path, cnn_state):
    """A job gives evaluate's entry; a broken job fails with its reason and the next runs."""
    from robustbench_alm.evaluation import run_evaluation
    from robustbench_alm.models import create_model

    store = tmp_path / "jobs" / "store.sqlite"
    broken = submit(make_submission(tmp_path / "broken", perturbed(cnn_state)), store,
                    suite="quick", n_examples=30, batch_size=8, margin_steps=5)
    good = submit(make_submission(tmp_path / "good", cnn_state), store, suite="quick",
                  n_examples=30, batch_size=8, margin_steps=5)
    # Tamper with the stored copy of the first submission: the worker must notice.
    toml = store.parent / "submissions" / broken.sha256 / "submission.toml"
    toml.write_text(toml.read_text().replace("MIT", "GPL"))
    report = run_worker(store, drain=True, leaderboard_dir=tmp_path / "lb")
    assert report.failed == [broken.job_id] and report.done == [good.job_id]

    with JobStore(store) as s:
        failed, done = s.get(broken.job_id), s.get(good.job_id)
    assert failed.state == "failed"
    assert "changed since it was submitted" in failed.error and failed.traceback
    model = create_model("cnn-small")
    model.load_state_dict(cnn_state)
    ref = run_evaluation(model, dataset="fashion-mnist", n_examples=30, eps=0.1, suite="quick",
                         batch_size=8, margin_steps=5, progress=False).entry
    keys = set(comparable(ref)) - {"name", "entry_id", "authors", "link", "architecture",
                                   "training", "weights_sha256"}
    ours = comparable(done.entry)
    assert {k: ours[k] for k in keys} == {k: comparable(ref)[k] for k in keys}
    assert ours["submission"] == {"sha256": good.sha256, "license": "MIT"}
    path = Path(done.entry_path)
    assert json.loads(path.read_text()) == done.entry
    assert path.with_name(path.stem + ".examples.parquet").is_file()


def _worker(store: Path, lb: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "robustbench_alm.cli", "worker", "--store", str(store),
         "--drain", "--lease", "30", "--leaderboard-dir", str(lb)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _stage_units(store: Path, job_id: int) -> tuple[int, str]:
    with JobStore(store) as s:
        n = s._db.execute("SELECT COUNT(*) FROM results WHERE job_id = ? AND phase LIKE "
                          "'stage:%'", (job_id,)).fetchone()[0]
        return n, s.get(job_id).state


def test_worker_killed_mid_attack_resumes_to_the_same_entry(tmp_path, cnn_state):
    suite = tmp_path / "pgd-40-apgd.toml"
    suite.write_text(SLOW_SUITE)
    sub = make_submission(tmp_path / "sub", cnn_state)
    settings = dict(suite=str(suite), n_examples=48, batch_size=6, margin_steps=5)

    # Uninterrupted, in a store of its own, by a worker process like the killed one: the same
    # thread count, since a float reduction may round differently with another.
    calm = tmp_path / "calm" / "store.sqlite"
    job = submit(sub, calm, **settings)
    worker = _worker(calm, tmp_path / "lb-calm")
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err

    # Killed with SIGKILL once some attack batches are committed, then started again.
    store = tmp_path / "killed" / "store.sqlite"
    job = submit(sub, store, **settings)
    lb = tmp_path / "lb-killed"
    worker = _worker(store, lb)
    deadline = time.time() + 120
    while (state := _stage_units(store, job.job_id)) and state[0] < 2:
        assert worker.poll() is None, worker.stderr.read()
        assert time.time() < deadline, "the worker committed no attack batch in 120 s"
        time.sleep(0.02)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    committed, state = _stage_units(store, job.job_id)
    assert state == "running"  # killed in the middle: the job was not finished
    worker = _worker(store, lb)
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err

    with JobStore(calm) as a, JobStore(store) as b:
        first, resumed = a.get(job.job_id), b.get(job.job_id)
        units = b.count_results(job.job_id)
    assert resumed.state == "done" and resumed.attempts == 2
    assert committed < units  # the second worker had work left
    assert comparable(resumed.entry) == comparable(first.entry)
    assert resumed.entry["robust_acc"] < resumed.entry["clean_acc"]  # the attacks broke points
    frames = [pd.read_parquet(Path(j.entry_path).with_name(
        Path(j.entry_path).stem + ".examples.parquet")) for j in (first, resumed)]
    pd.testing.assert_frame_equal(frames[0], frames[1])


def test_jobs_command_lists_without_torch(tmp_path, cnn_state):
    store = tmp_path / "store.sqlite"
    submit(make_submission(tmp_path / "sub", cnn_state), store, suite="quick", n_examples=10)
    code = ("import sys\nfrom robustbench_alm.cli import main\n"
            f"main(['jobs', '--store', {str(store)!r}])\n"
            "assert 'torch' not in sys.modules, 'jobs imported torch'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "queued" in out.stdout and "cnn-small job test" in out.stdout
    assert "[quick, Linf eps 0.1, 10 points]" in out.stdout


def test_submit_command_reports_every_problem_and_exits_2(tmp_path, capsys, cnn_state):
    from robustbench_alm.cli import main

    state = dict(cnn_state)
    state["fc2.bias"] = state["fc2.bias"] * float("nan")
    folder = make_submission(tmp_path / "sub", state, license=None)
    assert main(["submit", str(folder), "--store", str(tmp_path / "s.sqlite")]) == 2
    err = capsys.readouterr().err
    assert "submission sub refused (2 problems); nothing was queued" in err
    assert "license: missing" in err and "'fc2.bias' has 10 NaN" in err
    assert not (tmp_path / "s.sqlite").exists()
