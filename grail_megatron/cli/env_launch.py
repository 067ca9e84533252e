"""Environment variables of GRAIL's verl recipe -> verl config keys (used by scripts/train_*_math.sh).

The seed document's variables keep their meaning (TRL-style batch terms), translated to verl's:

| variable      | default | verl key(s)                                                                  |
|---------------|---------|------------------------------------------------------------------------------|
| DATASET       | math    | preset `dataset=` (data.train_files / data.val_files under GRAIL_DATA_ROOT)   |
| MODEL         | preset  | actor_rollout_ref.model.path (a preset name selects `model_preset=` instead)  |
| BATCH_SIZE    | 2       | actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu (sequences per GPU pass) |
| GRAD_ACCUM    | 256     | with BATCH_SIZE: BATCH_SIZE x GRAD_ACCUM completions per optimiser step, so   |
|               |         | actor.ppo_mini_batch_size = BATCH_SIZE x GRAD_ACCUM / ROLLOUTS prompts        |
| TRAIN_BATCH_SIZE | = mini | data.train_batch_size (prompts per rollout step; default: one optimiser   |
|               |         | step per rollout batch, i.e. on-policy like GRAIL's TRL runs)                 |
| LR            | 3e-6    | actor_rollout_ref.actor.optim.lr                                             |
| WARMUP_STEPS  | 20      | actor_rollout_ref.actor.optim.lr_warmup_steps (then constant)                 |
| TOTAL_STEPS   | 400     | trainer.total_training_steps                                                  |
| ROLLOUTS      | 16      | actor_rollout_ref.rollout.n                                                   |
| CLIP_LOW      | 0.2     | actor_rollout_ref.actor.clip_ratio_low                                        |
| CLIP_HIGH     | 0.28    | actor_rollout_ref.actor.clip_ratio_high                                       |
| TEMPERATURE   | 0.7     | actor_rollout_ref.rollout.temperature                                         |
| TOP_P         | 0.95    | actor_rollout_ref.rollout.top_p                                               |
| TOP_K         | 50      | actor_rollout_ref.rollout.top_k                                               |
| NNODES        | 1       | trainer.nnodes (and `cluster=nx8` when > 1)                                   |
| LOGGER        | console,tensorboard | trainer.logger (add wandb; WANDB_MODE=offline is honoured by wandb) |
| KL            | 0       | 1 selects the grpo_grail_kl config (low_var_kl loss + reference worker)       |
| DRY_RUN       | 0       | 1 = `train --dry-run`: print the resolved config and the plan, launch nothing |

Unset variables leave the config's value (the GRAIL defaults above) untouched, except that the
batch variables are always translated together so the mini batch stays consistent.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

SEED_DEFAULTS = {"BATCH_SIZE": "2", "GRAD_ACCUM": "256", "ROLLOUTS": "16"}

# variable -> verl key, for the variables that map one to one
DIRECT = {
    "LR": "actor_rollout_ref.actor.optim.lr",
    "WARMUP_STEPS": "actor_rollout_ref.actor.optim.lr_warmup_steps",
    "TOTAL_STEPS": "trainer.total_training_steps",
    "CLIP_LOW": "actor_rollout_ref.actor.clip_ratio_low",
    "CLIP_HIGH": "actor_rollout_ref.actor.clip_ratio_high",
    "TEMPERATURE": "actor_rollout_ref.rollout.temperature",
    "TOP_P": "actor_rollout_ref.rollout.top_p",
    "TOP_K": "actor_rollout_ref.rollout.top_k",
}


class EnvError(ValueError):
    """A bad environment variable, named with its allowed values."""


def _positive_int(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name, SEED_DEFAULTS.get(name, ""))
    try:
        value = int(raw)
    except ValueError:
        raise EnvError(f"{name}={raw!r} must be a positive integer") from None
    if value <= 0:
        raise EnvError(f"{name}={raw!r} must be a positive integer")
    return value


def batch_overrides(env: Mapping[str, str]) -> list[str]:
    """BATCH_SIZE x GRAD_ACCUM completions per optimiser step -> verl's prompt-counted mini batch."""
    micro = _positive_int(env, "BATCH_SIZE")
    accum = _positive_int(env, "GRAD_ACCUM")
    n = _positive_int(env, "ROLLOUTS")
    completions = micro * accum
    if completions % n:
        raise EnvError(f"BATCH_SIZE x GRAD_ACCUM = {micro} x {accum} = {completions} completions per optimiser step "
                       f"is not a multiple of ROLLOUTS={n} (verl's mini batch counts whole prompt groups); "
                       f"use GRAD_ACCUM in multiples of {n // _gcd(micro, n)}")
    mini = completions // n
    train = _positive_int({"TRAIN_BATCH_SIZE": env.get("TRAIN_BATCH_SIZE", str(mini))}, "TRAIN_BATCH_SIZE")
    return [
        f"actor_rollout_ref.rollout.n={n}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={mini}",
        f"data.train_batch_size={train}",
    ]


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def overrides_from_env(env: Mapping[str, str], model_preset: str) -> tuple[list[str], str, bool]:
    """(Hydra overrides, config name, dry run) for the environment `env`."""
    from grail_megatron.config.compose import preset_options

    overrides = [f"model_preset={model_preset}"]
    dataset = env.get("DATASET")
    if dataset:
        overrides.append(f"dataset={dataset}")  # compose() lists the allowed datasets when misspelled
    model = env.get("MODEL")
    if model:
        overrides[0] = f"model_preset={model}" if model in preset_options("model_preset") else overrides[0]
        if model not in preset_options("model_preset"):
            overrides.append(f"actor_rollout_ref.model.path={model}")
    overrides += batch_overrides(env)
    for name, key in DIRECT.items():
        if env.get(name):
            overrides.append(f"{key}={env[name]}")
    nnodes = _positive_int({"NNODES": env.get("NNODES", "1")}, "NNODES")
    if nnodes > 1:
        overrides += ["cluster=nx8", f"trainer.nnodes={nnodes}"]
    loggers = [x.strip() for x in env.get("LOGGER", "console,tensorboard").split(",") if x.strip()]
    overrides.append("trainer.logger=[" + ",".join(loggers) + "]")
    config_name = "grpo_grail_kl" if env.get("KL", "0") == "1" else "grpo_grail"
    return overrides, config_name, env.get("DRY_RUN", "0") == "1"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="launch grail-megatron train from GRAIL's environment variables",
                                     epilog="exit status: as `grail-megatron train` (0 ok, 1 a check failed, "
                                            "2 bad input, 3 broken environment)")
    parser.add_argument("--model-preset", required=True, help="model preset when MODEL is not set")
    parser.add_argument("extra", nargs="*", help="further Hydra overrides (win over the environment)")
    args = parser.parse_args(argv)
    try:
        overrides, config_name, dry_run = overrides_from_env(os.environ, args.model_preset)
    except EnvError as exc:
        print(f"grail-megatron: {exc}", file=sys.stderr)
        return 2
    from grail_megatron.cli import train as train_cli

    argv_train = ["--config-name", config_name] + (["--dry-run"] if dry_run else []) + overrides + list(args.extra)
    print("grail-megatron train " + " ".join(argv_train), flush=True)
    return train_cli.main(argv_train)


if __name__ == "__main__":
    sys.exit(main())
