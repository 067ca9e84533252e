"""The 8-GPU launch scripts (dry runs, for real, in a subprocess) and the env-variable mapping."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from grail_megatron.cli.env_launch import EnvError, batch_overrides, overrides_from_env

pytestmark = pytest.mark.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[2]


def _dry_run(script: str, **env):
    full_env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([str(REPO / "scripts" / script)], env=full_env, capture_output=True, text=True, timeout=600)


def test_seed_defaults_map_onto_verl_batch_keys():
    assert batch_overrides({}) == [
        "actor_rollout_ref.rollout.n=16",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.actor.ppo_mini_batch_size=32",  # 2 x 256 completions / 16 per prompt
        "data.train_batch_size=32",
    ]
    assert batch_overrides({"BATCH_SIZE": "4", "GRAD_ACCUM": "64", "ROLLOUTS": "8", "TRAIN_BATCH_SIZE": "128"})[2:] == [
        "actor_rollout_ref.actor.ppo_mini_batch_size=32", "data.train_batch_size=128"]


def test_bad_batch_variables_name_the_variable():
    with pytest.raises(EnvError, match=r"BATCH_SIZE x GRAD_ACCUM = 3 x 5 = 15 .* not a multiple of ROLLOUTS=16"):
        batch_overrides({"BATCH_SIZE": "3", "GRAD_ACCUM": "5"})
    with pytest.raises(EnvError, match=r"GRAD_ACCUM='many' must be a positive integer"):
        batch_overrides({"GRAD_ACCUM": "many"})


def test_every_seed_variable_reaches_its_verl_key():
    env = {"DATASET": "gsm8k", "MODEL": "/models/q7", "BATCH_SIZE": "2", "GRAD_ACCUM": "256", "LR": "1e-6",
           "WARMUP_STEPS": "5", "TOTAL_STEPS": "100", "ROLLOUTS": "8", "CLIP_LOW": "0.1", "CLIP_HIGH": "0.3",
           "TEMPERATURE": "1.0", "TOP_P": "0.9", "TOP_K": "-1", "NNODES": "2", "LOGGER": "console,wandb", "KL": "1",
           "DRY_RUN": "1"}
    overrides, config_name, dry_run = overrides_from_env(env, "qwen2.5-7b-instruct")
    assert (config_name, dry_run) == ("grpo_grail_kl", True)
    assert overrides == [
        "model_preset=qwen2.5-7b-instruct", "dataset=gsm8k", "actor_rollout_ref.model.path=/models/q7",
        "actor_rollout_ref.rollout.n=8", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.actor.ppo_mini_batch_size=64", "data.train_batch_size=64",
        "actor_rollout_ref.actor.optim.lr=1e-6", "actor_rollout_ref.actor.optim.lr_warmup_steps=5",
        "trainer.total_training_steps=100", "actor_rollout_ref.actor.clip_ratio_low=0.1",
        "actor_rollout_ref.actor.clip_ratio_high=0.3", "actor_rollout_ref.rollout.temperature=1.0",
        "actor_rollout_ref.rollout.top_p=0.9", "actor_rollout_ref.rollout.top_k=-1",
        "cluster=nx8", "trainer.nnodes=2", "trainer.logger=[console,wandb]",
    ]
    # a preset name in MODEL selects the preset (architecture facts + layout) instead of a path
    assert overrides_from_env({"MODEL": "qwen2.5-1.5b-instruct"}, "qwen2.5-7b-instruct")[0][0] == \
        "model_preset=qwen2.5-1.5b-instruct"


@pytest.mark.parametrize("script,preset,layout", [("train_7b_math.sh", "qwen2.5-7b-instruct", "TP2 PP2"),
                                                  ("train_14b_math.sh", "qwen2.5-14b-instruct", "TP4 PP2")])
def test_script_dry_run_succeeds(script, preset, layout):
    run = _dry_run(script, LR="2e-6", TOTAL_STEPS="50", LOGGER="console,tensorboard,wandb", WANDB_MODE="offline")
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert f"model_preset={preset}" in out.splitlines()[0]
    assert "trainer.total_training_steps: None -> 50" in out and "actor_rollout_ref.actor.optim.lr: 1e-06 -> 2e-06" in out
    assert "trainer.logger: ['console', 'wandb'] -> ['console', 'tensorboard', 'wandb']" in out
    assert f"actor           {layout}" in out
    assert "RESULT: the configured run passes every check." in out and "DRY RUN: nothing launched." in out


def test_script_refuses_a_misspelled_dataset_before_launch():
    run = _dry_run("train_7b_math.sh", DATASET="maths")
    assert run.returncode == 2
    assert "dataset='maths' is not a shipped" in run.stderr and "gsm8k, math, mbpp" in run.stderr


def test_verl_logger_list_with_wandb_offline_and_tensorboard(tmp_path, monkeypatch):
    """The logger list the scripts put in trainer.logger goes through verl's own Tracking."""
    from verl.utils.tracking import Tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("TENSORBOARD_DIR", str(tmp_path / "tb"))
    tracking = Tracking(project_name="grail-megatron", experiment_name="test",
                        default_backend=["console", "tensorboard", "wandb"], config={"trainer": {}})
    tracking.log({"critic/score/mean": 0.5}, step=1)
    tracking.finish()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert list((tmp_path / "wandb").glob("offline-run-*"))
