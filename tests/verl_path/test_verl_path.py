"""The no-KL GRAIL recipe through verl's own trainer on CPU, at actor TP2 (and PP2), end to end.

One 3-step run at TP2 (started from the Megatron dist checkpoint that `convert from-hf` wrote,
as scripts/train_7b_math.sh does) serves the checks of the step loop, the update, verl's
metrics, GRAIL's pass@k at validation, the checkpoint in verl's layout and its conversion.
"""

from __future__ import annotations

import subprocess

import pytest
import torch

from verl_testlib import CLI, TP2_SAVE_FREQ, TP2_STEPS, run_env

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

STEPS = TP2_STEPS  # the session fixture `tp2_run` (conftest.py)
SAVE_FREQ = TP2_SAVE_FREQ
TIMING_KEYS = ("timing_s/gen", "timing_s/old_log_prob", "timing_s/update_actor", "timing_s/update_weights",
               "timing_s/step")


def test_every_step_logs_verl_metrics(tp2_run):
    assert sorted(tp2_run.metrics) == list(range(1, STEPS + 1))
    for step, metrics in tp2_run.metrics.items():
        for key in ("critic/score/mean", "actor/pg_loss", "actor/grad_norm", *TIMING_KEYS):
            assert key in metrics, f"step {step}: {key} missing"
        assert metrics["actor/grad_norm"] > 0, f"step {step}: zero gradient"
        assert 0.0 <= metrics["critic/score/mean"] <= 1.0
    # the sums task is scored by GRAIL's GSM8K reward through reward.custom_reward_function
    assert "grail_megatron.rewards.verl_reward" in tp2_run.log


def test_rollout_and_actor_log_probs_agree(tp2_run):
    """verl's own train/rollout mismatch metric: the HF rollout received the actor's weights
    (verl's weight sync) before each step. Bound: bf16 (verl's engine runs bf16 parameters)."""
    for step, metrics in tp2_run.metrics.items():
        assert metrics["training/rollout_probs_diff_max"] < 0.05, step
        assert metrics["training/rollout_actor_probs_pearson_corr"] > 0.999, step


def test_validation_reports_grail_pass_at_k(tp2_run):
    last = tp2_run.metrics[STEPS]
    assert 0.0 <= last["val/grail_gsm8k/pass@5"] <= 1.0
    assert last["val/grail_gsm8k/replicates"] == 5 * last["val/grail_gsm8k/tasks"]


def test_checkpoint_in_verl_layout_at_save_freq(tp2_run):
    for step in (SAVE_FREQ, STEPS):
        actor = tp2_run.out / f"global_step_{step}" / "actor"
        for part in ("model", "optimizer", "extra"):
            assert any((actor / part / "dist_ckpt").iterdir()), f"{actor}/{part}/dist_ckpt is empty"
        assert (actor / "model" / "huggingface" / "config.json").is_file()
    assert (tp2_run.out / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)


def test_update_changed_the_weights(tp2_run, sums):
    from safetensors.torch import load_file

    before = load_file(str(sums.model_dir / "model.safetensors"))
    after = load_file(str(tp2_run.out / f"global_step_{STEPS}" / "actor" / "model" / "huggingface"
                          / "model.safetensors"))
    assert set(after) <= set(before)
    changed = [name for name in after if not torch.equal(before[name].to(after[name].dtype), after[name])]
    assert len(changed) > len(after) // 2, f"only {changed} changed"


def test_checkpoint_converts_to_hf_and_generates(tp2_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = tmp_path / "hf"
    proc = subprocess.run([*CLI, "convert", "to-hf", "--ckpt", str(tp2_run.out / f"global_step_{SAVE_FREQ}" / "actor"),
                           "--out", str(hf_dir), "--verify"], env=run_env(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    prompt = tokenizer("What is 2 + 3?", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
