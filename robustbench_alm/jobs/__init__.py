"""Submissions and benchmark jobs: safe model intake, a durable job store, workers, executors.

    robustbench-alm submit my-model.tar.gz --suite quick --n-examples 500
    robustbench-alm worker --drain                 # or: --executor ray
    robustbench-alm jobs

Modules: :mod:`~robustbench_alm.jobs.archive` unpacks a submission safely and hashes it;
:mod:`~robustbench_alm.jobs.submission` validates its metadata and weights and loads the model
without running its code; :mod:`~robustbench_alm.jobs.store` is the job store (SQLite, one
file); :mod:`~robustbench_alm.jobs.worker` takes jobs and runs them through an executor
(:mod:`~robustbench_alm.jobs.executor`: in this process, or on a Ray cluster).

Job layer: calls the evaluation layer; nothing below imports it. This package's ``__init__``
imports nothing, so reading the store (``robustbench-alm jobs``) needs no torch.
"""

#: Where a job's units run: in the worker's process, or as tasks on a Ray cluster.
EXECUTORS = ("local", "ray")
#: Seconds a claim holds a job without a heartbeat; a worker renews it every quarter of that.
DEFAULT_LEASE = 120.0
