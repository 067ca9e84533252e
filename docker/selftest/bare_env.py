"""Bare self-test, check 1: the node's CUDA stack and the optional compiled components.

    python docker/selftest/bare_env.py cuda [--require-gpu] [--json OUT]
        cuda   torch's CUDA build sees a GPU; a matmul agrees with the CPU's
        nccl   a one-rank NCCL process group: all_reduce, broadcast, barrier
        bf16   the GPU supports bfloat16; a bf16 matmul is within 1e-2 (relative) of fp32
    python docker/selftest/bare_env.py components [--json OUT]
        which of Transformer Engine, Apex (and its fused softmax kernels), flash-attn and vLLM are
        installed; on a GPU each present one runs its kernel check (docker/selftest/check_kernels.py),
        an absent one is SKIP with the checks that depend on it

Each line is `PASS|FAIL|SKIP <check>: <reason>`. Exit 0 all passed, 1 something failed,
77 nothing could run here (no GPU: the `cuda` part is SKIP as a whole, or FAIL with --require-gpu).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch

SKIPPED = 77
HERE = Path(__file__).resolve().parent


def say(status: str, name: str, text: str) -> None:
    print(f"{status} {name}: {text}", flush=True)


def check_cuda() -> tuple[str, dict]:
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    props = torch.cuda.get_device_properties(0)
    on_gpu = (x.cuda() @ x.cuda()).cpu()
    err = (on_gpu - x @ x).abs().max().item()
    assert err < 1e-2, f"matmul on the GPU differs from the CPU's by {err:.3g}"
    facts = {"gpu": torch.cuda.get_device_name(0), "devices": torch.cuda.device_count(),
             "capability": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 2**30, 1),
             "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    return (f"{facts['gpu']} (sm_{props.major}{props.minor}, {facts['memory_gib']} GiB), {facts['devices']} "
            f"visible, torch {torch.__version__} CUDA {torch.version.cuda}"), facts


def check_nccl() -> tuple[str, dict]:
    import torch.distributed as dist

    import inspect

    assert dist.is_nccl_available(), "this torch build has no NCCL"
    torch.cuda.set_device(0)
    bind = {"device_id": torch.device("cuda", 0)} if "device_id" in inspect.signature(
        dist.init_process_group).parameters else {}
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{tmp}/store", rank=0, world_size=1, **bind)
        try:
            t = torch.arange(4, dtype=torch.float32, device="cuda")
            dist.all_reduce(t)
            dist.broadcast(t, src=0)
            dist.barrier()
            torch.cuda.synchronize()
            assert t.tolist() == [0.0, 1.0, 2.0, 3.0], t.tolist()
        finally:
            dist.destroy_process_group()
    raw = torch.cuda.nccl.version()
    version = ".".join(map(str, raw)) if isinstance(raw, tuple) else str(raw)
    return f"NCCL {version}: one-rank group, all_reduce/broadcast/barrier", {"nccl": version}


def check_bf16() -> tuple[str, dict]:
    assert torch.cuda.is_bf16_supported(), "the GPU does not support bfloat16"
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(512, 512, generator=g).cuda(), torch.randn(512, 512, generator=g).cuda()
    ref = a @ b
    got = (a.bfloat16() @ b.bfloat16()).float()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, f"bf16 matmul relative error {rel:.3g} (allowed 1e-2)"
    return f"bf16 matmul relative error {rel:.2g} (allowed 1e-2)", {"bf16_rel_error": rel}


def run_cuda_part(facts: dict, require_gpu: bool) -> int:
    if not torch.cuda.is_available() and require_gpu:
        say("FAIL", "cuda", f"torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no GPU: "
            "run on a GPU node with a GPU allocated (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!s})")
        facts["gpu"] = None
        return 1
    if not torch.cuda.is_available():
        reason = "no GPU visible" + (" (--cpu)" if os.environ.get("CUDA_VISIBLE_DEVICES") == "" else "")
        for name in ("cuda", "nccl", "bf16"):
            say("SKIP", name, reason)
        facts["gpu"] = None
        return SKIPPED
    failed = 0
    for name, check in (("cuda", check_cuda), ("nccl", check_nccl), ("bf16", check_bf16)):
        try:
            text, found = check()
            facts.update(found)
            say("PASS", name, text)
        except Exception as exc:  # report each
            failed += 1
            where = traceback.extract_tb(exc.__traceback__)[-1]
            say("FAIL", name, f"{type(exc).__name__}: {exc} ({Path(where.filename).name}:{where.lineno})")
    return 1 if failed else 0


# component -> (modules that must import, distribution for the version, kernel check in
# check_kernels.CHECKS, what is skipped without it)
COMPONENTS = {
    "transformer_engine": (["transformer_engine"], "transformer_engine", "transformer_engine",
                           "the TE layer spec and THD packing (use_remove_padding): the local spec runs"),
    "apex": (["apex", "amp_C", "fused_layer_norm_cuda"], "apex", "apex",
             "Apex's fused Adam/norm kernels and gradient_accumulation_fusion"),
    "apex_fused_softmax": (["scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda"], None, None,
                           "Megatron's masked_softmax_fusion (switched off for the runs)"),
    "flash_attn": (["flash_attn"], "flash-attn", "flash_attn", "the flash-attn kernel check"),
    "vllm": (["vllm"], "vllm", "vllm_import", "the vLLM rollout: the GRPO runs use the HF rollout"),
}


def present(modules: list[str]) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def version_of(dist: str | None) -> str | None:
    if dist is None:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_components_part(facts: dict) -> int:
    spec = importlib.util.spec_from_file_location("selftest_check_kernels", HERE / "check_kernels.py")
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)
    gpu = torch.cuda.is_available()
    failed = 0
    found = {}
    for name, (modules, dist, kernel_check, needs) in COMPONENTS.items():
        if not present(modules):
            found[name] = None
            say("SKIP", name, f"not installed: skipped {needs}")
            continue
        version = version_of(dist) or "present"
        found[name] = version
        if not gpu or kernel_check is None:
            say("PASS", name, f"{version} installed" + ("" if gpu or kernel_check is None else
                                                         " (kernel check needs a GPU)"))
            continue
        try:
            say("PASS", name, f"{version}: {kernels.CHECKS[kernel_check]()}")
        except Exception as exc:
            failed += 1
            say("FAIL", name, f"{version} installed but its check failed: {type(exc).__name__}: {exc}")
    facts["components"] = found
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["cuda", "components"])
    parser.add_argument("--json", type=Path, default=None, help="write the facts found here")
    parser.add_argument("--require-gpu", action="store_true", help="cuda: no GPU is a failure, not a skip")
    args = parser.parse_args(argv)
    facts: dict = {}
    rc = run_cuda_part(facts, args.require_gpu) if args.part == "cuda" else run_components_part(facts)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(facts, indent=2) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
