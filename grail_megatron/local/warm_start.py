"""A short supervised warm start of an HF model folder on the sums task (DESIGN.md s.8).

Without it a random-init model learns the tags but never learns to stop, and GRPO has no
reward spread to work with. It runs in one process before the GRPO run (plain PyTorch on the
HF model: it is a data-prep step, not part of the RL loop) and rewrites the model folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from grail_megatron.local import sums


@dataclass(frozen=True)
class WarmStartSettings:
    steps: int = 100
    batch_size: int = 32
    examples: int = 400
    lr: float = 2e-3
    seed: int = 0


def _encode(tokenizer, a: int, b: int) -> tuple[list[int], list[int]]:
    """Prompt ids (chat template with generation prompt) and completion ids ending in EOS."""
    prompt = tokenizer.apply_chat_template(sums.messages(a, b), add_generation_prompt=True, tokenize=True)
    if hasattr(prompt, "keys"):
        prompt = prompt["input_ids"]
    answer = tokenizer(sums.completion(a, b), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return list(prompt), answer


def _batch(encoded: list[tuple[list[int], list[int]]], pad_id: int):
    import torch

    width = max(len(p) + len(c) for p, c in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)  # loss on the completion only
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(encoded):
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(p): len(seq)] = torch.tensor(c)
        mask[i, : len(seq)] = 1
    return ids, labels, mask


def greedy_accuracy(model, tokenizer, pairs: list[tuple[int, int]], max_new_tokens: int = 24) -> float:
    """Fraction of `pairs` whose greedy completion contains the right `<SOLUTION>`."""
    import torch

    prompts = [_encode(tokenizer, a, b)[0] for a, b in pairs]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    hits = sum(f"{sums.SOLUTION_START}{a + b}{sums.SOLUTION_END}" in t for t, (a, b) in zip(texts, pairs))
    return hits / len(pairs)


def warm_start(model_dir: str | os.PathLike, settings: WarmStartSettings = WarmStartSettings()) -> dict:
    """Fine-tune the HF model in `model_dir` on correct sums and save it back (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    examples = [_encode(tokenizer, a, b) for a, b in sums.pairs(settings.examples, settings.seed + 1000)]
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    model.train()
    losses = []
    for _ in range(settings.steps):
        pick = torch.randint(len(examples), (settings.batch_size,), generator=generator).tolist()
        ids, labels, mask = _batch([examples[i] for i in pick], tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    accuracy = greedy_accuracy(model, tokenizer, [(a, b) for a in range(10) for b in range(10)])
    tmp = Path(tempfile.mkdtemp(prefix=".warm-", dir=model_dir.parent))
    for item in model_dir.iterdir():  # keep tokenizer and generation config
        if item.is_file() and not item.name.endswith(".safetensors"):
            shutil.copy2(item, tmp / item.name)
    model.save_pretrained(tmp)
    shutil.rmtree(model_dir)
    os.replace(tmp, model_dir)
    return {"first_loss": losses[0], "last_loss": losses[-1], "greedy_accuracy": accuracy}
