"""`grail-megatron plan`: rank TP/PP/DP(/VPP) layouts and estimate memory, on a laptop.

Examples:
    grail-megatron plan                                   # the default run (7B, MATH, 1x8 GPU)
    grail-megatron plan --model qwen2.5-14b-instruct --kl
    grail-megatron plan --model path/to/config.json --nnodes 2
    grail-megatron plan actor_rollout_ref.actor.megatron.tensor_model_parallel_size=8   # any override

Exit status: 0 when the configured run passes every check, 1 when a check fails (the reasons
and fixes are printed), 2 for bad input (an option, key or value; named with the allowed values).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grail_megatron.cli.exits import BadInput, Parser, debug_requested, guarded, positive_float, positive_int

# Command-line flags that are shorthands for verl config keys.
FLAG_KEYS = {
    "nnodes": "trainer.nnodes",
    "gpus_per_node": "trainer.n_gpus_per_node",
    "gpu_memory_gb": "grail.cluster.gpu_memory_gb",
    "train_batch_size": "data.train_batch_size",
    "n": "actor_rollout_ref.rollout.n",
    "mini_batch": "actor_rollout_ref.actor.ppo_mini_batch_size",
    "micro_batch": "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
    "prompt_length": "data.max_prompt_length",
    "response_length": "data.max_response_length",
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="grail-megatron plan", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-name", default="grpo_grail", help="primary config (grpo_grail | grpo_grail_kl)")
    parser.add_argument("--kl", action="store_true", help="plan the KL variant (adds the reference worker)")
    parser.add_argument("--model", help="model preset name, or an HF config.json / model folder")
    parser.add_argument("--nnodes", type=positive_int, help="nodes (trainer.nnodes)")
    parser.add_argument("--gpus-per-node", type=positive_int, help="GPUs per node (trainer.n_gpus_per_node)")
    parser.add_argument("--gpu-memory-gb", type=positive_float, help="memory per GPU in GiB (grail.cluster.gpu_memory_gb)")
    parser.add_argument("--train-batch-size", type=positive_int, help="prompts per step (data.train_batch_size)")
    parser.add_argument("--n", type=positive_int, help="completions per prompt (rollout.n; GRPO needs >= 2)")
    parser.add_argument("--mini-batch", type=positive_int, help="prompts per optimiser step (actor.ppo_mini_batch_size)")
    parser.add_argument("--micro-batch", type=positive_int, help="sequences per micro batch per GPU")
    parser.add_argument("--prompt-length", type=positive_int, help="max prompt tokens (data.max_prompt_length)")
    parser.add_argument("--response-length", type=positive_int, help="max response tokens (data.max_response_length)")
    parser.add_argument("--top", type=positive_int, default=8, help="valid layouts to show per role (default 8)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of tables")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (key=value)")
    return parser


def overrides_from_args(args: argparse.Namespace) -> tuple[list[str], Path | None]:
    """Hydra overrides for the flags; the HF config path when --model is a file/folder."""
    from grail_megatron.config.compose import preset_options

    overrides: list[str] = []
    hf_config: Path | None = None
    if args.model:
        if args.model in preset_options("model_preset"):
            overrides.append(f"model_preset={args.model}")
        elif Path(args.model).exists():
            hf_config = Path(args.model)
        elif "/" in args.model or args.model.endswith(".json"):
            raise BadInput(f"--model {args.model}: no such file or folder (a preset name, an HF config.json or "
                           f"a model folder; presets: {', '.join(preset_options('model_preset'))})")
        else:
            overrides.append(f"model_preset={args.model}")  # compose() reports the allowed presets
    for attr, key in FLAG_KEYS.items():
        value = getattr(args, attr)
        if value is not None:
            overrides.append(f"{key}={value}")
    return overrides + list(args.overrides), hf_config


def make_plan(config_name: str, overrides: list[str], hf_config: Path | None = None):
    """Compose, run the validation step's input rules, plan; returns (cfg, plan, actor/ref/rollout candidates)."""
    from grail_megatron.cli import preflight
    from grail_megatron.config.model_spec import ModelSpec
    from grail_megatron.config.planner import (enumerate_rollout_layouts, enumerate_train_layouts, plan,
                                               plan_input_from_config)

    cfg = preflight.compose(overrides, config_name)
    problems = preflight.input_problems(cfg, "plan")
    if problems:
        raise BadInput(preflight.listing(problems))
    try:
        model = ModelSpec.from_hf_config(hf_config) if hf_config else None
    except (ValueError, FileNotFoundError) as exc:
        raise BadInput(f"--model: {exc}") from None
    inp = plan_input_from_config(cfg, model=model)
    result = plan(inp)
    actor_layouts = enumerate_train_layouts(inp, "actor")
    ref_layouts = enumerate_train_layouts(inp, "ref") if inp.ref is not None else []
    rollout_layouts = enumerate_rollout_layouts(inp)
    return cfg, result, actor_layouts, ref_layouts, rollout_layouts


def render(result, actor_layouts, ref_layouts, rollout_layouts, top: int) -> str:
    from grail_megatron.config import plan_report as report

    parts = [report.describe_input(result.input), "", report.configured_section(result), "",
             report.layouts_section("actor", actor_layouts, "actor", top)]
    if ref_layouts:
        parts += ["", report.layouts_section("reference", ref_layouts, "ref", top)]
    parts += ["", report.rollout_section(rollout_layouts), "", report.problems_section(result)]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return guarded("grail-megatron plan", lambda: run(args), debug=args.debug or debug_requested(argv))


def run(args: argparse.Namespace) -> int:
    config_name = "grpo_grail_kl" if args.kl else args.config_name
    overrides, hf_config = overrides_from_args(args)
    _, result, actor_layouts, ref_layouts, rollout_layouts = make_plan(config_name, overrides, hf_config)
    if args.json:
        from grail_megatron.config.plan_report import plan_to_dict

        print(json.dumps(plan_to_dict(result), indent=2))
    else:
        print(render(result, actor_layouts, ref_layouts, rollout_layouts, args.top))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
