"""Ready-made local runs: the sums task with a tiny Qwen2 (smoke run, learning-signal test).

`prepare_sums_run(workdir)` writes everything a run needs (data, tokenizer, model, warm
start) and `sums_overrides(...)` gives the Hydra overrides of DESIGN.md section 8's recipe on
top of `grpo_grail` with the `tiny` model preset and the `cpu` cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from grail_megatron.local import sums
from grail_megatron.local.warm_start import WarmStartSettings, warm_start


@dataclass(frozen=True)
class SumsRun:
    model_dir: Path
    train_file: Path
    val_file: Path
    warm_start: dict


# verl's engine needs TP to divide the vocabulary (mbridge does not pad it): the tiny model's
# embedding has the tokenizer's size rounded up to this, as real checkpoints pad theirs.
VOCAB_MULTIPLE = 8


def prepare_sums_run(workdir: str | Path, seed: int = 0, warm: WarmStartSettings = WarmStartSettings(steps=120),
                     val_size: int = 32, vocab_size: int | None = None) -> SumsRun:
    """Data, locally trained tokenizer, random-init tiny Qwen2 (DESIGN.md s.8 size), warm start.

    `vocab_size` rows (>= the tokenizer's; default: rounded up to VOCAB_MULTIPLE) make the
    vocabulary divisible by TP.
    """
    from transformers import AutoTokenizer

    from grail_megatron.models.tiny import make_tiny_model, train_tokenizer

    workdir = Path(workdir)
    files = sums.write_dataset(workdir / "data", train_size=512, val_size=val_size, seed=seed)
    train_tokenizer(sums.tokenizer_texts(), workdir / "tokenizer")
    if vocab_size is None:
        vocab_size = -(-len(AutoTokenizer.from_pretrained(workdir / "tokenizer")) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    model_dir = make_tiny_model(workdir / "model", arch="qwen2", tie_word_embeddings=True,
                                tokenizer_dir=workdir / "tokenizer", hidden=128, intermediate=256,
                                layers=2, heads=4, kv_heads=2, seed=seed, vocab_size=vocab_size)
    report = warm_start(model_dir, warm)
    return SumsRun(model_dir, files["train"], files["val"], report)


def sums_overrides(run: SumsRun, out_dir: str | Path, steps: int, tp: int = 2, pp: int = 1,
                   prompts_per_step: int = 16, n: int = 8, save_freq: int = -1, test_freq: int = -1,
                   seed: int = 42, lr: float = 3e-4) -> list[str]:
    """GRPO on sums: 16 prompts x 8 samples, temperature 1, lr 3e-4 constant, no KL, 20 tokens."""
    sequences = prompts_per_step * n
    return [
        "model_preset=tiny", "cluster=cpu",
        f"actor_rollout_ref.model.path={run.model_dir}",
        f"data.train_files=[{run.train_file}]", f"data.val_files=[{run.val_file}]",
        f"data.train_batch_size={prompts_per_step}", "data.max_prompt_length=32", "data.max_response_length=20",
        f"data.seed={seed}",
        f"actor_rollout_ref.rollout.n={n}", "actor_rollout_ref.rollout.temperature=1.0",
        "actor_rollout_ref.rollout.top_p=1.0", "actor_rollout_ref.rollout.top_k=-1",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={prompts_per_step}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={sequences}",
        f"actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu={sequences}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={sequences}",
        f"actor_rollout_ref.actor.optim.lr={lr}", "actor_rollout_ref.actor.optim.lr_warmup_steps=0",
        f"actor_rollout_ref.actor.megatron.tensor_model_parallel_size={tp}",
        f"actor_rollout_ref.actor.megatron.pipeline_model_parallel_size={pp}",
        f"actor_rollout_ref.ref.megatron.tensor_model_parallel_size={tp}",
        f"actor_rollout_ref.ref.megatron.pipeline_model_parallel_size={pp}",
        f"actor_rollout_ref.actor.megatron.seed={seed}",
        f"trainer.n_gpus_per_node={tp * pp}",
        f"trainer.total_training_steps={steps}", f"trainer.save_freq={save_freq}",
        f"trainer.test_freq={test_freq}", "trainer.val_before_train=false",
        f"trainer.default_local_dir={out_dir}", "trainer.logger=[console,tensorboard]",
        "trainer.experiment_name=sums",
    ]
