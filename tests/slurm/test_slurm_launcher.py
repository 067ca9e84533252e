"""scripts/slurm/ on a real SLURM (two emulated nodes) with a real Ray cluster.

Two jobs run concurrently on the 2 x 2 CPUs of the test cluster, submitted once per module:
- `verl`: plain sbatch, 2 nodes x 1 CPU, a Ray cluster across both (2 logical GPUs per node),
  the verl trainer (`grail-megatron train`) with a misspelled key: Ray must span both nodes
  and run a task on each, verl must get the job's shape, and the job must end FAILED with the
  CLI's exit code and the log path.
- `preempt`: submit.sh, 1 node x 1 CPU, the real local GRPO loop (`grail-megatron train
  --local`, tiny Qwen2 on the sums task, one rank, checkpoint every step; no Ray, which the
  local loop does not use). A watcher sends `scancel --batch --signal=USR1` as soon as the
  first checkpoint is complete; the job must checkpoint, requeue itself and resume with the
  next step.
The split keeps the slow parts (Ray start-up, the loop's start-up) off one critical path.
"""
from __future__ import annotations

import json
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from slurm_testlib import FINISHED, REPO, SubmittedJob, job_info, read_text, sbatch, submit, wait_finished, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.ray]

TOTAL_STEPS = 6
JOB_TIMEOUT_S = 480  # generous: the machine is shared; on an idle 2-core box the job takes ~2 min
STEP_ROW = re.compile(r"^\s+(\d+)\s+[-+]?\d+\.\d+\s", re.M)  # a row of the local loop's metrics table


@dataclass
class PreemptionRun:
    job: SubmittedJob
    ckpt_dir: Path
    signalled_at_step: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def checkpoint_step(self) -> int:
        """verl's tracker file, written by the checkpoint code after a step is complete."""
        text = read_text(self.ckpt_dir / "latest_checkpointed_iteration.txt").strip()
        return int(text) if text else 0


def _preempt_when_checkpointed(cluster, run: PreemptionRun) -> None:
    """Send the preemption signal to the batch shell once the payload has saved a checkpoint."""
    try:
        step = wait_for(run.checkpoint_step, JOB_TIMEOUT_S, "the first checkpoint")
        res = cluster.run("scancel", "--batch", "--signal=USR1", run.job.job_id, check=False)
        if res.returncode != 0:
            run.errors.append(f"scancel failed: {res.stderr}")
        run.signalled_at_step.append(step)
    except Exception as exc:  # reported by the test that needs it
        run.errors.append(repr(exc))


@pytest.fixture(scope="module")
def jobs(slurm_cluster, base_env, session_dir):
    work = session_dir / "jobs"
    logs = work / "logs"
    logs.mkdir(parents=True)  # sbatch does not create the --output directory
    # Plain sbatch (what submit.sh wraps) with the verl trainer: Ray offers 2 logical GPUs per
    # node, and `grail-megatron train` (verl path) stops at a misspelled key, as a real typo would.
    ray_json = work / "ray.json"
    verl_env = {**base_env, "GM_REPO": str(REPO), "GM_TRAINER": "verl", "GM_GPUS_PER_NODE": "2",
                "GM_SIGNAL_SECS": "120", "GM_RAY_JSON": str(ray_json), "GM_RAY_WAIT_S": "240"}
    verl_job = sbatch(
        slurm_cluster,
        ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=00:30:00", "--job-name=verl",
         f"--output={logs}/%x-%j.log", str(REPO / "scripts" / "slurm" / "train.sbatch"),
         "model_preset=tiny", "trainer.totl_training_steps=3"],
        env=verl_env, cwd=work,
    )
    from grail_megatron.local.recipes import prepare_sums_run, sums_overrides
    from grail_megatron.local.warm_start import WarmStartSettings

    # Learning is not under test here: a 2-step warm start keeps the preparation short.
    sums = prepare_sums_run(work / "sums", warm=WarmStartSettings(steps=2))
    ckpt = work / "ckpt"
    overrides = sums_overrides(sums, ckpt, steps=TOTAL_STEPS, tp=1, prompts_per_step=4, n=4, save_freq=1)
    preempt_job = submit(
        slurm_cluster,
        ["--nodes", "1", "--gpus-per-node", "0", "--cpus-per-node", "1", "--job-name", "preempt",
         "--log-dir", str(logs), "--no-ray", "--trainer", "local", "--", *overrides],
        env=base_env, cwd=work,
    )
    run = PreemptionRun(preempt_job, ckpt)
    watcher = threading.Thread(target=_preempt_when_checkpointed, args=(slurm_cluster, run), daemon=True)
    watcher.start()
    yield {"preempt": run, "verl": verl_job, "ray_json": ray_json, "watcher": watcher}
    watcher.join(timeout=1)


def test_submit_prints_job_id_and_log_path(jobs):
    job = jobs["preempt"].job
    assert job.log.name == f"preempt-{job.job_id}.log"
    assert job.log.parent.name == "logs"


def test_ray_wait_names_missing_nodes_on_a_real_ray_cluster(jobs, job_tmp_base, monkeypatch):
    """The waiter against a real one-node Ray (runs while the SLURM jobs start)."""
    import ray

    from grail_megatron.launch.ray_cluster import ClusterNotReady, Expectation, probe, wait_for_nodes

    monkeypatch.setenv("SLURMD_NODENAME", "n1")  # inherited by the raylet and its workers
    # Ray 2.60 caches its auth-token state per process: a token-auth cluster here would break the
    # loopback test clusters that later tests start in this pytest process (tests/workers)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=1, resources={"slurm_node_n1": 1}, include_dashboard=False, log_to_driver=False,
             object_store_memory=80 * 1024 * 1024, _temp_dir=str(job_tmp_base / "rw"))
    try:
        messages = []
        with pytest.raises(ClusterNotReady, match=r"not ready after 1\.5 s: missing node\(s\): n2 \(joined: n1\)"):
            wait_for_nodes(ray.nodes, Expectation(("n1", "n2")), timeout_s=1.5, poll_s=0.2,
                           report=messages.append, report_every_s=0.5)
        assert messages and all("missing node(s): n2" in m for m in messages)
        with pytest.raises(ClusterNotReady, match="node n1 has 0/8 GPUs"):
            wait_for_nodes(ray.nodes, Expectation(("n1",), gpus_per_node=8), timeout_s=0.3)
        nodes = wait_for_nodes(ray.nodes, Expectation(("n1",), cpus_per_node=1), timeout_s=30)
        result = probe(nodes, timeout_s=120)
        assert result["n1"]["node_id"] == nodes["n1"].node_id
        assert result["n1"]["slurm_node"] == "n1"
    finally:
        ray.shutdown()
    shutil.rmtree(job_tmp_base / "rw", ignore_errors=True)


def test_ray_cluster_spans_both_nodes_and_runs_a_task_on_each(jobs, slurm_cluster):
    job: SubmittedJob = jobs["verl"]
    ray_json: Path = jobs["ray_json"]
    wait_for(lambda: ray_json.exists() or job_info(slurm_cluster, job.job_id).get("JobState") in FINISHED,
             JOB_TIMEOUT_S, "the Ray cluster report")
    assert ray_json.exists(), read_text(job.log)
    report = json.loads(ray_json.read_text())
    assert sorted(report["nodes"]) == ["n1", "n2"]
    node_ids = {name: state["node_id"] for name, state in report["nodes"].items()}
    assert len(set(node_ids.values())) == 2, node_ids
    for name in ("n1", "n2"):
        probe = report["probe"][name]
        # The task pinned to each node ran in that Ray node, under that SLURM node's slurmd.
        assert probe["node_id"] == node_ids[name]
        assert probe["slurm_node"] == name
        assert (report["nodes"][name]["cpus"], report["nodes"][name]["gpus"]) == (1.0, 2.0)
    log = read_text(job.log)
    assert "[ray] cluster ready after" in log and "2 node(s) (n1: 1 CPU 2 GPU, n2: 1 CPU 2 GPU)" in log


def test_failing_verl_payload_fails_the_job_with_the_log_path(jobs, slurm_cluster):
    job: SubmittedJob = jobs["verl"]
    info = wait_finished(slurm_cluster, job.job_id, JOB_TIMEOUT_S)
    log = read_text(job.log)
    assert info["JobState"] == "FAILED", log
    assert info["ExitCode"] == "2:0"  # train_cli: bad configuration
    assert info["Restarts"] == "0"
    # verl's driver gets the job's shape, and a Ray cluster that offers it.
    assert re.search(r"payload: \S+ -m grail_megatron\.cli train trainer\.nnodes=2 trainer\.n_gpus_per_node=2 "
                     r"model_preset=tiny trainer\.totl_training_steps=3$", log, re.M), log
    # verl force-saves ahead of the USR1 that SLURM sends GM_SIGNAL_SECS before the time limit.
    limit = re.search(r"time limit at (\S+): verl saves a checkpoint ahead of (\S+)", log)
    assert limit, log
    end, save_by = (datetime.fromisoformat(t) for t in limit.groups())
    assert (end - save_by).total_seconds() == 120
    assert "unknown config key 'trainer.totl_training_steps'" in log
    assert f"ERROR: payload failed with exit code 2; log: {job.log}" in log


def test_preemption_checkpoints_requeues_and_resumes(jobs, slurm_cluster):
    run: PreemptionRun = jobs["preempt"]
    info = wait_finished(slurm_cluster, run.job.job_id, JOB_TIMEOUT_S)
    jobs["watcher"].join(timeout=5)
    log = read_text(run.job.log)
    assert not run.errors, run.errors
    assert info["JobState"] == "COMPLETED", log
    assert info["ExitCode"] == "0:0"
    assert info["Restarts"] == "1", log

    first, second = log.split(f"job {run.job.job_id} run 1:")
    assert "preemption signal (USR1)" in first
    assert "payload checkpointed (exit 75): requeueing job" in first
    stopped_at = int(re.search(r"preempted: checkpoint of step (\d+) saved, exiting 75", first).group(1))
    assert stopped_at >= run.signalled_at_step[0]
    assert stopped_at < TOTAL_STEPS, "the signal came too late to test a resume"
    # Step numbers continue: run 0 did 1..k, run 1 resumed from k and did k+1..N, nothing twice.
    assert [int(s) for s in STEP_ROW.findall(first)] == list(range(1, stopped_at + 1))
    assert re.search(rf"resumed from \S+ \(step {stopped_at}\)", second), second
    assert [int(s) for s in STEP_ROW.findall(second)] == list(range(stopped_at + 1, TOTAL_STEPS + 1))
    assert run.checkpoint_step() == TOTAL_STEPS
    assert sorted(p.name for p in run.ckpt_dir.glob("global_step_*")) == [f"global_step_{i}" for i in range(1, TOTAL_STEPS + 1)]
    assert "payload finished; job done" in second


def test_nothing_is_left_running(jobs, slurm_cluster, job_tmp_base):
    for job in (jobs["preempt"].job, jobs["verl"]):
        wait_finished(slurm_cluster, job.job_id, JOB_TIMEOUT_S)
    # Ray nodes, payloads and srun steps are gone once the jobs are; allow slurmstepd a moment.
    leftovers = wait_for_no_processes(slurm_cluster, timeout_s=20)
    assert leftovers == [], leftovers
    assert slurm_cluster.run("squeue", "-h").stdout.strip() == ""
    assert sorted(p.name for p in job_tmp_base.iterdir()) == [], "per-job temp dirs were not removed"


def wait_for_no_processes(cluster, timeout_s: float) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout_s
    while True:
        procs = cluster.job_processes()
        if not procs or time.monotonic() > deadline:
            return procs
        time.sleep(0.5)
