"""A real SLURM for the launcher tests: munged, slurmctld and two emulated nodes n1, n2.

The daemons run from a private directory (config, munge key/socket, state, logs) and are
stopped by PID at the end of the session, also when a test fails. Nothing is installed here:
the Debian packages come from `make setup` (tools/system_deps.sh).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from grail_megatron.launch.minicluster import MiniCluster, MiniClusterSpec
from slurm_testlib import REPO


@pytest.fixture(scope="session")
def session_dir():
    """Private directory for the whole session (cluster, jobs, per-job temp dirs).

    Not pytest's tmp_path: other pytest sessions on a shared machine prune old numbered
    basetemp dirs, which must not happen under a running cluster. Short, because Ray's unix
    socket paths inside the jobs' temp dirs must stay under 108 bytes.
    """
    path = Path(tempfile.mkdtemp(prefix="gmslurm", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster(session_dir):
    # Like a site that enforces memory: memory is a consumable resource and the partition has a
    # default (a job without --mem gets 1000 MiB of the node's 4096).
    cluster = MiniCluster(MiniClusterSpec(root=session_dir / "cluster", nodes=("n1", "n2"), cpus_per_node=2,
                                          track_memory=True, partition_default_mem_mb=1000))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def job_tmp_base(session_dir):
    """Base of the jobs' per-run directories (GM_TMP_BASE)."""
    base = session_dir / "t"
    base.mkdir()
    return base


@pytest.fixture(scope="session")
def base_env(job_tmp_base) -> dict[str, str]:
    return {
        "GM_TMP_BASE": str(job_tmp_base),
        "GM_RAY_OBJECT_STORE_BYTES": str(80 * 1024 * 1024),
        "GM_RAY_MEMORY_BYTES": str(1024 * 1024 * 1024),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ.get('PATH', '')}",
    }
