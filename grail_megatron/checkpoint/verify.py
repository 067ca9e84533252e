"""`--verify`: the converted HF model and the Megatron checkpoint give the same logits.

Both sides are loaded on CPU in fp32 from their own files (the HF folder through
`transformers.from_pretrained`, the dist checkpoint through megatron-core into a GPTModel built by
the Bridge at TP1/PP1) and run on fixed prompts; the max absolute logit difference must stay
under the bound (1e-4 by default).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError
from .layout import ActorPaths, resolve_actor_dir

DEFAULT_PROMPTS = (
    "What is 12 + 30? Show your working.",
    "The capital of France is",
    "def add(a, b):\n    return",
)
DEFAULT_TOLERANCE = 1e-4


@dataclass
class VerifyReport:
    per_prompt: list[dict] = field(default_factory=list)
    max_abs_diff: float = 0.0
    tolerance: float = DEFAULT_TOLERANCE

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def table(self) -> str:
        lines = ["prompt                                   tokens  max|logit|  max|diff|"]
        for row in self.per_prompt:
            lines.append(f"{row['prompt'][:40]!r:<42} {row['tokens']:>5}  {row['max_logit']:>10.4f}  {row['max_abs_diff']:.3e}")
        verdict = "OK" if self.ok else "FAILED"
        lines.append(f"max abs logit difference {self.max_abs_diff:.3e} (fp32, bound {self.tolerance:g}): {verdict}")
        return "\n".join(lines)


def _prompt_ids(hf_dir: Path, prompts, vocab_size: int) -> list[torch.Tensor]:
    if (hf_dir / "tokenizer_config.json").is_file() or (hf_dir / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
        return [torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]]) for p in prompts]
    generator = torch.Generator().manual_seed(0)  # no tokenizer: fixed random token ids
    return [torch.randint(0, vocab_size, (1, 16), generator=generator) for _ in prompts]


def verify_logits(ckpt: str | os.PathLike, hf_dir: str | os.PathLike, prompts=DEFAULT_PROMPTS,
                  tolerance: float = DEFAULT_TOLERANCE) -> VerifyReport:
    from transformers import AutoConfig, AutoModelForCausalLM

    from grail_megatron.megatron.bridge import Bridge, BridgeConfig

    from .store import load_model_weights
    from .to_hf import ensure_single_rank_group

    hf_dir = Path(hf_dir)
    actor = ActorPaths.detect(resolve_actor_dir(ckpt))
    ensure_single_rank_group()
    hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    bridge = Bridge(AutoConfig.from_pretrained(str(hf_dir)), BridgeConfig(dtype=torch.float32))
    models = bridge.build_models()
    if (actor.model_dist / ".metadata").exists():
        load_model_weights(models, actor.model_dist)
    else:  # verl saved the weights as HF (use_dist_checkpointing=False): load those through the bridge
        bridge.load_hf_weights(models, actor.huggingface)
    mcore = models[0].eval()
    vocab = bridge.vocab_size

    report = VerifyReport(tolerance=tolerance)
    with torch.no_grad():
        for prompt, ids in zip(prompts, _prompt_ids(hf_dir, prompts, vocab)):
            if ids.numel() == 0:
                raise CheckpointError(f"prompt {prompt!r} tokenizes to nothing")
            positions = torch.arange(ids.shape[1]).unsqueeze(0)
            hf_logits = hf_model(input_ids=ids).logits.float()
            mc_logits = mcore(input_ids=ids, position_ids=positions, attention_mask=None).float()[..., :vocab]
            diff = (hf_logits - mc_logits).abs().max().item()
            report.per_prompt.append({"prompt": prompt, "tokens": ids.shape[1], "max_abs_diff": diff,
                                      "max_logit": hf_logits.abs().max().item()})
            report.max_abs_diff = max(report.max_abs_diff, diff)
    return report
