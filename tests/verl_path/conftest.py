"""Session fixtures of the verl-path tests (helpers in verl_testlib.py)."""

from __future__ import annotations

import subprocess

import pytest
from verl_testlib import CLI, TP, VOCAB, run_env, tp2_overrides, train


@pytest.fixture(scope="session")
def sums(tmp_path_factory):
    """Tokenizer + tiny Qwen2 (vocab divisible by TP) + short warm start + sums parquet files."""
    from grail_megatron.local.recipes import prepare_sums_run
    from grail_megatron.local.warm_start import WarmStartSettings

    return prepare_sums_run(tmp_path_factory.mktemp("sums"), warm=WarmStartSettings(steps=40), vocab_size=VOCAB)


@pytest.fixture(scope="session")
def mcore_init(sums, tmp_path_factory):
    """`grail-megatron convert from-hf` at TP2: the Megatron dist checkpoint verl starts from."""
    out = tmp_path_factory.mktemp("mcore_init")
    proc = subprocess.run([*CLI, "convert", "from-hf", "--model", str(sums.model_dir), "--out", str(out),
                           "--tp", str(TP)], env=run_env(out), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out / "global_step_0" / "actor" / "model" / "dist_ckpt"




@pytest.fixture(scope="session")
def tp2_run(sums, mcore_init, tmp_path_factory):
    """The shared uninterrupted run: 3 steps at TP2 from the dist checkpoint, a checkpoint at
    step 2 and 3, validation at 3, deterministic rollouts (verl_testlib.tp2_overrides). Used by
    test_verl_path.py and, as the reference a resumed run must reproduce, test_verl_resume.py."""
    tmp = tmp_path_factory.mktemp("verl_tp2")
    return train(tmp, tp2_overrides(sums, mcore_init)).check()
