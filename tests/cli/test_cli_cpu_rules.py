"""A CPU run (`cluster=cpu`) that asks for a GPU-only feature is refused before Ray starts:
one line naming the key, the value given and the CPU value; exit 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from grail_megatron.config.compose import compose
from grail_megatron.config.cpu_rules import cpu_run_problems, vocabulary_problems

CPU = ["model_preset=tiny", "cluster=cpu"]


def test_cluster_cpu_carries_every_cpu_setting():
    assert cpu_run_problems(compose(CPU)) == []
    assert cpu_run_problems(compose(CPU, "grpo_grail_kl")) == []


def test_gpu_clusters_are_not_checked():
    assert cpu_run_problems(compose(["model_preset=qwen2.5-7b-instruct", "cluster=1x8"])) == []


@pytest.mark.parametrize("override, key, cpu_value", [
    ("actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.name='vllm'", "rollout.name=hf"),
    ("actor_rollout_ref.model.use_remove_padding=true", "actor_rollout_ref.model.use_remove_padding=True",
     "use_remove_padding=False"),
    ("actor_rollout_ref.actor.megatron.override_transformer_config.attention_backend=flash",
     "attention_backend='flash'", "attention_backend='local'"),
    ("actor_rollout_ref.rollout.checkpoint_engine.backend=nccl", "checkpoint_engine.backend='nccl'",
     "checkpoint_engine.backend='naive'"),
])
def test_gpu_only_value_is_named_with_the_cpu_value(override, key, cpu_value):
    (problem,) = cpu_run_problems(compose([*CPU, override]))
    assert key in problem and cpu_value in problem and "trainer.device=cpu" in problem


def test_cli_refuses_before_anything_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "grail_megatron.cli", "train", "--dry-run", *CPU,
                           "actor_rollout_ref.rollout.name=vllm"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "actor_rollout_ref.rollout.name='vllm'" in proc.stderr and "Traceback" not in proc.stderr
    assert "ray" not in proc.stdout.lower()


def test_vocabulary_must_divide_tensor_parallel_size():
    cfg = compose([*CPU, "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2",
                   "actor_rollout_ref.ref.megatron.tensor_model_parallel_size=1"])
    assert vocabulary_problems(cfg, 296) == []
    (problem,) = vocabulary_problems(cfg, 293)
    assert "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2" in problem and "293" in problem


def test_local_loop_refuses_a_vocabulary_tp_does_not_divide(tmp_path):
    """`train --local` builds verl's engine too: the same rule, before any rank starts."""
    from grail_megatron.local import sums
    from grail_megatron.models.tiny import make_tiny_model, train_tokenizer

    train_tokenizer(sums.tokenizer_texts(), tmp_path / "tok")
    model = make_tiny_model(tmp_path / "model", tokenizer_dir=tmp_path / "tok", hidden=32, layers=1, heads=2,
                            kv_heads=1)
    vocab = __import__("json").loads((model / "config.json").read_text())["vocab_size"]
    assert vocab % 2  # the tokenizer's odd size, unpadded
    files = sums.write_dataset(tmp_path / "data", train_size=8, val_size=4, seed=0)
    proc = subprocess.run([sys.executable, "-m", "grail_megatron.cli", "train", "--local", *CPU,
                           f"actor_rollout_ref.model.path={model}", f"data.train_files=[{files['train']}]",
                           f"data.val_files=[{files['val']}]", "trainer.total_training_steps=1",
                           f"trainer.default_local_dir={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"tensor_model_parallel_size=2 does not divide the model's vocab_size={vocab}" in proc.stderr
    assert "local GRPO" not in proc.stdout and "Traceback" not in proc.stderr
