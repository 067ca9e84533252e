"""`grail-megatron convert to-hf | from-hf | reshard` (see docs/checkpoint.md)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from .errors import CheckpointError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grail-megatron convert",
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
    to_hf.add_argument("--no-progress", action="store_true")

    from_hf = sub.add_parser("from-hf", help="HF folder -> dist checkpoint at TP/PP (runs TP*PP ranks)")
    from_hf.add_argument("--model", required=True, help="HF model folder")
    from_hf.add_argument("--out", required=True, help="checkpoint root; writes <out>/global_step_<step>/actor")
    from_hf.add_argument("--tp", type=int, default=1)
    from_hf.add_argument("--pp", type=int, default=1)
    from_hf.add_argument("--step", type=int, default=0)
    from_hf.add_argument("--overwrite", action="store_true")

    reshard = sub.add_parser("reshard", help="dist checkpoint -> same step at another TP/PP (runs TP*PP ranks)")
    reshard.add_argument("--ckpt", required=True, help="source: .../global_step_N[/actor] or a checkpoint root")
    reshard.add_argument("--out", required=True, help="checkpoint root for the resharded step")
    reshard.add_argument("--tp", type=int, default=1)
    reshard.add_argument("--pp", type=int, default=1)
    reshard.add_argument("--overwrite", action="store_true")
    return parser


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint root resolves to its newest complete step; step and actor dirs stay as given."""
    from .layout import TRACKER_FILE, list_step_dirs, step_dir
    from .manifest import latest_complete_step

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if (path / TRACKER_FILE).exists() or list_step_dirs(path):
        step = latest_complete_step(path)
        if step is None:
            raise CheckpointError(f"{path}: no complete checkpoint step found")
        return step_dir(path, step)
    return path


def _cmd_to_hf(args) -> int:
    from .safetensors_stream import parse_size
    from .to_hf import convert_to_hf

    ckpt = resolve_checkpoint(args.ckpt)
    verified = {}

    def verify(tmp_dir: Path) -> None:
        from .verify import verify_logits

        report = verify_logits(ckpt, tmp_dir, tolerance=args.tolerance)
        print(report.table())
        verified["report"] = report
        if not report.ok:
            raise CheckpointError(f"verification failed: max abs logit difference {report.max_abs_diff:.3e} "
                                  f"> {args.tolerance:g}; {args.out} was not written")

    report = convert_to_hf(ckpt, args.out, max_shard_bytes=parse_size(args.max_shard_size), hf_config_dir=args.hf_config,
                           overwrite=args.overwrite, progress=not args.no_progress,
                           before_publish=verify if args.verify else None)
    gb = report.total_bytes / 1e9
    print(f"wrote {report.out_dir}: {report.num_tensors} tensors, {gb:.3f} GB {report.dtype} in {len(report.shards)} "
          f"shard(s), {report.seconds:.1f} s ({gb / max(report.seconds, 1e-9):.2f} GB/s); source layout {report.source_layout}")
    return 0


def _launch(job, world_size: int) -> int:
    """Run the relayout job on TP*PP ranks: in-process under torchrun, else start torchrun."""
    from .relayout import run_job

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
    return subprocess.call(cmd, env=env)


def _refuse_existing(out_root: Path, step: int, overwrite: bool) -> None:
    from .layout import step_dir

    if step_dir(out_root, step).exists() and not overwrite:
        raise CheckpointError(f"{step_dir(out_root, step)} exists (pass --overwrite to replace it)")


def _cmd_from_hf(args) -> int:
    from .relayout import RelayoutJob

    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise CheckpointError(f"{model}: not an HF model folder (no config.json)")
    _refuse_existing(Path(args.out), args.step, args.overwrite)
    _warn_if_verl_cannot_build(model, args.tp)
    job = RelayoutJob("from-hf", str(model.resolve()), str(Path(args.out).resolve()), args.tp, args.pp, args.step)
    code = _launch(job, args.tp * args.pp)
    if code == 0 and os.environ.get("RANK", "0") == "0":
        print(verl_init_hint(Path(args.out), args.step))
    return code


def verl_init_hint(out_root: Path, step: int) -> str:
    """Where verl reads the converted weights (printed after `from-hf`)."""
    from .layout import model_dist_dir

    return ("verl (use_dist_checkpointing=true) loads the model from\n"
            f"  actor_rollout_ref.actor.megatron.dist_checkpointing_path={model_dist_dir(out_root.resolve(), step)}\n"
            "(the recipe's default when --out is ${GRAIL_MCORE_INIT_ROOT:-checkpoints/mcore_init}/<grail.model.name> "
            "and --step is 0)")


def _warn_if_verl_cannot_build(model: Path, tp: int) -> None:
    """verl 0.9.1's mbridge does not pad the vocabulary (its embedding has exactly vocab_size rows).

    Our Bridge pads to a multiple of TP, so such a checkpoint is still valid for `to-hf`,
    `reshard` and the local loop, but its embedding shape differs from verl's model.
    """
    import json

    vocab = json.loads((model / "config.json").read_text()).get("vocab_size")
    if isinstance(vocab, int) and vocab % tp:
        print(f"grail-megatron convert from-hf: warning: {model}/config.json vocab_size={vocab} is not a multiple of "
              f"--tp {tp}; the checkpoint stores {-(-vocab // tp) * tp} embedding rows while verl 0.9.1's model "
              f"(mbridge, no vocab padding) has {vocab}, so verl cannot load it (fine for to-hf/reshard/--local)",
              file=sys.stderr)


def _cmd_reshard(args) -> int:
    from .relayout import RelayoutJob, _step_of

    source = resolve_checkpoint(args.ckpt)
    step_dir = source.parent if source.name == "actor" else source
    _refuse_existing(Path(args.out), _step_of(step_dir), args.overwrite)
    job = RelayoutJob("reshard", str(source.resolve()), str(Path(args.out).resolve()), args.tp, args.pp)
    return _launch(job, args.tp * args.pp)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"to-hf": _cmd_to_hf, "from-hf": _cmd_from_hf, "reshard": _cmd_reshard}
    try:
        return commands[args.command](args)
    except CheckpointError as exc:
        print(f"grail-megatron convert {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
