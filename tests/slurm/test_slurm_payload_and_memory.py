"""train.sbatch on the test cluster (CR_Core_Memory, partition DefMemPerNode=1000): a compound
`--command`, Ray's memory from the allocation, and the log after an external `scontrol requeue`.

Each job is a `--command` payload without Ray (seconds each); the Ray memory settings are
computed by the same lib.sh function train.sbatch calls before it starts Ray.
"""
from __future__ import annotations

import pytest

from slurm_testlib import job_info, read_text, submit, wait_finished, wait_for

pytestmark = [pytest.mark.slurm]

TIMEOUT_S = 120
MEMORY_PROBE = 'source "$GM_REPO/scripts/slurm/lib.sh"; gm_ray_memory_from_allocation'


@pytest.fixture()
def env(base_env):
    """The session's settings without the fixed Ray sizes, so the allocation decides."""
    return {k: v for k, v in base_env.items() if not k.startswith("GM_RAY_")}


def _submit_command(cluster, session_dir, env, name: str, command: str, *extra: str):
    work = session_dir / "payload"
    work.mkdir(exist_ok=True)
    args = ["-N", "1", "-g", "0", "--no-ray", "--job-name", name, "--log-dir", str(work / "logs"),
            "--command", command, *extra]
    return submit(cluster, args, env=env, cwd=work)


def test_a_compound_command_runs_whole_and_fails_with_its_last_command(slurm_cluster, session_dir, env):
    failing = _submit_command(slurm_cluster, session_dir, env, "compound-fail", "echo first; false", "-c", "1")
    passing = _submit_command(slurm_cluster, session_dir, env, "compound-ok", "echo one; echo two", "-c", "1",
                              "--", "x=1", "y=2")
    info = wait_finished(slurm_cluster, failing.job_id, TIMEOUT_S)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "1:0"), info
    assert "first\n" in read_text(failing.log)
    info = wait_finished(slurm_cluster, passing.job_id, TIMEOUT_S)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), info
    log = read_text(passing.log)
    assert "one\n" in log and "two x=1 y=2\n" in log  # the overrides reach the last command


def test_ray_memory_follows_the_allocation(slurm_cluster, session_dir, env):
    shared = _submit_command(slurm_cluster, session_dir, env, "mem-default", MEMORY_PROBE, "-c", "1")
    exclusive = _submit_command(slurm_cluster, session_dir, env, "mem-node", MEMORY_PROBE)  # --exclusive
    for job, mib in ((shared, 1000), (exclusive, 4096)):
        wait_finished(slurm_cluster, job.job_id, TIMEOUT_S)
        log = read_text(job.log)
        expected = (f"Ray memory follows the allocation of {mib} MiB per node: object store "
                    f"{mib * 1024 * 1024 * 3 // 10} B, task memory {mib * 1024 * 1024 * 6 // 10} B")
        assert expected in log, log


def test_an_external_requeue_is_logged_as_a_requeue(slurm_cluster, session_dir, env):
    trainer = ("python3 -c 'import os, signal, time; signal.signal(signal.SIGTERM, lambda *a: os._exit(75)); "
               "print(\"started\", flush=True); time.sleep(300)'")
    job = _submit_command(slurm_cluster, session_dir, env, "requeue", trainer, "-c", "1")
    wait_for(lambda: "started" in read_text(job.log), TIMEOUT_S, "the payload to start")
    slurm_cluster.run("scontrol", "requeue", job.job_id)
    wait_for(lambda: read_text(job.log).count("started") >= 2, TIMEOUT_S, "the requeued run")
    slurm_cluster.run("scancel", job.job_id, check=False)
    wait_finished(slurm_cluster, job.job_id, TIMEOUT_S)
    log = read_text(job.log)
    assert "SIGTERM: SLURM is requeueing the job" in log
    assert f"SLURM is requeueing job {job.job_id}" in log and "run 1 resumes from the latest checkpoint" in log
    first_run = log.split(" run 1:")[0]
    assert "not requeueing" not in first_run
    assert job_info(slurm_cluster, job.job_id)["Restarts"] == "1"
