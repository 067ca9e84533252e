"""Helpers of the SLURM launcher tests: submit through submit.sh, poll job states."""
from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from grail_megatron.launch.minicluster import MiniCluster

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "scripts" / "slurm" / "submit.sh"


@dataclass
class SubmittedJob:
    job_id: str
    log: Path
    submit_output: str


def submit(cluster: MiniCluster, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> SubmittedJob:
    """Run scripts/slurm/submit.sh against the test cluster; parse the job id and log path."""
    full_env = cluster.env()
    full_env.update(env or {})
    res = subprocess.run(["bash", str(SUBMIT), *args], env=full_env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"submit.sh failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    job = re.search(r"^submitted job (\d+)$", res.stdout, re.M)
    log = re.search(r"^log: (\S+)$", res.stdout, re.M)
    assert job and log, res.stdout
    return SubmittedJob(job.group(1), Path(log.group(1)), res.stdout)


def sbatch(cluster: MiniCluster, args: list[str], env: dict[str, str], cwd: Path) -> SubmittedJob:
    """Plain `sbatch --parsable` (no submit.sh); the log path is taken from --output."""
    full_env = cluster.env()
    full_env.update(env)
    res = subprocess.run(["sbatch", "--parsable", *args], env=full_env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip().split(";")[0]
    output = next(a.split("=", 1)[1] for a in args if a.startswith("--output="))
    name = next(a.split("=", 1)[1] for a in args if a.startswith("--job-name="))
    return SubmittedJob(job_id, Path(output.replace("%x", name).replace("%j", job_id)), res.stdout)


def job_info(cluster: MiniCluster, job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
    res = cluster.run("scontrol", "show", "job", "-o", job_id, check=False)
    return dict(re.findall(r"(\w+)=(\S*)", res.stdout))


FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def wait_finished(cluster: MiniCluster, job_id: str, timeout_s: float) -> dict[str, str]:
    """Poll squeue (fast) until the job has left the queue; return its final scontrol record."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = job_info(cluster, job_id)
        if info.get("JobState") in FINISHED:
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not finished after {timeout_s:.0f} s: {job_info(cluster, job_id)}")


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.3):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def read_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
