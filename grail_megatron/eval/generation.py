"""Sampling `n` completions per prompt: HF `generate` on CPU, vLLM on GPU (a thin seam).

Both backends take the same `SamplingSettings` (GRAIL's: temperature 0.7, top_p 0.95,
top_k 50, 1024 new tokens; or read from the composed training config) and a per-task seed,
so a task's samples do not depend on which other tasks run in the same process. That makes
a resumed evaluation produce exactly the samples an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 50
    max_new_tokens: int = 1024

    @classmethod
    def from_config(cls, config: Any) -> SamplingSettings:
        """The rollout's sampling settings of a composed verl config (what training samples with)."""
        rollout = config.actor_rollout_ref.rollout
        return cls(
            temperature=float(rollout.temperature),
            top_p=float(rollout.top_p),
            top_k=int(rollout.top_k),
            max_new_tokens=int(config.data.max_response_length),
        )


def task_seed(seed: int, task_key: str) -> int:
    """A 63-bit seed for one task, stable across processes (Python's hash() is salted)."""
    digest = hashlib.sha256(f"{seed}:{task_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class HFGenerator:
    """`transformers` generate on CPU (or one GPU): the reference backend, used by the tests."""

    def __init__(self, model_dir: str | Path, sampling: SamplingSettings, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.sampling = sampling
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir)).to(self.device).eval()

    def generate(self, messages: Messages, n: int, seed: int) -> list[str]:
        import torch

        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        input_ids = torch.tensor([encoded["input_ids"]] * n, device=self.device)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=self.sampling.temperature > 0,
                temperature=self.sampling.temperature if self.sampling.temperature > 0 else None,
                top_p=self.sampling.top_p,
                top_k=self.sampling.top_k if self.sampling.top_k > 0 else None,
                max_new_tokens=self.sampling.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
        completions = out[:, input_ids.shape[1] :]
        return self.tokenizer.batch_decode(completions, skip_special_tokens=True)


class VLLMGenerator:
    """vLLM, only constructed when CUDA is available (see `cuda_available`).

    GPU-only seam, exercised by scripts/gpu_selftest.sh: `vllm_generate` is the one function
    that touches vLLM.
    """

    def __init__(self, model_dir: str | Path, sampling: SamplingSettings, seed: int):
        from vllm import LLM

        self.sampling = sampling
        self.llm = LLM(model=str(model_dir), seed=seed)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, messages: Messages, n: int, seed: int) -> list[str]:
        return vllm_generate(self.llm, self.tokenizer, messages, n, seed, self.sampling)


def vllm_generate(
    llm: Any, tokenizer: Any, messages: Messages, n: int, seed: int, sampling: SamplingSettings
) -> list[str]:
    """n completions of one chat prompt with vLLM, seeded per request (GPU only)."""
    from vllm import SamplingParams

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    params = SamplingParams(
        n=n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else -1,
        max_tokens=sampling.max_new_tokens,
        seed=seed,
    )
    (result,) = llm.generate([prompt], params, use_tqdm=False)
    return [choice.text for choice in result.outputs]


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def make_generator(backend: str, model_dir: str | Path, sampling: SamplingSettings, seed: int):
    """backend 'auto' picks vLLM when CUDA is available, else HF generate on CPU."""
    if backend == "auto":
        backend = "vllm" if cuda_available() else "hf"
    if backend == "vllm":
        if not cuda_available():
            raise RuntimeError("--backend vllm needs a CUDA GPU; use --backend hf on CPU")
        return VLLMGenerator(model_dir, sampling, seed)
    if backend == "hf":
        return HFGenerator(model_dir, sampling, device="cuda" if cuda_available() else "cpu")
    raise ValueError(f"backend must be auto, hf or vllm, got {backend!r}")


def generate_groups(generator: Any, prompts: Sequence[Messages], n: int, seeds: Sequence[int]) -> list[list[str]]:
    return [generator.generate(messages, n, seed) for messages, seed in zip(prompts, seeds, strict=True)]
