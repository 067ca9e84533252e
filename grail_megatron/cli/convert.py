"""`grail-megatron convert to-hf | from-hf | reshard` (see docs/checkpoint.md).

Inputs are checked before any rank starts: the HF config (readable, heads / KV heads / layers
against --tp / --pp), the checkpoint folder, the output folder. SIGTERM and SIGINT remove the
partial output; a later run to the same --out removes temp folders a killed run left.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from grail_megatron.checkpoint.errors import CheckpointError
from grail_megatron.cli.exits import BadInput, CheckFailed, Parser, debug_requested, guarded, positive_int
from grail_megatron.cli.signals import interruptible
from grail_megatron.quiet import quiet_third_party


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="grail-megatron convert",
                    description="Megatron dist checkpoints <-> Hugging Face, and resharding, on CPU.")
    sub = parser.add_subparsers(dest="command", required=True)

    to_hf = sub.add_parser("to-hf", help="dist checkpoint (any TP/PP) -> HF folder, streaming")
    to_hf.add_argument("--ckpt", required=True, help=".../global_step_N/actor, .../global_step_N, or a checkpoint root (newest complete step)")
    to_hf.add_argument("--out", required=True, help="HF output folder (written to a temp folder, then renamed)")
    to_hf.add_argument("--verify", action="store_true", help="compare logits of both sides on fixed prompts before publishing")
    to_hf.add_argument("--tolerance", type=float, default=1e-4, help="max abs fp32 logit difference for --verify")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    to_hf.add_argument("--hf-config", default=None, help="HF folder with config.json when the checkpoint has none")
    to_hf.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    to_hf.add_argument("--no-progress", action="store_true", help="no progress bar")

    from_hf = sub.add_parser("from-hf", help="HF folder -> dist checkpoint at TP/PP (runs TP*PP ranks)")
    from_hf.add_argument("--model", required=True, help="HF model folder")
    from_hf.add_argument("--out", required=True, help="checkpoint root; writes <out>/global_step_<step>/actor")
    _layout_args(from_hf)
    from_hf.add_argument("--step", type=int, default=0, help="step number of the written checkpoint (default 0)")
    from_hf.add_argument("--overwrite", action="store_true", help="replace an existing step of --out")

    reshard = sub.add_parser("reshard", help="dist checkpoint -> same step at another TP/PP (runs TP*PP ranks)")
    reshard.add_argument("--ckpt", required=True, help="source: .../global_step_N[/actor] or a checkpoint root")
    reshard.add_argument("--out", required=True, help="checkpoint root for the resharded step")
    _layout_args(reshard)
    reshard.add_argument("--overwrite", action="store_true", help="replace an existing step of --out")
    return parser


def _layout_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size of the output (default 1)")
    parser.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel size of the output (default 1)")


def check_layout(config_json: Path, tp: int, pp: int) -> None:
    """Heads, KV heads and layers of the model against --tp / --pp, before any rank starts."""
    from grail_megatron.config.model_spec import ModelSpec
    from grail_megatron.config.planner import ClusterSpec, TrainLayout, check_train_layout

    try:
        model = ModelSpec.from_hf_config(config_json)
    except (ValueError, FileNotFoundError) as exc:
        raise BadInput(str(exc)) from None
    cluster = ClusterSpec(nnodes=1, gpus_per_node=tp * pp, gpu_memory_gib=0)
    problems = check_train_layout(model, cluster, TrainLayout(tp=tp, pp=pp), "")
    if problems:
        lines = [f"{config_json}: --tp {tp} --pp {pp} does not fit this model:"]
        lines += [f"  - {p.reason.replace('TP=', '--tp ').replace('PP=', '--pp ')}; {_flag_fix(p.fix)}"
                  for p in problems]
        raise BadInput("\n".join(lines))


def _flag_fix(fix: str) -> str:
    return fix.replace("use TP in", "use --tp in").replace("use PP in", "use --pp in").replace("with TP=", "with --tp ")


def _cmd_to_hf(args) -> int:
    from grail_megatron.checkpoint.safetensors_stream import parse_size
    from grail_megatron.checkpoint.to_hf import convert_to_hf

    ckpt = _resolve(args.ckpt)
    try:
        max_shard = parse_size(args.max_shard_size)
    except ValueError as exc:
        raise BadInput(f"--max-shard-size {args.max_shard_size!r}: {exc}") from None
    if args.hf_config and not (Path(args.hf_config) / "config.json").is_file():
        raise BadInput(f"--hf-config {args.hf_config}: no config.json there")
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise BadInput(f"--out {out} exists and is not empty (pass --overwrite to replace it)")

    def verify(tmp_dir: Path) -> None:
        from grail_megatron.checkpoint.verify import verify_logits

        report = verify_logits(ckpt, tmp_dir, tolerance=args.tolerance)
        print(report.table())
        if not report.ok:
            raise CheckFailed(f"verification failed: max abs logit difference {report.max_abs_diff:.3e} "
                              f"> {args.tolerance:g}; {args.out} was not written")

    report = convert_to_hf(ckpt, args.out, max_shard_bytes=max_shard, hf_config_dir=args.hf_config,
                           overwrite=args.overwrite, progress=not args.no_progress,
                           before_publish=verify if args.verify else None)
    gb = report.total_bytes / 1e9
    print(f"wrote {report.out_dir}: {report.num_tensors} tensors, {gb:.3f} GB {report.dtype} in {len(report.shards)} "
          f"shard(s), {report.seconds:.1f} s ({gb / max(report.seconds, 1e-9):.2f} GB/s); source layout {report.source_layout}")
    return 0


def _resolve(path: str) -> Path:
    from grail_megatron.checkpoint.manifest import resolve_checkpoint

    if not Path(path).exists():
        raise BadInput(f"--ckpt {path}: does not exist")
    return resolve_checkpoint(path)


def _launch(job, world_size: int) -> int:
    """Run the relayout job on TP*PP ranks: in-process under torchrun, else start torchrun."""
    from grail_megatron.checkpoint.relayout import run_job

    if os.environ.get("WORLD_SIZE") == str(world_size) and "RANK" in os.environ:
        from grail_megatron.megatron import parallel

        try:
            run_job(job)
        finally:
            parallel.destroy()
        return 0
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
           "-m", "grail_megatron.checkpoint.relayout", job.to_json()]
    code = subprocess.call(cmd, env=env)
    return 0 if code == 0 else CheckFailed.code


def _refuse_existing(out_root: Path, step: int, overwrite: bool) -> None:
    from grail_megatron.checkpoint.layout import step_dir

    if step_dir(out_root, step).exists() and not overwrite:
        raise BadInput(f"{step_dir(out_root, step)} exists (pass --overwrite to replace it)")


def _cmd_from_hf(args) -> int:
    from grail_megatron.checkpoint.relayout import RelayoutJob

    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise BadInput(f"--model {model}: not an HF model folder (no config.json)")
    if args.step < 0:
        raise BadInput(f"--step {args.step}: must be >= 0")
    check_layout(model / "config.json", args.tp, args.pp)
    _refuse_existing(Path(args.out), args.step, args.overwrite)
    _warn_if_verl_cannot_build(model, args.tp)
    job = RelayoutJob("from-hf", str(model.resolve()), str(Path(args.out).resolve()), args.tp, args.pp, args.step)
    code = _launch(job, args.tp * args.pp)
    if code == 0 and os.environ.get("RANK", "0") == "0":
        print(verl_init_hint(Path(args.out), args.step))
    return code


def verl_init_hint(out_root: Path, step: int) -> str:
    """Where verl reads the converted weights (printed after `from-hf`)."""
    from grail_megatron.checkpoint.layout import model_dist_dir

    return ("verl (use_dist_checkpointing=true) loads the model from\n"
            f"  actor_rollout_ref.actor.megatron.dist_checkpointing_path={model_dist_dir(out_root.resolve(), step)}\n"
            "(the recipe's default when --out is ${GRAIL_MCORE_INIT_ROOT:-checkpoints/mcore_init}/<grail.model.name> "
            "and --step is 0)")


def _warn_if_verl_cannot_build(model: Path, tp: int) -> None:
    """verl 0.9.1's mbridge does not pad the vocabulary (its embedding has exactly vocab_size rows).

    Our Bridge pads to a multiple of TP, so such a checkpoint is still valid for `to-hf` and
    `reshard`, but its embedding shape differs from verl's model (which both training paths,
    `train` and `train --local`, build).
    """
    import json

    vocab = json.loads((model / "config.json").read_text()).get("vocab_size")
    if isinstance(vocab, int) and vocab % tp:
        print(f"grail-megatron convert from-hf: warning: {model}/config.json vocab_size={vocab} is not a multiple of "
              f"--tp {tp}; the checkpoint stores {-(-vocab // tp) * tp} embedding rows while verl 0.9.1's model "
              f"(mbridge, no vocab padding) has {vocab}, so neither `train` nor `train --local` can load it (fine for to-hf/reshard)",
              file=sys.stderr)


def _cmd_reshard(args) -> int:
    from grail_megatron.checkpoint.layout import ActorPaths, resolve_actor_dir
    from grail_megatron.checkpoint.relayout import RelayoutJob, _step_of

    source = _resolve(args.ckpt)
    step_dir = source.parent if source.name == "actor" else source
    hf_config = ActorPaths.detect(resolve_actor_dir(source)).huggingface / "config.json"
    if hf_config.is_file():
        check_layout(hf_config, args.tp, args.pp)
    _refuse_existing(Path(args.out), _step_of(step_dir), args.overwrite)
    job = RelayoutJob("reshard", str(source.resolve()), str(Path(args.out).resolve()), args.tp, args.pp)
    return _launch(job, args.tp * args.pp)


def _translate(exc: BaseException):
    if isinstance(exc, CheckpointError):
        return CheckFailed(str(exc))
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    commands = {"to-hf": _cmd_to_hf, "from-hf": _cmd_from_hf, "reshard": _cmd_reshard}
    quiet_third_party()
    return guarded(f"grail-megatron convert {args.command}",
                   lambda: interruptible(lambda: commands[args.command](args)),
                   debug=args.debug or debug_requested(argv), translate=_translate)


if __name__ == "__main__":
    sys.exit(main())
