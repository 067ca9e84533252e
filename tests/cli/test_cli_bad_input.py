"""Every launch path refuses bad input before it starts: exit 2, the key named, no traceback.

The cases are the ones issue 15 found by trying the commands as a new user would, plus the exit
code convention (0 ok, 1 a check failed, 2 bad input, 3 broken environment) in every --help.
Commands run in this process through their real `main`, except where the console script
itself (or a shell script) is what is under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grail_megatron.cli import main as grail_megatron

REPO = Path(__file__).resolve().parents[2]
TRAIN_DRY_RUN_CASES = [
    ("actor_rollout_ref.rollout.n=0", "actor_rollout_ref.rollout.n=0"),
    ("actor_rollout_ref.rollout.n=1", "n >= 2"),
    ("actor_rollout_ref.actor.optim.lr=-1", "actor_rollout_ref.actor.optim.lr=-1"),
    ("trainer.total_training_steps=-5", "trainer.total_training_steps=-5"),
    ("actor_rollout_ref.actor.megatron.tensor_model_parallel_size=two",
     "actor_rollout_ref.actor.megatron.tensor_model_parallel_size='two'"),
    ("data.train_batch_size=abc", "data.train_batch_size='abc'"),
    ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=0", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=0"),
    ("grail.cluster.gpu_memory_gb=0", "grail.cluster.gpu_memory_gb=0 is not allowed on a GPU cluster"),
    ("grail.cluster.gpu_memory_gb=-80", "grail.cluster.gpu_memory_gb=-80"),
    ("trainer.nnodes=0", "trainer.nnodes=0"),
    ("model_preset=qwen2.5-7b-instruc", "did you mean 'qwen2.5-7b-instruct'"),
]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = grail_megatron(list(argv))
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_bad_input(result, *needles: str) -> None:
    code, out, err = result
    assert code == 2, (code, out[-2000:], err[-2000:])
    assert "Traceback" not in err and "Traceback" not in out
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("override,needle", TRAIN_DRY_RUN_CASES)
def test_train_dry_run_refuses_bad_values_with_exit_2(capsys, override, needle):
    assert_bad_input(run(capsys, "train", "--dry-run", override), needle)


def test_every_bad_value_is_listed_at_once(capsys):
    code, _, err = run(capsys, "train", "--dry-run", "actor_rollout_ref.actor.optim.lr=-1", "data.train_batch_size=0")
    assert code == 2 and "2 problems in the input" in err
    assert "actor_rollout_ref.actor.optim.lr=-1" in err and "data.train_batch_size=0" in err


@pytest.mark.parametrize("flags,needle", [
    (["--nnodes", "0"], "--nnodes: '0' is not an integer >= 1"),
    (["--nnodes", "-1"], "--nnodes: '-1'"),
    (["--gpus-per-node", "0"], "--gpus-per-node: '0'"),
    (["--gpu-memory-gb", "-80"], "--gpu-memory-gb: '-80' is not a number > 0"),
    (["--gpu-memory-gb", "0"], "--gpu-memory-gb: '0'"),
    (["--train-batch-size", "0"], "--train-batch-size: '0'"),
    (["--micro-batch", "-2"], "--micro-batch: '-2'"),
    (["--n", "1"], "actor_rollout_ref.rollout.n=1"),
    (["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=0"], "ppo_micro_batch_size_per_gpu=0"),
    (["actor_rollout_ref.actor.megatron.tensor_model_parallel_size=two"], "tensor_model_parallel_size='two'"),
    (["--model", "no/such/config.json"], "--model no/such/config.json: no such file or folder"),
])
def test_plan_refuses_bad_flags_with_exit_2(capsys, flags, needle):
    code, out, err = run(capsys, "plan", *flags)
    assert_bad_input((code, out, err), needle)
    assert "usage:" not in err  # one line, not the whole usage block


def test_plan_names_a_malformed_config_json(capsys, tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"num_hidden_layers": 2,')
    assert_bad_input(run(capsys, "plan", "--model", str(bad)), f"{bad}: not a readable JSON HF config")


def test_train_local_with_a_missing_model_stops_fast_and_writes_nothing(capsys, tmp_path):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = run(capsys, "train", "--local", "model_preset=tiny", "cluster=cpu",
                 f"actor_rollout_ref.model.path={tmp_path}/missing-model", f"trainer.default_local_dir={run_dir}",
                 f"data.train_files=[{tmp_path}/train.parquet]", f"data.val_files=[{tmp_path}/val.parquet]",
                 "trainer.total_training_steps=2")
    assert time.monotonic() - started < 30  # no ranks were started (was 60 s and 3 tracebacks)
    assert_bad_input(result, f"actor_rollout_ref.model.path={tmp_path}/missing-model does not exist",
                     f"data.train_files: {tmp_path}/train.parquet does not exist", "data.val_files")
    assert not run_dir.exists()  # no config file left behind


def test_real_launch_without_gpu_is_a_broken_environment(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    for split in ("train", "val"):
        (tmp_path / f"{split}.parquet").write_bytes(b"")
    code, _, err = run(capsys, "train", f"actor_rollout_ref.model.path={tmp_path}/m",
                       f"data.train_files=[{tmp_path}/train.parquet]", f"data.val_files=[{tmp_path}/val.parquet]",
                       "actor_rollout_ref.actor.megatron.use_dist_checkpointing=false")
    assert code == 3 and "no CUDA GPU is visible" in err and "Traceback" not in err


def test_check_mode_validates_a_launch_without_starting_it(capsys, tmp_path):
    for split in ("train", "val"):
        (tmp_path / f"{split}.parquet").write_bytes(b"")
    code, out, err = run(capsys, "train", "--check", "--local", "model_preset=tiny", "cluster=cpu",
                         f"actor_rollout_ref.model.path={tmp_path}", "trainer.total_training_steps=2",
                         f"data.train_files=[{tmp_path}/train.parquet]", f"data.val_files=[{tmp_path}/val.parquet]")
    assert code == 0, err
    assert "pass every check" in out and "nothing launched" in out


def test_a_failing_check_exits_1_and_debug_shows_the_traceback(capsys):
    code, _, err = run(capsys, "train", "--dry-run", "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=3")
    assert code == 1 and "num_layers=28 is not divisible by PP=3" in err and "Traceback" not in err
    code, _, err = run(capsys, "train", "--dry-run", "--debug", "trainer.nnodes=0")
    assert code == 2 and "Traceback (most recent call last)" in err and "trainer.nnodes=0" in err


def test_dry_run_prints_the_differences_and_the_whole_config_only_when_asked(capsys):
    code, out, _ = run(capsys, "train", "--dry-run")
    assert code == 0
    assert "key(s) differ from verl 0.9.1's defaults" in out
    assert "actor_rollout_ref.rollout.n: 1 -> 16" in out and "# plan" in out
    assert "# resolved config" not in out and len(out.splitlines()) < 200  # was 1,196 lines
    code, out, _ = run(capsys, "train", "--dry-run", "--print-config")
    assert code == 0 and "# resolved config" in out and len(out.splitlines()) > 1000


@pytest.mark.parametrize("argv,needle", [
    (["prepare-data", "--dataset", "gsm8k", "--out", "x", "--math-val-size", "0"], "--math-val-size: '0'"),
    (["prepare-data", "--dataset", "gsm9k", "--out", "x"], "--dataset: invalid choice: 'gsm9k'"),
    (["eval", "--model", "/nonexistent", "--dataset", "math", "--out", "x"], "--model /nonexistent: not a Hugging Face"),
    (["eval", "--model", "m", "--dataset", "math", "--out", "x", "--samples", "0"], "--samples: '0'"),
    (["eval", "--model", "m", "--dataset", "math", "--out", "x", "--top-p", "2"], "--top-p: '2'"),
    (["score", "in.jsonl", "--mbpp-timeout", "-1"], "--mbpp-timeout: '-1' is not a number of seconds > 0"),
    (["convert", "from-hf", "--model", "m", "--out", "o", "--tp", "0"], "--tp: '0' is not an integer >= 1"),
    (["convert", "to-hf", "--ckpt", "/nonexistent", "--out", "o"], "--ckpt /nonexistent: does not exist"),
    (["frobnicate"], "unknown command 'frobnicate'"),
])
def test_other_commands_refuse_bad_arguments_with_exit_2(capsys, argv, needle):
    assert_bad_input(run(capsys, *argv), needle)


def test_eval_with_bad_k_names_the_option(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert_bad_input(run(capsys, "eval", "--model", str(tmp_path), "--dataset", "math", "--out", str(tmp_path / "o"),
                         "--samples", "2", "--k", "1,5"), "--k '1,5': every k must be in 1..--samples (2)")


@pytest.mark.parametrize("command", [["train"], ["plan"], ["convert"], ["convert", "to-hf"], ["eval"],
                                     ["prepare-data"]])
def test_every_help_states_the_exit_codes(capsys, command):
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0
    assert "0 ok, 1 a check failed, 2 bad input" in " ".join(out.split())


def test_top_level_help_states_the_exit_codes(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "Exit status: 0 ok, 1 a check failed, 2 bad input" in out and "3 broken environment" in out


def test_console_script_is_the_cli_package():
    res = subprocess.run([sys.executable, "-m", "grail_megatron.cli", "plan", "--nnodes", "0"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--nnodes" in res.stderr and "Traceback" not in res.stderr
    scripts = (REPO / "pyproject.toml").read_text()
    assert 'grail-megatron = "grail_megatron.cli:main"' in scripts


def test_training_script_refuses_a_bad_environment_variable():
    env = {"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "ROLLOUTS": "0", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", str(REPO / "scripts" / "train_7b_math.sh")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "ROLLOUTS='0' must be a positive integer" in res.stderr
    assert "Traceback" not in res.stderr


def test_json_plan_output_is_still_machine_readable(capsys):
    code, out, _ = run(capsys, "plan", "--json")
    assert code == 0 and json.loads(out)["ok"] is True


def test_every_option_has_help():
    import argparse

    from grail_megatron.cli import convert, eval as eval_cli, plan, prepare_data, train

    def undocumented(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    yield from undocumented(subparser, f"{name} {sub}")
            elif action.help is None:
                yield f"{name} {action.option_strings or action.dest}"

    parsers = {"train": train.build_parser(), "plan": plan.build_parser(), "convert": convert._parser(),
               "eval": eval_cli.build_parser(), "prepare-data": prepare_data.build_parser()}
    assert [u for name, p in parsers.items() for u in undocumented(p, name)] == []
