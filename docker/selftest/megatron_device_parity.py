"""Bare self-test, check 2: Megatron on CUDA through our bridge against the CPU, same weights.

A tiny Qwen2 (docker/selftest/make_tiny_model.py) is built at TP1 by
`grail_megatron.megatron.bridge.Bridge` (Megatron's local layer spec on both devices, so the
parameters are the same modules), loaded from the same HF folder, and run forward and backward
on the same tokens in fp32 with TF32 off. The CPU reference runs in a child process with CUDA
hidden (where grail_megatron.megatron.cpu_support applies its adjustments); the CUDA run must
have none of them active (`cpu_support.active() == []`).

Bounds (fp32, TF32 off; only the summation order differs): logits max |diff| <= 1e-4, loss
|diff| <= 1e-5, every parameter's gradient max |diff| <= 1e-3 x that gradient's max |value|.

    python docker/selftest/megatron_device_parity.py --model-dir DIR [--json OUT]

Lines: PASS/FAIL megatron_cpu_reference, megatron_cuda_no_cpu_adjustments, megatron_cuda_logits,
megatron_cuda_loss, megatron_cuda_grads; without a GPU the CUDA part is one SKIP line and the
exit status is 77 (the CPU reference still runs, so the comparison code is exercised in CI).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SKIPPED = 77
BOUNDS = {"logits": 1e-4, "loss": 1e-5, "grads_rel": 1e-3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def forward_backward(model_dir: str, batch: int, seq: int) -> dict:
    """One rank, TP1: logits, loss and gradients of the bridge-built model on this process's device."""
    from grail_megatron.megatron import cpu_support, parallel
    from grail_megatron.megatron.bridge import Bridge, BridgeConfig

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    parallel.initialize(tp=1, pp=1, seed=0)
    try:
        bridge = Bridge.from_pretrained(model_dir, BridgeConfig(dtype=torch.float32, use_te=False,
                                                                sequence_parallel=False))
        (model,) = bridge.build_models()
        bridge.load_hf_weights([model], model_dir)
        model.train()
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(1234)
        tokens = torch.randint(0, bridge.vocab_size, (batch, seq), generator=generator).to(device)
        positions = torch.arange(seq, device=device).expand_as(tokens)
        logits = model(input_ids=tokens, position_ids=positions, attention_mask=None)[..., :bridge.vocab_size]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, bridge.vocab_size).float(),
                                                 tokens[:, 1:].reshape(-1))
        loss.backward()
        grads = {name: p.grad.detach().float().cpu() for name, p in model.named_parameters() if p.grad is not None}
        return {"device": str(device), "logits": logits.detach().float().cpu(), "loss": loss.item(),
                "grads": grads, "params": sum(p.numel() for p in model.parameters()),
                "adjustments": cpu_support.active(),
                "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    finally:
        parallel.destroy()


def cpu_reference(model_dir: str, batch: int, seq: int, out: Path) -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, __file__, "--model-dir", model_dir, "--batch", str(batch), "--seq", str(seq),
           "--run-here", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"CPU reference failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return torch.load(out, weights_only=False)


def compare(cuda: dict, cpu: dict) -> list[tuple[str, bool, str]]:
    logits = (cuda["logits"] - cpu["logits"]).abs().max().item()
    loss = abs(cuda["loss"] - cpu["loss"])
    assert cuda["grads"].keys() == cpu["grads"].keys(), sorted(set(cuda["grads"]) ^ set(cpu["grads"]))
    worst_name, worst = "", 0.0
    for name, g in cpu["grads"].items():
        rel = (cuda["grads"][name] - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
        if rel >= worst:
            worst_name, worst = name, rel
    return [
        ("megatron_cuda_no_cpu_adjustments", cuda["adjustments"] == [],
         f"cpu_support.active() == {cuda['adjustments']} on CUDA (the CPU run had {cpu['adjustments']})"),
        ("megatron_cuda_logits", logits <= BOUNDS["logits"],
         f"max |logit diff| CUDA vs CPU = {logits:.3g} (allowed {BOUNDS['logits']:g}, fp32, TF32 off)"),
        ("megatron_cuda_loss", loss <= BOUNDS["loss"],
         f"loss {cuda['loss']:.6f} vs {cpu['loss']:.6f}, |diff| = {loss:.3g} (allowed {BOUNDS['loss']:g})"),
        ("megatron_cuda_grads", worst <= BOUNDS["grads_rel"],
         f"{len(cpu['grads'])} gradients, worst max |diff| / max |grad| = {worst:.3g} ({worst_name}; "
         f"allowed {BOUNDS['grads_rel']:g})"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    parser.add_argument("--run-here", type=Path, default=None, help=argparse.SUPPRESS)  # the child
    args = parser.parse_args(argv)
    if args.run_here:
        torch.save(forward_backward(args.model_dir, args.batch, args.seq), args.run_here)
        return 0
    facts: dict = {"bounds": BOUNDS}
    with tempfile.TemporaryDirectory() as tmp:
        cpu = cpu_reference(args.model_dir, args.batch, args.seq, Path(tmp) / "cpu.pt")
    facts.update(cpu_loss=cpu["loss"], cpu_adjustments=cpu["adjustments"], params=cpu["params"])
    finite = all(torch.isfinite(g).all() for g in cpu["grads"].values()) and torch.isfinite(cpu["logits"]).all()
    ok = finite and cpu["device"] == "cpu" and len(cpu["grads"]) > 0
    print(f"{'PASS' if ok else 'FAIL'} megatron_cpu_reference: {cpu['params']} parameters, loss "
          f"{cpu['loss']:.6f}, {len(cpu['grads'])} gradients, adjustments {cpu['adjustments']}", flush=True)
    rc = 0 if ok else 1
    if not torch.cuda.is_available():
        print("SKIP megatron_cuda: no GPU visible: the CUDA side of the comparison did not run", flush=True)
        rc = rc or SKIPPED
    else:
        cuda = forward_backward(args.model_dir, args.batch, args.seq)
        facts.update(gpu=cuda["gpu"], cuda_loss=cuda["loss"], cuda_adjustments=cuda["adjustments"])
        for name, passed, text in compare(cuda, cpu):
            facts[name] = {"passed": passed, "detail": text}
            print(f"{'PASS' if passed else 'FAIL'} {name}: {text}", flush=True)
            rc = rc or (0 if passed else 1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(facts, indent=2) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
