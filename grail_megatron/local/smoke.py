"""The CPU smoke run (`make smoke`): the whole pipeline end to end, with a learning check.

    sums data -> locally trained tokenizer -> random-init tiny Qwen2 -> supervised warm start
    -> GRPO at TP=2 (`train --local`: verl's engine in torchrun ranks, gloo) with checkpoints
    -> learning check on the per-step rewards
    -> verl checkpoint -> HF export (`grail-megatron convert to-hf --verify`) -> reload + greedy eval
    -> the production path: verl's own trainer (`grail-megatron train`, no --local) for 2 steps from
       a `convert from-hf` dist checkpoint, checkpoint, `convert to-hf --verify`

Exit code 0 only if every stage passed, including the learning signal (mean reward of the last
5 steps >= the first 5 + 0.2).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

LEARNING_TARGET = 0.2


def reward_curve(tensorboard_dir: Path, tag: str = "critic/score/mean") -> list[float]:
    """Per-step values of `tag` from the run's tensorboard events, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir))
    events.Reload()
    by_step = {e.step: e.value for e in events.Scalars(tag)}
    return [by_step[s] for s in sorted(by_step)]


def learning_gain(rewards: list[float], window: int = 5) -> tuple[float, float, float]:
    if len(rewards) < 2 * window:
        raise ValueError(f"need at least {2 * window} steps for the learning check, got {len(rewards)}")
    first = sum(rewards[:window]) / window
    last = sum(rewards[-window:]) / window
    return first, last, last - first


def _stage(name: str):
    print(f"\n=== {name} ===", flush=True)
    return time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="CPU smoke run of the local GRPO loop")
    parser.add_argument("--work", default="outputs/smoke", help="working folder (recreated)")
    parser.add_argument("--steps", type=int, default=150, help="GRPO steps")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm-steps", type=int, default=120, help="supervised warm-start steps")
    parser.add_argument("--lr", type=float, default=3e-4, help="GRPO learning rate")
    args = parser.parse_args(argv)

    import os
    import shutil

    from grail_megatron.cli import main as grail_megatron
    from grail_megatron.local.recipes import prepare_sums_run, sums_overrides
    from grail_megatron.local.warm_start import WarmStartSettings

    start = time.perf_counter()
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    t = _stage("data, tokenizer, tiny Qwen2, warm start")
    run = prepare_sums_run(work, seed=args.seed, warm=WarmStartSettings(steps=args.warm_steps))
    print(f"model {run.model_dir}; warm start {run.warm_start} ({time.perf_counter() - t:.0f} s)")

    t = _stage(f"GRPO: grail-megatron train --local, {args.steps} steps at TP={args.tp}")
    tensorboard = work / "tensorboard"
    os.environ["TENSORBOARD_DIR"] = str(tensorboard)
    overrides = sums_overrides(run, work / "checkpoints", steps=args.steps, tp=args.tp,
                               save_freq=max(1, args.steps // 2), test_freq=args.steps, seed=42 + args.seed,
                               lr=args.lr)
    code = grail_megatron(["train", "--local", *overrides])  # exactly what a user types
    print(f"training exit code {code} ({time.perf_counter() - t:.0f} s)")
    if code != 0:
        return code

    first, last, gain = learning_gain(reward_curve(tensorboard))
    ok = gain >= LEARNING_TARGET
    print(f"learning signal: mean reward first 5 steps {first:.3f}, last 5 steps {last:.3f}, "
          f"gain {gain:+.3f} (target >= {LEARNING_TARGET}): {'PASS' if ok else 'FAIL'}")

    t = _stage("verl checkpoint -> HF (grail-megatron convert to-hf --verify)")
    hf_dir = work / "hf_export"
    # its own process, as a user runs it: building Megatron models records the attention backend
    # in the process environment (NVTE_*), which the verl path's workers would inherit
    code = _cli("convert", "to-hf", "--ckpt", str(work / "checkpoints"), "--out", str(hf_dir), "--verify",
                "--no-progress")
    print(f"convert exit code {code} ({time.perf_counter() - t:.0f} s)")
    if code != 0:
        return code

    t = _stage("reload the HF export, greedy accuracy on all 100 sums")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grail_megatron.local.warm_start import greedy_accuracy

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    accuracy = greedy_accuracy(model, tokenizer, [(a, b) for a in range(10) for b in range(10)])
    print(f"greedy accuracy: after warm start {run.warm_start['greedy_accuracy']:.2f}, after GRPO {accuracy:.2f}")

    code = verl_path_stage(work / "verl_path", tp=args.tp, seed=args.seed)
    if code != 0:
        return code
    print(f"\nsmoke run {'PASSED' if ok else 'FAILED (learning signal)'} in {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1


VERL_STEPS = 2


def _cli(*args: str, env: dict | None = None) -> int:
    """A `grail-megatron` command in its own process, as a user runs it (Ray stays out of ours)."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "grail_megatron.cli", *args], env=env).returncode


def verl_path_stage(work: Path, tp: int, seed: int) -> int:
    """The production path on this machine: from-hf -> verl's own trainer (no --local) for a few
    steps from that dist checkpoint -> checkpoint in verl's layout -> to-hf --verify."""
    import os
    import tempfile

    from grail_megatron.local.recipes import prepare_sums_run, sums_overrides
    from grail_megatron.local.warm_start import WarmStartSettings

    t = _stage(f"verl path: convert from-hf, grail-megatron train (verl's trainer, Ray) {VERL_STEPS} steps, "
               "to-hf --verify")
    # verl's engine does not pad the vocabulary: 296 rows divide by TP (the tokenizer has 293)
    run = prepare_sums_run(work, seed=seed, warm=WarmStartSettings(steps=20), vocab_size=296)
    init = work / "mcore_init"
    if code := _cli("convert", "from-hf", "--model", str(run.model_dir), "--out", str(init), "--tp", str(tp)):
        return code
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TMPDIR=tempfile.mkdtemp(prefix="gm-ray-", dir="/tmp"))
    overrides = sums_overrides(run, work / "checkpoints", steps=VERL_STEPS, tp=tp, save_freq=VERL_STEPS,
                               test_freq=VERL_STEPS, seed=42 + seed)
    overrides += ["actor_rollout_ref.actor.megatron.use_dist_checkpointing=true",
                  f"actor_rollout_ref.actor.megatron.dist_checkpointing_path={init}/global_step_0/actor/model/dist_ckpt"]
    env["TENSORBOARD_DIR"] = str(work / "tensorboard")
    if code := _cli("train", *overrides, env=env):
        print(f"verl path: train exit code {code}")
        return code
    ckpt = work / "checkpoints" / f"global_step_{VERL_STEPS}" / "actor"
    code = _cli("convert", "to-hf", "--ckpt", str(ckpt), "--out", str(work / "hf_export"), "--verify", "--no-progress")
    print(f"verl path: exit code {code} ({time.perf_counter() - t:.0f} s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
