"""Throughput of the Megatron actor's update: tokens/s and model FLOPs utilisation (MFU).

    python benchmarks/actor_throughput.py                       # GPU: Qwen2.5-1.5B shape, bf16, seq 2048
    python benchmarks/actor_throughput.py --preset tiny --device cpu --dtype fp32 --seq 64 --batch 2 --steps 2

A random-init model with the shape of `configs/model_preset/<preset>.yaml` (no weights are
downloaded) is built by `grail_megatron.megatron.bridge.Bridge` and trained by
`grail_megatron.megatron.actor.MegatronActor.update_policy` - the actor's GRPO update: forward,
clipped policy loss, backward and one Megatron optimizer step (Adam, fp32 main weights, gradient
clipping) per `--batch` sequences of `--seq` tokens (half prompt, half response), in micro
batches of `--micro-batch`. `--warmup` steps are run first and not timed.

Model FLOPs per token (forward + backward = 3 x forward; activation recomputation not counted,
as MFU is defined): 6 x (matmul parameters: attention projections, MLP and the LM head)
+ 6 x layers x hidden x seq (causal attention scores and values). MFU = model FLOPs/s divided
by the GPU's dense bf16 peak (table below, from NVIDIA's data sheets; `--peak-tflops` or
GRAIL_GPU_PEAK_TFLOPS for another GPU). Prints one `PASS throughput: ...` line (or
`PASS throughput_harness: ...` on CPU, where no peak applies) and writes --json.
On a GPU with less than 32 GiB the 1.5B update does not fit: `SKIP throughput` (exit 77).
"""
from __future__ import annotations

import argparse
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


def write_hf_config(shape: dict, out: Path) -> None:
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                num_attention_heads=shape["num_attention_heads"], num_key_value_heads=shape["num_key_value_heads"],
                tie_word_embeddings=shape["tie_word_embeddings"],
                max_position_embeddings=shape["max_position_embeddings"], rope_theta=1_000_000.0,
                rms_norm_eps=1e-6).save_pretrained(out)


def kernel_overrides(gpu: bool) -> dict:
    """Fused kernels switched off where their extension is not installed (a bare torch node)."""
    import importlib.util

    if not gpu:
        return {}
    extra = {}
    if importlib.util.find_spec("scaled_masked_softmax_cuda") is None:
        extra["masked_softmax_fusion"] = False
    if importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is None:
        extra["gradient_accumulation_fusion"] = False
    return extra


def random_batch(batch: int, seq: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    response = seq // 2
    input_ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "responses": input_ids[:, -response:],
        "response_mask": torch.ones(batch, response, dtype=torch.long),
        "old_log_probs": torch.full((batch, response), -5.0),
        "advantages": torch.randn(batch, response, generator=g),
    }


def init_single_rank() -> None:
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def run(args) -> dict:
    import torch

    from grail_megatron.megatron import parallel
    from grail_megatron.megatron.actor import ActorConfig, MegatronActor
    from grail_megatron.megatron.bridge import Bridge, BridgeConfig

    gpu = args.device == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    shape = model_shape(args.preset)
    facts = {"preset": PRESETS[args.preset], "shape": shape, "dtype": args.dtype, "seq": args.seq,
             "batch": args.batch, "micro_batch": args.micro_batch, "steps": args.steps, "device": args.device}
    memory_gib = None
    if gpu:
        props = torch.cuda.get_device_properties(0)
        memory_gib = props.total_memory / 2**30
        facts.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(memory_gib, 1))
    recompute = {"on": True, "off": False}.get(args.recompute, bool(memory_gib and memory_gib < RECOMPUTE_BELOW_GIB))
    facts["recompute"] = recompute
    init_single_rank()
    parallel.initialize(tp=1, pp=1, seed=0)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            write_hf_config(shape, Path(tmp))
            have_te = gpu and __import__("importlib").util.find_spec("transformer_engine") is not None
            config = BridgeConfig(dtype=dtype, use_te=have_te, sequence_parallel=False, recompute=recompute,
                                  extra=kernel_overrides(gpu))
            bridge = Bridge.from_pretrained(tmp, config)
        facts["layer_spec"] = "transformer_engine" if have_te else "local"
        models = bridge.build_models(wrap_with_ddp=True)  # random init, as Megatron initialises
        params = sum(p.numel() for m in models for p in m.parameters())
        actor = MegatronActor(bridge, models, ActorConfig(lr=1e-6, ppo_mini_batch_size=args.batch,
                                                          ppo_micro_batch_size_per_gpu=args.micro_batch,
                                                          bridge=config), trainable=True)
        batch = random_batch(args.batch, args.seq, shape["vocab_size"])
        sync = torch.cuda.synchronize if gpu else (lambda: None)
        for _ in range(args.warmup):
            actor.update_policy(batch)
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            metrics = actor.update_policy(batch)
        sync()
        elapsed = time.perf_counter() - start
        if gpu:
            facts["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    finally:
        parallel.destroy()
    tokens = args.batch * args.seq * args.steps
    per_token = flops_per_token(shape, args.seq)
    facts.update(params=params, seconds=round(elapsed, 3), tokens_per_s=tokens / elapsed,
                 model_tflops_per_s=per_token * tokens / elapsed / 1e12, flops_per_token=per_token,
                 grad_norm=metrics.get("actor/grad_norm"), pg_loss=metrics.get("actor/pg_loss"))
    peak = peak_tflops(facts.get("gpu", ""), args.peak_tflops) if gpu else None
    facts["peak_tflops"] = peak
    facts["mfu"] = facts["model_tflops_per_s"] / peak if peak else None
    return facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-1.5b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
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
    elif args.dtype == "bf16":
        parser.error("--device cpu trains in fp32 only (Megatron's bf16 optimizer needs CUDA): add --dtype fp32")
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
          f"{facts['model_tflops_per_s']:.3g} model TFLOPS/s, {mfu}; recompute {'on' if facts['recompute'] else 'off'}, "
          f"{facts['layer_spec']} spec", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
