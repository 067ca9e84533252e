"""submit.sh option handling, the Ray wait logic and interface detection (no cluster needed)."""
from __future__ import annotations

import shlex
import subprocess

import pytest

from grail_megatron.launch.netif import default_route_interface
from grail_megatron.launch.ray_cluster import Expectation, joined_nodes, problems
from slurm_testlib import SUBMIT


def run_submit(*args: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SUBMIT), *args], capture_output=True, text=True, timeout=30, cwd=tmp_path)


def dry_run_sbatch_args(*args: str, tmp_path) -> list[str]:
    res = run_submit("--dry-run", "--no-check", *args, tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    line = next(l for l in res.stdout.splitlines() if l.startswith("sbatch "))
    return shlex.split(line)


def test_gpu_job_defaults(tmp_path):
    argv = dry_run_sbatch_args("-N", "4", "-p", "gpu", "-A", "proj", "-t", "12:00:00", "--",
                               "data.train_batch_size=256", "trainer.experiment_name=a b", tmp_path=tmp_path)
    assert argv[0] == "sbatch" and argv[-3].endswith("scripts/slurm/train.sbatch")
    assert argv[-2:] == ["data.train_batch_size=256", "trainer.experiment_name=a b"]
    for expected in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--exclusive", "--requeue",
                     "--signal=B:USR1@300", "--open-mode=append", "--partition=gpu", "--account=proj",
                     "--time=12:00:00", "--job-name=grail-megatron", "--parsable"):
        assert expected in argv, (expected, argv)
    output = next(a for a in argv if a.startswith("--output="))
    assert output == f"--output={tmp_path}/logs/slurm/%x-%j.log"


def test_cpu_local_job_and_container_settings(tmp_path):
    res = run_submit("--dry-run", "--no-check", "-g", "0", "-c", "4", "--trainer", "local", "--container", "apptainer",
                     "--image", "/img/gm.sif", "--signal-secs", "90", tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "GM_TRAINER=local" in res.stdout and "GM_CONTAINER=apptainer" in res.stdout
    assert "GM_IMAGE=/img/gm.sif" in res.stdout
    argv = shlex.split(res.stdout.splitlines()[-1])
    assert "--cpus-per-task=4" in argv and "--signal=B:USR1@90" in argv
    assert not any(a.startswith("--gpus-per-node") for a in argv) and "--exclusive" not in argv


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-g", "0"], "verl needs GPUs"),
        (["--container", "pyxis"], "--container pyxis needs --image"),
        (["--container", "docker", "--image", "x"], "--container must be none, pyxis or apptainer"),
        (["--image", "x.sif"], "--image given but --container none"),
        (["-N", "0"], "--nodes must be >= 1"),
        (["-N", "two"], "--nodes must be a non-negative integer (got 'two')"),
        (["--trainer", "fsdp"], "--trainer must be verl or local"),
        (["--bogus"], "unknown option --bogus"),
        (["--nodes"], "--nodes needs a value"),
    ],
)
def test_bad_options_are_refused_with_a_reason(args, message, tmp_path):
    res = run_submit("--dry-run", *args, tmp_path=tmp_path)
    assert res.returncode == 2
    assert message in res.stderr


def _ray_node(name: str | None, cpus: float, gpus: float = 0, alive: bool = True, node_id: str = "id") -> dict:
    resources = {"CPU": cpus, "memory": 1e9}
    if gpus:
        resources["GPU"] = gpus
    if name:
        resources[f"slurm_node_{name}"] = 1.0
    return {"Alive": alive, "NodeID": f"{node_id}-{name}", "NodeManagerAddress": "10.0.0.1", "Resources": resources}


def test_wait_logic_names_missing_and_incomplete_nodes():
    nodes = [_ray_node("n1", 64, 8), _ray_node("n2", 64, 4), _ray_node("n3", 64, 8, alive=False), _ray_node(None, 2)]
    joined = joined_nodes(nodes)
    assert sorted(joined) == ["n1", "n2"]  # dead and untagged Ray nodes do not count
    assert joined["n2"].gpus == 4.0 and joined["n1"].node_id == "id-n1"
    assert problems(Expectation(("n1", "n2", "n3", "n4"), gpus_per_node=8), joined) == [
        "missing node(s): n3, n4",
        "node n2 has 4/8 GPUs",
    ]
    assert problems(Expectation(("n1",), gpus_per_node=8, cpus_per_node=128), joined) == ["node n1 has 64/128 CPUs"]
    assert problems(Expectation(("n1", "n2"), gpus_per_node=4), joined) == []


def test_expectation_rejects_bad_node_lists():
    with pytest.raises(ValueError, match="duplicate node names"):
        Expectation(("n1", "n1"))
    with pytest.raises(ValueError, match="at least one node"):
        Expectation(())


def test_default_route_interface_from_proc_net_route():
    table = (
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n"
        "ib0\t000010AC\t00000000\t0001\t0\t0\t0\t0000FFFF\n"
        "eno1\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\n"
    )
    assert default_route_interface(table) == "eno1"
    assert default_route_interface(table.splitlines()[0] + "\n" + table.splitlines()[1]) is None


# ---------------------------------------------------------------- checks before sbatch
def _assert_refused(res: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "sbatch " not in res.stdout
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr)


def test_dry_run_refuses_a_misspelled_preset_before_sbatch(tmp_path):
    res = run_submit("--dry-run", "--", "model_preset=qwen2.5-7b-instruc", tmp_path=tmp_path)
    _assert_refused(res, 2, "model_preset='qwen2.5-7b-instruc'", "did you mean 'qwen2.5-7b-instruct'",
                    "not submitted")


def test_dry_run_refuses_a_misspelled_key_and_a_bad_value(tmp_path):
    res = run_submit("--dry-run", "--", "actor_rollout_ref.actor.clip_ratio_hgh=0.3", tmp_path=tmp_path)
    _assert_refused(res, 2, "unknown config key 'actor_rollout_ref.actor.clip_ratio_hgh'", "clip_ratio_high")
    res = run_submit("--dry-run", "--", "actor_rollout_ref.rollout.n=1", tmp_path=tmp_path)
    _assert_refused(res, 2, "actor_rollout_ref.rollout.n=1", "n >= 2")


def test_dry_run_checks_the_files_the_run_reads(tmp_path):
    res = run_submit("--dry-run", "-g", "0", "-c", "1", "--trainer", "local", "--", "model_preset=tiny",
                     "cluster=cpu", f"actor_rollout_ref.model.path={tmp_path}/no-model", tmp_path=tmp_path)
    _assert_refused(res, 2, f"actor_rollout_ref.model.path={tmp_path}/no-model does not exist",
                    "data.train_files")


def test_dry_run_passes_a_good_local_run_and_creates_no_log_dir(tmp_path):
    model, data = tmp_path / "model", tmp_path / "data"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data.mkdir()
    for split in ("train", "val"):
        (data / f"{split}.parquet").write_bytes(b"")
    res = run_submit("--dry-run", "-g", "0", "-c", "1", "--trainer", "local", "--log-dir", str(tmp_path / "logs"),
                     "--", "model_preset=tiny", "cluster=cpu", f"actor_rollout_ref.model.path={model}",
                     f"data.train_files=[{data}/train.parquet]", f"data.val_files=[{data}/val.parquet]",
                     "trainer.total_training_steps=2", tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1].startswith("sbatch ")
    assert not (tmp_path / "logs").exists()  # only a real submission creates it


def test_exclusive_jobs_ask_for_the_whole_node_memory(tmp_path):
    assert "--mem=0" in dry_run_sbatch_args(tmp_path=tmp_path)  # --exclusive: not the partition default
    argv = dry_run_sbatch_args("--mem", "200G", tmp_path=tmp_path)
    assert "--mem=200G" in argv and "--mem=0" not in argv
    argv = dry_run_sbatch_args("-c", "4", tmp_path=tmp_path)
    assert not any(a.startswith("--mem") for a in argv)  # a share of the node: the partition's default
