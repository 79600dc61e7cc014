"""The job store: one SQLite file holding every job, its state and its committed results.

    store = JobStore("jobs/store.sqlite")
    job = store.claim(owner, lease_seconds=120)        # atomically: queued -> running
    store.commit(job.id, owner, "stage:apgd-ce", 0, payload, progress="apgd-ce 1/3")
    store.finish(job.id, owner, entry, "leaderboards/.../x.json")

States: ``queued`` -> ``running`` -> ``done`` or ``failed``. A claim runs in one ``BEGIN
IMMEDIATE`` transaction, which holds SQLite's write lock from the first read, so two workers
(threads, processes, or machines sharing the file on a local disk) never take the same job.

A running job carries its owner (host, PID namespace, PID and a random token) and a lease that
the owner renews while it works. A job whose lease ran out, or whose owner is a process of this
machine that no longer exists, is claimable again: a worker killed with SIGKILL loses its job
to the next worker, which resumes from the committed results. Each commit checks, in the same
transaction, that the committer still owns the job; a worker that lost its lease learns so at
its next commit and stops (:class:`LostJob`), so a job's results always come from one owner at
a time.

The database runs in WAL mode with ``synchronous=FULL``: a committed result survives the
process and the machine going down. Job layer; standard library only (no torch), so listing
jobs needs nothing else.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["JobStore", "Job", "LostJob", "STATES", "DEFAULT_STORE", "new_owner",
           "submissions_folder"]

#: Where the command line keeps its store unless told otherwise.
DEFAULT_STORE = Path("jobs") / "store.sqlite"
STATES = ("queued", "running", "done", "failed")
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    submission_sha256 TEXT NOT NULL,
    submission_dir TEXT NOT NULL,
    name TEXT NOT NULL,
    settings TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    owner TEXT,
    lease_until REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    progress TEXT NOT NULL DEFAULT '',
    units_done INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    traceback TEXT,
    entry TEXT,
    entry_path TEXT
);
CREATE TABLE IF NOT EXISTS results (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    phase TEXT NOT NULL,
    batch INTEGER NOT NULL,
    payload TEXT NOT NULL,
    committed REAL NOT NULL,
    PRIMARY KEY (job_id, phase, batch)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
"""


class LostJob(RuntimeError):
    """This worker no longer owns the job (its lease ran out and another worker took it)."""


@dataclass
class Job:
    """One row of the store."""

    id: int
    key: str
    submission_sha256: str
    submission_dir: str
    name: str
    settings: dict[str, Any]
    state: str
    owner: str | None
    lease_until: float | None
    attempts: int
    created: float
    started: float | None
    finished: float | None
    progress: str
    units_done: int
    error: str | None
    traceback: str | None
    entry: dict[str, Any] | None
    entry_path: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        data = dict(row)
        data["settings"] = json.loads(data["settings"])
        data["entry"] = json.loads(data["entry"]) if data["entry"] else None
        return cls(**data)


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "?"


def new_owner() -> str:
    """An owner id for one claim: this host, PID namespace and process, and a random token."""
    return f"{socket.gethostname()}/{_pid_namespace()}/{os.getpid()}/{secrets.token_hex(4)}"


def _owner_is_dead(owner: str | None) -> bool:
    """True only when ``owner`` is a process of this machine that is gone (or a zombie)."""
    if not owner:
        return False
    parts = owner.split("/")
    if len(parts) != 4 or parts[0] != socket.gethostname() or parts[1] != _pid_namespace():
        return False  # another machine or container: only its lease can tell
    try:
        pid = int(parts[2])
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (ValueError, PermissionError):
        return False
    try:  # a killed child that its parent has not reaped yet is a zombie: dead
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state in ("Z", "X")
    except (OSError, IndexError):
        return False


def submissions_folder(store_path: str | Path) -> Path:
    """Where a store keeps its submissions: ``submissions/`` beside the store file."""
    return Path(store_path).parent / "submissions"


class JobStore:
    """A job store in the SQLite file ``path`` (created with its folder when missing).

    One instance per thread: SQLite connections are not shared between threads.
    """

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            if not create:
                raise FileNotFoundError(f"no job store at {str(self.path)!r}; `robustbench-alm "
                                        "submit` creates one (--store to choose the file)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA busy_timeout = 60000")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute("PRAGMA foreign_keys = ON")
        with self._write():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise ValueError(f"job store {str(self.path)!r} has schema version {version}; "
                                 f"this robustbench-alm reads version {_SCHEMA_VERSION}")
            if version == 0:
                # One statement at a time: executescript would commit the open transaction.
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding the write lock from its first statement."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # --- submitting and reading -------------------------------------------------------------

    def add(self, *, key: str, submission_sha256: str, submission_dir: str, name: str,
            settings: dict[str, Any]) -> tuple[Job, bool]:
        """Queue a job; return it and True, or the job already under ``key`` and False."""
        with self._write() as db:
            row = db.execute("SELECT * FROM jobs WHERE key = ?", (key,)).fetchone()
            if row is not None:
                return Job.from_row(row), False
            cur = db.execute(
                "INSERT INTO jobs (key, submission_sha256, submission_dir, name, settings, "
                "state, created) VALUES (?, ?, ?, ?, ?, 'queued', ?)",
                (key, submission_sha256, submission_dir, name,
                 json.dumps(settings, sort_keys=True), time.time()))
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (cur.lastrowid,)).fetchone()
        return Job.from_row(row), True

    def get(self, job_id: int) -> Job:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise ValueError(f"no job {job_id} in {self.path}")
        return Job.from_row(row)

    def jobs(self) -> list[Job]:
        return [Job.from_row(r) for r in self._db.execute("SELECT * FROM jobs ORDER BY id")]

    def results(self, job_id: int) -> dict[str, dict[int, dict[str, Any]]]:
        """The committed results of a job: phase -> batch -> payload."""
        out: dict[str, dict[int, dict[str, Any]]] = {}
        for row in self._db.execute("SELECT phase, batch, payload FROM results WHERE job_id = ?",
                                    (job_id,)):
            out.setdefault(row["phase"], {})[row["batch"]] = json.loads(row["payload"])
        return out

    def count_results(self, job_id: int) -> int:
        return self._db.execute("SELECT COUNT(*) FROM results WHERE job_id = ?",
                                (job_id,)).fetchone()[0]

    # --- working on jobs --------------------------------------------------------------------

    def claim(self, owner: str, lease_seconds: float) -> Job | None:
        """Take the oldest claimable job: queued, or running with a lapsed or dead owner."""
        now = time.time()
        with self._write() as db:
            rows = db.execute(
                "SELECT id, state, owner, lease_until FROM jobs WHERE state IN "
                "('queued', 'running') ORDER BY id").fetchall()
            chosen = next((r["id"] for r in rows if r["state"] == "queued"
                           or (r["lease_until"] or 0) < now or _owner_is_dead(r["owner"])),
                          None)
            if chosen is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', owner = ?, lease_until = ?, "
                       "attempts = attempts + 1, started = COALESCE(started, ?), error = NULL, "
                       "traceback = NULL WHERE id = ?",
                       (owner, now + lease_seconds, now, chosen))
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (chosen,)).fetchone()
        return Job.from_row(row)

    def _check_owner(self, db: sqlite3.Connection, job_id: int, owner: str) -> None:
        row = db.execute("SELECT state, owner FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or row["state"] != "running" or row["owner"] != owner:
            raise LostJob(f"job {job_id} is no longer ours (now {row['state'] if row else 'gone'}"
                          f", owner {row['owner'] if row else None})")

    def renew(self, job_id: int, owner: str, lease_seconds: float) -> None:
        """Extend the lease; raises :class:`LostJob` when the job is no longer ours."""
        with self._write() as db:
            self._check_owner(db, job_id, owner)
            db.execute("UPDATE jobs SET lease_until = ? WHERE id = ?",
                       (time.time() + lease_seconds, job_id))

    def commit(self, job_id: int, owner: str, phase: str, batch: int, payload: dict[str, Any],
               *, progress: str, lease_seconds: float) -> None:
        """Store one unit's result (and the progress line) in one transaction."""
        text = json.dumps(payload)
        with self._write() as db:
            self._check_owner(db, job_id, owner)
            db.execute("INSERT OR IGNORE INTO results (job_id, phase, batch, payload, committed) "
                       "VALUES (?, ?, ?, ?, ?)", (job_id, phase, batch, text, time.time()))
            db.execute("UPDATE jobs SET progress = ?, lease_until = ?, units_done = "
                       "(SELECT COUNT(*) FROM results WHERE job_id = ?) WHERE id = ?",
                       (progress, time.time() + lease_seconds, job_id, job_id))

    def set_progress(self, job_id: int, owner: str, progress: str) -> None:
        with self._write() as db:
            self._check_owner(db, job_id, owner)
            db.execute("UPDATE jobs SET progress = ? WHERE id = ?", (progress, job_id))

    def finish(self, job_id: int, owner: str, entry: dict[str, Any], entry_path: str) -> None:
        with self._write() as db:
            self._check_owner(db, job_id, owner)
            db.execute("UPDATE jobs SET state = 'done', entry = ?, entry_path = ?, finished = ?, "
                       "owner = NULL, lease_until = NULL, progress = 'done' WHERE id = ?",
                       (json.dumps(entry), entry_path, time.time(), job_id))

    def fail(self, job_id: int, owner: str, error: str, traceback: str | None = None) -> None:
        """Record why a job failed; the results committed so far stay for a retry."""
        with self._write() as db:
            self._check_owner(db, job_id, owner)
            db.execute("UPDATE jobs SET state = 'failed', error = ?, traceback = ?, "
                       "finished = ?, owner = NULL, lease_until = NULL WHERE id = ?",
                       (error, traceback, time.time(), job_id))

    def requeue(self, job_id: int) -> Job:
        """Queue a failed job again; it resumes from its committed results."""
        with self._write() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise ValueError(f"no job {job_id} in {self.path}")
            if row["state"] != "failed":
                raise ValueError(f"job {job_id} is {row['state']}; only a failed job can be "
                                 "queued again")
            db.execute("UPDATE jobs SET state = 'queued', owner = NULL, lease_until = NULL "
                       "WHERE id = ?", (job_id,))
        return self.get(job_id)
