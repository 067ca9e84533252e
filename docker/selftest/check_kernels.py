"""GPU self-test, part 1: the compiled components of the image load and run their kernels.

Prints one `PASS <check>` or `FAIL <check>: <reason>` line per component and exits 1 if any
failed. Needs a CUDA device; scripts/gpu_selftest.sh runs it inside the image.
"""
from __future__ import annotations

import inspect
import sys
import traceback
from collections.abc import Callable

import torch


def check_torch_cuda() -> str:
    assert torch.cuda.is_available(), "torch sees no CUDA device"
    x = torch.randn(64, 64, device="cuda")
    assert torch.allclose((x @ x.T).cpu(), x.cpu() @ x.cpu().T, atol=1e-3)
    return f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}"


def check_apex() -> str:
    import amp_C  # noqa: F401  (the multi-tensor kernels Megatron's optimizer uses)
    import fused_layer_norm_cuda  # noqa: F401
    from apex.normalization import FusedRMSNorm
    from apex.optimizers import FusedAdam

    norm = FusedRMSNorm(64).cuda()
    x = torch.randn(8, 64, device="cuda")
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.allclose(norm(x), want, atol=1e-4)
    param = torch.nn.Parameter(torch.ones(4, device="cuda"))
    param.grad = torch.ones(4, device="cuda")
    FusedAdam([param], lr=0.1).step()
    assert torch.allclose(param.detach(), torch.full_like(param, 0.9), atol=1e-5)
    return "amp_C, fused_layer_norm_cuda, FusedRMSNorm, FusedAdam"


def check_transformer_engine() -> str:
    import transformer_engine
    import transformer_engine.pytorch as te

    layer = te.LayerNormLinear(64, 32, normalization="RMSNorm").cuda()
    out = layer(torch.randn(4, 64, device="cuda"))
    assert out.shape == (4, 32) and torch.isfinite(out).all()
    return f"transformer_engine {transformer_engine.__version__}, LayerNormLinear forward"


def check_flash_attn() -> str:
    import flash_attn
    from flash_attn import flash_attn_func

    q, k, v = (torch.randn(1, 16, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = flash_attn_func(q, k, v, causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
    assert (out.float() - ref.float()).abs().max() < 2e-2
    return f"flash_attn {flash_attn.__version__}"


def check_megatron_fused() -> str:
    from megatron.core.extensions import transformer_engine as mcore_te
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl
    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import local_multi_tensor_applier

    assert mcore_te.HAVE_TE, "megatron-core does not see Transformer Engine"
    # with TE or Apex present the optimizer uses their fused multi-tensor kernels
    assert clip_grads.multi_tensor_applier is not local_multi_tensor_applier, "unfused multi-tensor fallback"
    x = torch.randn(4, 64, device="cuda")
    a, b = x.chunk(2, dim=-1)
    assert torch.allclose(bias_swiglu_impl(x, None), torch.nn.functional.silu(a) * b, atol=1e-5)
    return "TE extensions, fused SwiGLU, TE/Apex multi-tensor kernels"


def check_patches() -> str:
    from megatron.core.models.common.embeddings import rotary_pos_embedding
    from megatron.core.optimizer import clip_grads
    from megatron.core.pipeline_parallel import schedules

    assert hasattr(schedules, "_token_counter_device"), "patch 0002 missing"
    assert hasattr(clip_grads, "_reduction_device"), "patch 0003 missing"
    assert "torch.cuda.is_available()" in inspect.getsource(rotary_pos_embedding.RotaryEmbedding), "patch 0001 missing"
    return "patches/ 0001-0003 in the installed megatron-core"


def check_vllm() -> str:
    import vllm

    return f"vllm {vllm.__version__}"


CHECKS: dict[str, Callable[[], str]] = {
    "torch_cuda": check_torch_cuda,
    "apex": check_apex,
    "transformer_engine": check_transformer_engine,
    "flash_attn": check_flash_attn,
    "megatron_fused": check_megatron_fused,
    "megatron_patches": check_patches,
    "vllm_import": check_vllm,
}


def main() -> int:
    failed = 0
    for name, check in CHECKS.items():
        try:
            print(f"PASS {name}: {check()}", flush=True)
        except Exception as exc:  # report every component, not just the first broken one
            failed += 1
            where = traceback.extract_tb(exc.__traceback__)[-1]
            print(f"FAIL {name}: {type(exc).__name__}: {exc} ({where.filename}:{where.lineno})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
