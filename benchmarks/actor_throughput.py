"""Throughput of the actor's GRPO update on verl's Megatron engine: tokens/s and model FLOPs
utilisation (MFU).

    python benchmarks/actor_throughput.py                       # GPU: Qwen2.5-1.5B shape, bf16, seq 2048
    python benchmarks/actor_throughput.py --preset tiny --device cpu --seq 64 --batch 2 --steps 2

A random-init model with the shape of `configs/model_preset/<preset>.yaml` (no weights are
downloaded) is saved as a Hugging Face folder (`grail_megatron.models.tiny.make_tiny_model`, bf16)
and trained by verl 0.9.1's own worker and Megatron engine in this process, one rank, as the
local loop drives them: `grail_megatron.local.policy.LocalPolicy.update_actor` - verl's
`ActorRolloutRefWorker.update_actor` (mbridge-built `MegatronEngineWithLMHead`): forward, verl's
clipped policy loss, backward and one Megatron optimizer step (Adam, fp32 main weights, gradient
clipping) per `--batch` sequences of `--seq` tokens (half prompt, half response), in micro
batches of `--micro-batch`. The config is our composition (`model_preset=<preset>`, plus
`cluster=cpu` on the CPU). Old log-probs come from one verl old-log-prob pass first (ratio 1, as
in GRPO's first update of a batch); that pass and `--warmup` updates are not timed. verl's engine
keeps its parameters in bf16 (its McoreEngineConfig accepts bf16/fp16 only), so the CPU harness
runs bf16 as well.

Model FLOPs per token (forward + backward = 3 x forward; activation recomputation not counted,
as MFU is defined): 6 x (matmul parameters: attention projections, MLP and the LM head)
+ 6 x layers x hidden x seq (causal attention scores and values). MFU = model FLOPs/s divided
by the GPU's dense bf16 peak (table below, from NVIDIA's data sheets; `--peak-tflops` or
GRAIL_GPU_PEAK_TFLOPS for another GPU). Prints one `PASS throughput: ...` line (or
`PASS throughput_harness: ...` on CPU, where no peak applies) and writes --json (which also
holds verl's own `perf/mfu/actor` estimate, from its FLOPs counter, as `verl_mfu`).
On a GPU with less than 32 GiB the 1.5B update does not fit: `SKIP throughput` (exit 77).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIPPED = 77
# (substring of torch.cuda.get_device_name(), dense bf16 TFLOPS); first match wins
PEAK_BF16_TFLOPS = (
    ("GB200", 2500.0), ("B200", 2250.0), ("B100", 1750.0),
    ("GH200", 989.4), ("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4),
    ("H800 PCIe", 756.0), ("H800", 989.4), ("H20", 148.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("A10", 125.0),
)
PRESETS = {"qwen2.5-1.5b": "qwen2.5-1.5b-instruct", "tiny": "tiny"}
MIN_GPU_GIB = 32
RECOMPUTE_BELOW_GIB = 70
# verl's worker environment on the CPU (cluster=cpu exports the same to verl's Ray workers)
CPU_ENV = {"VERL_PLATFORM": "cpu", "VERL_USE_EXTERNAL_MODULES": "grail_megatron.workers.plugins",
           "TORCHDYNAMO_DISABLE": "1"}
OTC = "actor_rollout_ref.actor.megatron.override_transformer_config"


def peak_tflops(gpu_name: str, override: float | None) -> float | None:
    if override:
        return override
    env = os.environ.get("GRAIL_GPU_PEAK_TFLOPS")
    if env:
        return float(env)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in gpu_name), None)


def model_shape(preset: str) -> dict:
    import yaml

    path = REPO / "configs" / "model_preset" / f"{PRESETS[preset]}.yaml"
    facts = yaml.safe_load(path.read_text())["grail"]["model"]
    return {k: facts[k] for k in ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                  "vocab_size", "intermediate_size", "tie_word_embeddings",
                                  "max_position_embeddings")}


def flops_per_token(shape: dict, seq: int) -> float:
    h, layers, inter, vocab = (shape["hidden_size"], shape["num_layers"], shape["intermediate_size"],
                               shape["vocab_size"])
    head_dim = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * inter  # q, k+v, o, gate+up+down
    matmul_params = layers * per_layer + vocab * h  # + LM head (tied or not, it is a matmul)
    return 6.0 * matmul_params + 6.0 * layers * h * seq


def make_model(shape: dict, out: Path, device: str = "cpu") -> Path:
    """A random-init Qwen2 of `shape` in bf16 as an HF folder (with a small local tokenizer).
    The weights are initialised on `device`: on a GPU the 1.5B shape's random init takes a
    moment instead of a minute or two of one CPU thread (the self-test sets OMP_NUM_THREADS=1)."""
    import torch

    from grail_megatron.models.tiny import make_tiny_model, train_tokenizer

    train_tokenizer([f"What is {a} + {b}? {a + b}" for a in range(10) for b in range(10)], out / "tok")
    with torch.device(device):
        path = make_tiny_model(out / "model", tokenizer_dir=out / "tok", hidden=shape["hidden_size"],
                               layers=shape["num_layers"], heads=shape["num_attention_heads"],
                               kv_heads=shape["num_key_value_heads"], intermediate=shape["intermediate_size"],
                               tie_word_embeddings=shape["tie_word_embeddings"], vocab_size=shape["vocab_size"],
                               dtype="bfloat16")
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # peak_memory_gib: the engine's alone
    config = json.loads((path / "config.json").read_text())  # the preset's context length, too
    config["max_position_embeddings"] = shape["max_position_embeddings"]
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def have_te() -> bool:
    """Transformer Engine's layer spec is what mbridge builds on a GPU with TE (our bridge classes
    pick Megatron's local spec otherwise)."""
    import torch

    if not torch.cuda.is_available():
        return False
    from megatron.core.models.gpt.gpt_layer_specs import HAVE_TE

    return bool(HAVE_TE)


def kernel_overrides(gpu: bool, te: bool) -> list[str]:
    """On a GPU, the fused paths whose kernels are missing switched off (a bare torch node), as
    scripts/gpu_selftest.sh's bare GRPO run does; on the CPU, cluster=cpu has them all off."""
    if not gpu:
        return []
    extra = []
    if not te:  # local layer spec: padded batches, Megatron's attention
        extra += ["actor_rollout_ref.model.use_remove_padding=false", f"++{OTC}.attention_backend=local",
                  f"++{OTC}.apply_rope_fusion=false"]
    if importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is None:
        extra += [f"++{OTC}.gradient_accumulation_fusion=false", f"++{OTC}.persist_layer_norm=false"]
    if importlib.util.find_spec("scaled_masked_softmax_cuda") is None:
        extra.append(f"++{OTC}.masked_softmax_fusion=false")
    return extra


def overrides(args, model_dir: Path, recompute: bool, te: bool) -> list[str]:
    gpu = args.device == "cuda"
    recompute_keys = ("full", "uniform", 1) if recompute else ("null", "null", "null")
    return [f"model_preset={PRESETS[args.preset]}", *([] if gpu else ["cluster=cpu"]),
            f"actor_rollout_ref.model.path={model_dir}",
            "actor_rollout_ref.rollout.n=1",
            f"actor_rollout_ref.actor.ppo_mini_batch_size={args.batch}",
            f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={args.micro_batch}",
            f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={args.micro_batch}",
            "actor_rollout_ref.actor.ppo_epochs=1",
            "actor_rollout_ref.actor.optim.lr=1e-6",
            "actor_rollout_ref.actor.optim.lr_warmup_steps=0",
            "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=1",
            "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=1",
            "actor_rollout_ref.actor.megatron.use_dist_checkpointing=false",  # the HF folder's weights
            "actor_rollout_ref.actor.megatron.dtype=bfloat16",
            f"{OTC}.recompute_granularity={recompute_keys[0]}",
            f"{OTC}.recompute_method={recompute_keys[1]}",
            f"{OTC}.recompute_num_layers={recompute_keys[2]}",
            *kernel_overrides(gpu, te)]


def random_batch(batch: int, seq: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    response = seq // 2
    input_ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "position_ids": torch.arange(seq).expand(batch, seq).clone(),
        "prompts": input_ids[:, :-response].clone(),
        "responses": input_ids[:, -response:].clone(),
        "response_mask": torch.ones(batch, response, dtype=torch.long),
        "advantages": torch.randn(batch, response, generator=g),
    }


def init_single_rank(gpu: bool) -> None:
    """One torch.distributed rank (verl's worker initialises the group from these), and on the
    CPU verl's CPU platform and our plugins, set before verl is imported."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("VERL_LOGGING_LEVEL", "WARN")
    os.environ.setdefault("VERL_USE_EXTERNAL_MODULES", CPU_ENV["VERL_USE_EXTERNAL_MODULES"])
    if not gpu:
        os.environ.update(CPU_ENV)


def run(args) -> dict:
    import torch

    gpu = args.device == "cuda"
    shape = model_shape(args.preset)
    facts = {"preset": PRESETS[args.preset], "shape": shape, "dtype": args.dtype, "seq": args.seq,
             "batch": args.batch, "micro_batch": args.micro_batch, "steps": args.steps, "device": args.device,
             "engine": "verl MegatronEngineWithLMHead (LocalPolicy.update_actor)"}
    memory_gib = None
    if gpu:
        props = torch.cuda.get_device_properties(0)
        memory_gib = props.total_memory / 2**30
        facts.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(memory_gib, 1))
    recompute = {"on": True, "off": False}.get(args.recompute, bool(memory_gib and memory_gib < RECOMPUTE_BELOW_GIB))
    facts["recompute"] = recompute
    init_single_rank(gpu)
    # first, as in the local loop's ranks: verl imports our plugins (CPU platform, HF rollout,
    # mbridge compatibility) before anything else imports them
    import verl  # noqa: F401
    import torch.distributed as dist
    from megatron.core import parallel_state

    from grail_megatron.config import compose
    from grail_megatron.local.policy import LocalPolicy

    te = have_te()
    facts["layer_spec"] = "transformer_engine" if te else "local"
    with tempfile.TemporaryDirectory(prefix="grail-throughput-") as tmp:
        model_dir = make_model(shape, Path(tmp), args.device)
        cfg = compose(overrides(args, model_dir, recompute, te))
        facts["remove_padding"] = bool(cfg.actor_rollout_ref.model.use_remove_padding)
        try:
            policy = LocalPolicy(cfg, total_training_steps=args.warmup + args.steps + 1)
            engine = policy.actor.actor.engine
            params = sum(p.numel() for m in engine.module for p in m.parameters())
            batch = random_batch(args.batch, args.seq, shape["vocab_size"])
            batch["old_log_probs"] = policy.compute_log_prob(batch)["log_probs"]  # ratio 1 at the first update
            sync = torch.cuda.synchronize if gpu else (lambda: None)
            for _ in range(args.warmup):
                policy.update_actor(batch)
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                metrics = policy.update_actor(batch)
            sync()
            elapsed = time.perf_counter() - start
            if gpu:
                facts["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        finally:
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            if dist.is_initialized():
                dist.destroy_process_group()
    tokens = args.batch * args.seq * args.steps
    per_token = flops_per_token(shape, args.seq)
    verl_mfu = metrics.get("perf/mfu/actor")
    facts.update(params=params, seconds=round(elapsed, 3), tokens_per_s=tokens / elapsed,
                 model_tflops_per_s=per_token * tokens / elapsed / 1e12, flops_per_token=per_token,
                 grad_norm=metrics.get("actor/grad_norm"), pg_loss=metrics.get("actor/pg_loss"),
                 verl_mfu=verl_mfu if gpu and verl_mfu is not None and verl_mfu == verl_mfu else None)
    peak = peak_tflops(facts.get("gpu", ""), args.peak_tflops) if gpu else None
    facts["peak_tflops"] = peak
    facts["mfu"] = facts["model_tflops_per_s"] / peak if peak else None
    return facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-1.5b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--dtype", choices=["bf16"], default="bf16",
                        help="parameter dtype: bf16 only (verl's Megatron engine keeps bf16/fp16 parameters; "
                             "fp32 main weights in the optimizer)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="sequences per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--recompute", choices=["auto", "on", "off"], default="auto",
                        help=f"full activation recomputation (auto: on below {RECOMPUTE_BELOW_GIB} GiB)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.seq < 2 or args.seq % 2:
        parser.error("--seq must be an even number >= 2 (half prompt, half response)")
    if args.batch % args.micro_batch:
        parser.error("--batch must be a multiple of --micro-batch")
    import warnings

    from grail_megatron.quiet import quiet_third_party

    # as in the local loop's ranks: the import-time TE/Apex notices of megatron-core and mbridge
    for module in (r"megatron\..*", r"mbridge\..*"):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
    quiet_third_party(summary=False)
    import torch

    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("SKIP throughput: no GPU visible", flush=True)
            return SKIPPED
        gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        if args.preset != "tiny" and gib < MIN_GPU_GIB:
            print(f"SKIP throughput: {torch.cuda.get_device_name(0)} has {gib:.0f} GiB; the 1.5B update "
                  f"needs about {MIN_GPU_GIB} GiB", flush=True)
            return SKIPPED
    facts = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(facts, indent=2) + "\n")
    name = "throughput" if args.device == "cuda" else "throughput_harness"
    mfu = f"MFU {facts['mfu']:.1%} of {facts['peak_tflops']:g} TFLOPS" if facts["mfu"] is not None else (
        "MFU n/a (no peak for this device: --peak-tflops)")
    where = facts.get("gpu") or "CPU"
    print(f"PASS {name}: {where}: {facts['preset']} shape ({facts['params'] / 1e9:.3g}B params, random init), "
          f"{args.dtype}, seq {args.seq}, {args.batch} seq/step: {facts['tokens_per_s']:,.0f} tokens/s, "
          f"{facts['model_tflops_per_s']:.3g} model TFLOPS/s, {mfu}; verl's engine (LocalPolicy.update_actor), "
          f"recompute {'on' if facts['recompute'] else 'off'}, {facts['layer_spec']} spec", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
