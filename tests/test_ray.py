"""Scale-out on Ray: the same jobs on a local 2-CPU Ray instance and locally, same entries."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
from pathlib import Path

import pandas as pd
import pytest

from robustbench_alm.jobs.executor import start_local_ray
from robustbench_alm.jobs.store import JobStore
from robustbench_alm.jobs.worker import run_worker, submit
from tests.jobhelpers import comparable, make_submission, perturbed, train_cnn_small

# Not imported here: Ray reads its network settings when first imported, and
# start_local_ray sets them (loopback only, no usage statistics) before it imports Ray.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="Ray is optional: pip install 'robustbench-alm[ray]'")


@pytest.fixture(scope="module")
def local_ray():
    """A Ray instance of this test's own, with 2 CPUs, listening on 127.0.0.1 only."""
    start_local_ray(num_cpus=2)
    import ray

    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def cnn_state(fmnist_train):
    x, y = fmnist_train
    return train_cnn_small(x[:1200], y[:1200]).state_dict()


def _examples(entry_path: str) -> pd.DataFrame:
    path = Path(entry_path)
    return pd.read_parquet(path.with_name(path.stem + ".examples.parquet"))


def _descendants() -> set[int]:
    """This process and every process below it (Ray's servers and workers among them)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    ours, grew = {os.getpid()}, True
    while grew:
        new = {pid for pid, ppid in parents.items() if ppid in ours} - ours
        ours |= new
        grew = bool(new)
    return ours


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)
    # /proc/net/tcp{,6} print each 32-bit word of the address in host (little-endian) order.
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def _listening_addresses(pids: set[int]) -> set[str]:
    """Addresses on which the processes ``pids`` accept TCP connections (Linux /proc)."""
    inodes = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A":  # LISTEN
                inodes[cols[9]] = _address(cols[1].split(":")[0])
    found = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                addr = inodes[link[8:-1]]
                mapped = getattr(addr, "ipv4_mapped", None)
                found.add(str(mapped or addr))
    return found


def test_ray_instance_is_local_only(local_ray):
    nodes = local_ray.nodes()
    assert len(nodes) == 1 and nodes[0]["NodeManagerAddress"] == "127.0.0.1"
    assert local_ray.cluster_resources()["CPU"] == 2
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp: cannot list listening sockets on this system")
    addresses = _listening_addresses(_descendants())
    assert addresses, "found none of Ray's listening sockets"
    assert addresses <= {"127.0.0.1", "::1"}, f"Ray listens on {sorted(addresses)}"


def test_jobs_on_ray_equal_local_jobs(tmp_path, local_ray, cnn_state):
    subs = [make_submission(tmp_path / "a", cnn_state, name="model a"),
            make_submission(tmp_path / "b", perturbed(cnn_state, 0.8), name="model b")]
    settings = dict(suite="quick", n_examples=36, batch_size=8, margin_steps=5)
    entries = {}
    for executor in ("ray", "local"):
        store = tmp_path / executor / "store.sqlite"
        ids = [submit(s, store, **settings).job_id for s in subs]
        # Two submissions at once: on Ray their units share the cluster's two CPUs.
        report = run_worker(store, executor=executor, drain=True, concurrent=2,
                            leaderboard_dir=tmp_path / f"lb-{executor}")
        assert sorted(report.done) == ids and not report.failed
        with JobStore(store) as s:
            entries[executor] = [s.get(i) for i in ids]
    for on_ray, local in zip(entries["ray"], entries["local"]):
        assert comparable(on_ray.entry) == comparable(local.entry)
        pd.testing.assert_frame_equal(_examples(on_ray.entry_path),
                                      _examples(local.entry_path))
    a, b = (job.entry for job in entries["ray"])
    assert a["name"] == "model a" and b["name"] == "model b"
    assert a["weights_sha256"] != b["weights_sha256"]
