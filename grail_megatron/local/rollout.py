"""Rollout with Hugging Face `generate`: the local stand-in for verl's vLLM engine.

Like vLLM in verl, the rollout model is a separate copy of the policy that receives the actor's
weights (full HF tensors from the Megatron bridge) after every update. It returns verl's batch
layout: left-padded `prompts`, right-padded `responses`, `response_mask` (tokens up to and
including EOS) and `rollout_log_probs` (log-softmax of the raw logits / temperature, the
quantity the actor recomputes; their difference is the train/rollout mismatch metric).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from grail_megatron.local.settings import SamplingSettings


@dataclass
class RolloutBatch:
    prompts: torch.Tensor  # [B*n, P] left padded
    responses: torch.Tensor  # [B*n, R] right padded
    attention_mask: torch.Tensor  # [B*n, P+R]
    response_mask: torch.Tensor  # [B*n, R]
    rollout_log_probs: torch.Tensor  # [B*n, R], 0 where masked

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompts, self.responses], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq):] = 1
    return ids, mask


def mask_after_eos(responses: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    """1 for every response token up to and including the first EOS, 0 after it."""
    is_eos = torch.zeros_like(responses, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= responses == eos
    ended_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~ended_before).long()


class HFRollout:
    """An HF causal LM that samples `n` completions per prompt with the config's settings."""

    def __init__(self, model_path: str, sampling: SamplingSettings):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.sampling = sampling
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.pad_id = self.tokenizer.pad_token_id
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else self.tokenizer.eos_token_id])

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy full HF tensors (as exported by the bridge) into the rollout model, by name."""
        params = dict(self.model.named_parameters())
        loaded = 0
        for name, tensor in named_tensors:
            if name not in params:
                if name == "lm_head.weight" and self.model.config.tie_word_embeddings:
                    continue  # tied: the embedding already carries it
                raise KeyError(f"rollout model has no parameter {name!r} (exported by the bridge)")
            if params[name].shape != tensor.shape:
                raise ValueError(f"weight {name}: bridge shape {tuple(tensor.shape)} != rollout {tuple(params[name].shape)}")
            params[name].copy_(tensor)
            loaded += 1
        return loaded

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], seed: int, sampling: SamplingSettings | None = None) -> RolloutBatch:
        s = sampling or self.sampling
        prompts, prompt_mask = left_pad(prompt_ids, self.pad_id)
        prompts = prompts.repeat_interleave(s.n, dim=0)  # sample i*n .. i*n+n-1 belong to prompt i
        prompt_mask = prompt_mask.repeat_interleave(s.n, dim=0)
        with torch.random.fork_rng(devices=[]):  # same seed -> same samples; other RNG users untouched
            torch.manual_seed(seed)
            out = self._generate(prompts, prompt_mask, s)
        width = prompts.shape[1]
        generated = out.sequences[:, width:]
        responses = torch.full((prompts.shape[0], s.response_length), self.pad_id, dtype=torch.long)
        responses[:, : generated.shape[1]] = generated
        response_mask = mask_after_eos(responses, self.eos_ids)
        responses = responses.masked_fill(response_mask == 0, self.pad_id)
        # Raw logits / temperature: verl's actor scales by the same temperature.
        logits = torch.stack(out.logits, dim=1).float() / (s.temperature if s.do_sample else 1.0)
        token_lp = torch.log_softmax(logits, dim=-1).gather(-1, generated.unsqueeze(-1)).squeeze(-1)
        log_probs = torch.zeros(responses.shape, dtype=torch.float32)
        log_probs[:, : token_lp.shape[1]] = token_lp
        log_probs = log_probs * response_mask
        return RolloutBatch(
            prompts=prompts,
            responses=responses,
            attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
            response_mask=response_mask,
            rollout_log_probs=log_probs,
        )

    def _generate(self, prompts: torch.Tensor, prompt_mask: torch.Tensor, s: SamplingSettings):
        return self.model.generate(
            input_ids=prompts,
            attention_mask=prompt_mask,
            do_sample=s.do_sample,
            temperature=s.temperature if s.do_sample else None,
            top_p=s.top_p if s.do_sample else None,
            top_k=(s.top_k if s.top_k > 0 else 0) if s.do_sample else None,
            max_new_tokens=s.response_length,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids),
            output_logits=True,
            return_dict_in_generate=True,
        )

    def generate_texts(self, messages: list[list[dict]], n: int, seeds: list[int],
                       sampling: SamplingSettings) -> list[list[str]]:
        """`n` decoded completions per chat prompt, each prompt with its own seed (validation)."""
        per_prompt = replace(sampling, n=n)
        texts = []
        for chat, seed in zip(messages, seeds, strict=True):
            ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            out = self.generate([ids], seed=seed % (2**63), sampling=per_prompt)
            texts.append(self.decode(out.responses, out.response_mask))
        return texts

    def decode(self, responses: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
        return [
            self.tokenizer.decode(row[mask.bool()].tolist(), skip_special_tokens=True)
            for row, mask in zip(responses, response_mask)
        ]
