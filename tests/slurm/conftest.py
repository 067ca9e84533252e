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
def slurm_cluster(tmp_path_factory):
    cluster = MiniCluster(MiniClusterSpec(root=tmp_path_factory.mktemp("slurm"), nodes=("n1", "n2"), cpus_per_node=2))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def job_tmp_base():
    """Short base for the jobs' temp dirs: Ray's unix socket paths must stay < 108 bytes."""
    base = tempfile.mkdtemp(prefix="gmt", dir="/tmp")
    yield Path(base)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def base_env(job_tmp_base) -> dict[str, str]:
    return {
        "GM_TMP_BASE": str(job_tmp_base),
        "GM_RAY_OBJECT_STORE_BYTES": str(80 * 1024 * 1024),
        "GM_RAY_MEMORY_BYTES": str(1024 * 1024 * 1024),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ.get('PATH', '')}",
    }
