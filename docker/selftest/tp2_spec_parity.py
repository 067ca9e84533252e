"""GPU self-test, part 2: a TP2 forward with Transformer Engine's layer spec against the local spec.

Both Megatron models are built by grail_megatron.megatron.bridge.Bridge from the same HF
folder at tensor parallelism 2; their full logits (gathered over TP) are compared with each
other and with the Hugging Face model's. In fp32 with TF32 off the three agree to ~1e-5.

    torchrun --nproc_per_node 2 docker/selftest/tp2_spec_parity.py --model-dir DIR            # GPU: te vs local
    torchrun --nproc_per_node 2 docker/selftest/tp2_spec_parity.py --model-dir DIR --specs local local  # CPU

Rank 0 prints `PASS <check>: <numbers>` / `FAIL <check>: ...`; the exit code is 1 on failure.
"""
from __future__ import annotations

import argparse
import sys

import torch

SPECS = ("te", "local")


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="HF folder (docker/selftest/make_tiny_model.py)")
    parser.add_argument("--specs", nargs=2, choices=SPECS, default=["te", "local"],
                        help="the two layer specs to compare (default: te local)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--atol", type=float, default=1e-3, help="max |logit difference| allowed")
    return parser.parse_args(argv)


def sample_tokens(vocab_size: int, batch: int, seq: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)  # same tokens on every rank
    return torch.randint(0, vocab_size, (batch, seq), generator=generator)


def megatron_logits(model_dir: str, spec: str, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits [B, S, V] of the Megatron model built with `spec`, on every rank."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from grail_megatron.megatron.bridge import Bridge, BridgeConfig

    bridge = Bridge.from_pretrained(model_dir, BridgeConfig(use_te=spec == "te", dtype=torch.float32,
                                                            sequence_parallel=False))
    models = bridge.build_models()
    bridge.load_hf_weights(models, model_dir)
    (model,) = models
    model.eval()
    device = next(model.parameters()).device
    ids = tokens.to(device)
    positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
    with torch.no_grad():
        shard = model(input_ids=ids, position_ids=positions, attention_mask=None)
        full = gather_from_tensor_model_parallel_region(shard)
    return full[..., : bridge.vocab_size].float().cpu()


def hf_logits(model_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    with torch.no_grad():
        return model(input_ids=tokens.to(device)).logits.float().cpu()


def report(name: str, diff: float, atol: float) -> bool:
    ok = diff <= atol
    print(f"{'PASS' if ok else 'FAIL'} {name}: max |diff| = {diff:.3g} (allowed {atol:g})", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoConfig

    from grail_megatron.megatron import parallel

    # fp32 without TF32, so TE's GEMMs and the local spec's compute the same numbers
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    parallel.initialize(tp=args.tp, pp=1, seed=0)
    try:
        vocab_size = AutoConfig.from_pretrained(args.model_dir).vocab_size
        tokens = sample_tokens(vocab_size, args.batch, args.seq)
        first, second = (megatron_logits(args.model_dir, spec, tokens) for spec in args.specs)
        if torch.distributed.get_rank() != 0:  # every rank holds the full logits; rank 0 reports
            return 0
        reference = hf_logits(args.model_dir, tokens)
        spec_a, spec_b = args.specs
        checks = [
            report(f"tp{args.tp}_{spec_a}_vs_{spec_b}", (first - second).abs().max().item(), args.atol),
            report(f"tp{args.tp}_{spec_a}_vs_hf", (first - reference).abs().max().item(), args.atol),
        ]
        if spec_b != spec_a:
            checks.append(report(f"tp{args.tp}_{spec_b}_vs_hf", (second - reference).abs().max().item(), args.atol))
    finally:
        parallel.destroy()
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
