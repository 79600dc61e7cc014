"""The container image: a benchmark job run inside it, offline, gives the entry it gives outside.

``test_job_in_container_matches_outside`` is marked ``slow`` and ``container``: ``make
test-container`` runs it (``make test`` does not). It builds the image (``make container`` does the
same; the build cache makes a rebuild take seconds when nothing changed), trains a tiny checkpoint
here, evaluates it here and inside the container with ``--network none``, the submission folder
mounted read-only and the results folder mounted, and compares the two entries.

Environment (the Makefile sets them):
    CONTAINER_ENGINE        the engine command, words allowed (default "podman")
    CONTAINER_RUN_ARGS      extra options for build and run (e.g. ulimits)
    CONTAINER_BUILD_ARGS    extra options for build (default: the offline CPU build from ./wheels
                            when that folder exists: WHEELS=wheels, TORCHVISION=no)
    CONTAINER_IMAGE         the tag (default localhost/robustbench-alm)
    CONTAINER_NO_BUILD=1    use the image as it is
    CONTAINER_BASE          the base image to expect (default localhost/bookworm-minbase, the
                            Dockerfile's default BASE; make it with docker/build-base.sh)

The two quick tests at the end guard what the image first exposed: an installed (not editable)
package must find its suites, and foolbox must import where no git program exists.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE = shlex.split(os.environ.get("CONTAINER_ENGINE", "podman"))
RUN_ARGS = shlex.split(os.environ.get("CONTAINER_RUN_ARGS", ""))
IMAGE = os.environ.get("CONTAINER_IMAGE", "localhost/robustbench-alm")
BASE = os.environ.get("CONTAINER_BASE", "localhost/bookworm-minbase")

# The job: a tiny checkpoint, 32 test points, the quick suite, short margin searches.
TRAIN = ["train", "--method", "standard", "--arch", "cnn-small", "--epochs", "2",
         "--train-subset", "2048", "--lr", "0.003", "--seed", "0", "--quiet"]
EVALUATE = ["--eps", "0.05", "--suite", "quick", "--n-examples", "32", "--seed", "0",
            "--margin-steps", "3", "--fmn-steps", "10", "--entry-id", "job", "--device", "cpu",
            "--quiet"]

# Fields that may differ between the two runs, and why:
#   date, seconds (entry and each stage): when and how fast it ran;
#   versions: the image runs its own Python (Debian's 3.11) and its own PyTorch build (the
#     offline image installs torch 2.13.0+cpu; the machine's venv may have another build).
MAY_DIFFER = {"date", "seconds", "versions"}
# Floats computed through many torch kernels (the margin statistics, attack_success_rate is a
# ratio of counts and stays exact) may round differently in another torch build or CPU code path;
# they must agree to this relative tolerance. Everything else (accuracies, n_broken, counts,
# hashes, flags) is compared exactly.
REL_TOL = 1e-4


def _cli(args, **kw):
    code = "import sys; from robustbench_alm.cli import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code, *args], env=env, check=True,
                          capture_output=True, text=True, **kw)


def _engine(*args, check=True, timeout=1800):
    return subprocess.run([*ENGINE, *args], capture_output=True, text=True, check=check,
                          timeout=timeout)


def _build_args():
    if "CONTAINER_BUILD_ARGS" in os.environ:
        return shlex.split(os.environ["CONTAINER_BUILD_ARGS"])
    if (ROOT / "wheels").is_dir():
        return ["--build-arg", "WHEELS=wheels", "--build-arg", "TORCHVISION=no"]
    return []


def _user_args():
    # Rootless podman maps the container's root to the caller, and rootful podman runs as root
    # here; docker runs as root on the host, so it gets the caller's ids to write the results.
    if Path(ENGINE[0]).name == "docker" and hasattr(os, "getuid"):
        return ["--user", f"{os.getuid()}:{os.getgid()}"]
    return []


def _compare(inside, outside, path="entry"):
    """Differences between two entries, as readable lines (empty: they agree)."""
    if isinstance(inside, dict) and isinstance(outside, dict):
        diffs = []
        for key in sorted(set(inside) | set(outside)):
            if key in MAY_DIFFER:
                continue
            if key not in inside or key not in outside:
                diffs.append(f"{path}.{key}: only {'inside' if key in inside else 'outside'}")
                continue
            diffs += _compare(inside[key], outside[key], f"{path}.{key}")
        return diffs
    if isinstance(inside, list) and isinstance(outside, list):
        if len(inside) != len(outside):
            return [f"{path}: {len(inside)} items inside, {len(outside)} outside"]
        return [d for i, (a, b) in enumerate(zip(inside, outside))
                for d in _compare(a, b, f"{path}[{i}]")]
    if (isinstance(inside, float) and isinstance(outside, float) and ".margins." in path
            and math.isclose(inside, outside, rel_tol=REL_TOL, abs_tol=1e-9)):
        return []
    return [] if inside == outside else [f"{path}: {inside!r} inside, {outside!r} outside"]


@pytest.mark.slow
@pytest.mark.container
def test_job_in_container_matches_outside(tmp_path):
    if shutil.which(ENGINE[0]) is None:
        pytest.skip(f"no container engine: {ENGINE[0]!r} is not installed "
                    "(apt-get install podman runc; or set CONTAINER_ENGINE)")
    build_args = _build_args()
    if not os.environ.get("CONTAINER_NO_BUILD"):
        if not any(a.startswith("BASE=") for a in build_args) and \
                _engine("image", "inspect", BASE, check=False).returncode != 0:
            pytest.skip(f"the base image {BASE} is missing: make it with docker/build-base.sh "
                        "(make container-base), or pass --build-arg BASE=... in "
                        "CONTAINER_BUILD_ARGS")
        started = time.monotonic()
        build = _engine("build", *RUN_ARGS, *build_args, "-t", IMAGE, str(ROOT), check=False)
        assert build.returncode == 0, f"image build failed:\n{build.stdout[-3000:]}" \
                                      f"\n{build.stderr[-3000:]}"
        print(f"image build: {time.monotonic() - started:.0f} s")

    submission, out_host, out_box = (tmp_path / d for d in ("submission", "host", "box"))
    for d in (submission, out_host, out_box):
        d.mkdir()
    _cli([*TRAIN, "--out", str(submission / "model.safetensors")])

    started = time.monotonic()
    _cli(["evaluate", str(submission / "model.safetensors"), *EVALUATE,
          "--leaderboard-dir", str(out_host)])
    print(f"job outside: {time.monotonic() - started:.1f} s")

    run = [*ENGINE, "run", "--rm", "--network", "none", "--read-only", *RUN_ARGS,
           *_user_args(), "-e", "OMP_NUM_THREADS=1",
           "-v", f"{submission}:/submission:ro", "-v", f"{out_box}:/results"]
    # The sandbox the job runs in: no network interface but loopback, the submission read-only.
    probe = subprocess.run(
        [*run, "--entrypoint", "sh", IMAGE, "-c",
         "ls /sys/class/net; touch /submission/probe 2>/dev/null && echo submission-writable; "
         "touch /results/probe && rm /results/probe && echo results-writable"],
        capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["lo", "results-writable"], probe.stdout

    started = time.monotonic()
    job = subprocess.run([*run, IMAGE, "evaluate", "/submission/model.safetensors", *EVALUATE,
                          "--leaderboard-dir", "/results"],
                         capture_output=True, text=True, timeout=1200)
    print(f"job inside: {time.monotonic() - started:.1f} s")
    assert job.returncode == 0, f"the job failed in the container:\n{job.stderr[-4000:]}"
    assert not (submission / "probe").exists()

    rel = Path("fashion-mnist", "Linf", "job.json")
    inside = json.loads((out_box / rel).read_text())
    outside = json.loads((out_host / rel).read_text())
    print("versions inside:", inside["versions"], "outside:", outside["versions"])
    assert (out_box / rel.with_suffix(".examples.parquet")).is_file()

    diffs = _compare(inside, outside)
    assert not diffs, "the entries differ:\n" + "\n".join(diffs)
    # What must match exactly, spelled out (the comparison above already covers it).
    for key in ("clean_acc", "robust_acc", "n_clean_correct", "flags", "weights_sha256"):
        assert inside[key] == outside[key], key
    assert [(a["name"], a["n_broken"]) for a in inside["attacks"]] == \
           [(a["name"], a["n_broken"]) for a in outside["attacks"]]

    # The per-example results agree too (same points, same outcome at each stage).
    import numpy as np
    import pandas as pd

    a = pd.read_parquet(out_box / rel.with_suffix(".examples.parquet"))
    b = pd.read_parquet(out_host / rel.with_suffix(".examples.parquet"))
    assert list(a.columns) == list(b.columns)
    for col in a.columns:
        if a[col].dtype.kind == "f":
            assert np.allclose(a[col], b[col], rtol=REL_TOL, atol=1e-9, equal_nan=True), col
        else:
            assert a[col].equals(b[col]), col


def test_installed_package_finds_its_suites(tmp_path):
    # The layout a wheel installs: robustbench_alm/ with the suites as robustbench_alm/_suites,
    # and no attacks/ folder beside it (importlib.resources once gave a path that was none).
    site = tmp_path / "site"
    shutil.copytree(ROOT / "robustbench_alm", site / "robustbench_alm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "attacks", site / "robustbench_alm" / "_suites")
    code = ("import robustbench_alm.suites as s; print(s.__file__); "
            "print(s.available_suites()); print(s.load_suite('quick').name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(site)), cwd=tmp_path, check=True)
    names = sorted(p.stem for p in (ROOT / "attacks").glob("*.toml"))
    assert out.stdout.splitlines() == [
        str(site / "robustbench_alm" / "suites.py"), str(names), "quick"]


def test_foolbox_imports_without_git(tmp_path):
    # A slim image has no git program; foolbox's GitPython import must not stop the margins.
    code = ("from robustbench_alm.attacks.foolbox_adapter import import_foolbox; "
            "print(import_foolbox().__name__)")
    env = {k: v for k, v in os.environ.items() if k != "GIT_PYTHON_REFRESH"}
    env.update(PATH=str(tmp_path), PYTHONPATH=str(ROOT))  # an empty folder: no git on PATH
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "foolbox"
