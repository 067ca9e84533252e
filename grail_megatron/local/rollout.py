"""The local loop's rollout: the verl path's HF generation engine, in the rank-0 process.

`grail_megatron.workers.hf_rollout` serves verl's agent loop from a Ray actor; here the same
`HFGenerationEngine`, the same sampling parameters (`parse_sampling` of what verl's agent loop
sends) and the same per-request token budget run in process, and the actor's weights arrive
through verl's weight export (`LocalPolicy.export_weights`).

Seeds: with `rollout.full_determinism=true` every (prompt, occurrence) is sampled alone with
`derived_seed(rollout.seed, weight version, prompt ids, occurrence, spec)`, exactly as the
verl path's server seeds it (the weight version of step s is s - 1, the step whose update it
carries), so both paths sample the same responses for the same prompts and weights. Otherwise
one batched `generate` per step, seeded from (rollout.seed, step): fast, and reproducible
within the local loop (a resumed run samples what the uninterrupted one did).

The batch comes back in verl's layout: left-padded `prompts`, right-padded `responses`,
`response_mask` (tokens up to and including EOS), `rollout_log_probs`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from grail_megatron.workers.hf_rollout import (HFGenerationEngine, SamplingSpec, derived_seed, max_new_tokens,
                                               parse_sampling, special_token_ids)


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


def sampling_params(rollout_cfg, validate: bool = False) -> dict:
    """What verl's agent loop sends with every request (training or validation settings)."""
    source = rollout_cfg.val_kwargs if validate else rollout_cfg
    return dict(temperature=float(source.temperature), top_p=float(source.top_p), top_k=int(source.top_k),
                repetition_penalty=1.0, logprobs=bool(rollout_cfg.calculate_log_probs))


class LocalRollout:
    """HF generation on rank 0 with the verl path's engine, sampling parameters and seeds."""

    def __init__(self, arr_cfg):
        from verl.utils.config import omega_conf_to_dataclass
        from verl.workers.config import HFModelConfig

        self.config = arr_cfg.rollout
        model = omega_conf_to_dataclass(arr_cfg.model, dataclass_type=HFModelConfig)
        self.tokenizer = model.tokenizer
        self.eos_ids, self.pad_id = special_token_ids(model.generation_config, model.tokenizer, model.hf_config,
                                                      model.local_path)
        self.engine = HFGenerationEngine(model.local_path, str(self.config.dtype), torch.device("cpu"),
                                         self.eos_ids, self.pad_id, trust_remote_code=model.trust_remote_code)
        self.deterministic = bool(self.config.get("full_determinism", False))
        self.seed = int(self.config.get("seed", 0) or 0)
        self.response_length = int(self.config.response_length)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        return self.engine.load_weights(named_tensors)

    def generate(self, prompt_ids: list[list[int]], n: int, step: int, validate: bool = False) -> RolloutBatch:
        """`n` samples of each prompt (sample i*n + k is prompt i's k-th), for training step `step`."""
        params = sampling_params(self.config, validate)
        spec = parse_sampling(params, default_ignore_eos=bool(self.config.ignore_eos))
        requests = [p for p in prompt_ids for _ in range(n)]
        limits = [max_new_tokens(params, len(p), self.config) for p in requests]
        if self.deterministic:
            samples = self._one_by_one(requests, limits, spec, weight_version=step - 1)
        else:
            samples = self.engine.generate(requests, limits, spec, seed=self._batch_seed(step, validate),
                                           aborted=lambda: False)
        return self._batch(requests, samples)

    def _one_by_one(self, requests: list[list[int]], limits: list[int], spec: SamplingSpec, weight_version: int):
        occurrences: dict[tuple[int, ...], int] = {}
        samples = []
        for prompt, limit in zip(requests, limits, strict=True):
            occurrence = occurrences.get(tuple(prompt), 0)
            occurrences[tuple(prompt)] = occurrence + 1
            seed = derived_seed(self.seed, weight_version, prompt, occurrence, spec)
            samples += self.engine.generate([prompt], [limit], spec, seed=seed, aborted=lambda: False)
        return samples

    def _batch_seed(self, step: int, validate: bool) -> int:
        return (self.seed * 100_003 + step * 2 + int(validate)) % (2**63)

    def _batch(self, requests: list[list[int]], samples) -> RolloutBatch:
        prompts, prompt_mask = left_pad(requests, self.pad_id)
        rows = len(samples)
        responses = torch.full((rows, self.response_length), self.pad_id, dtype=torch.long)
        response_mask = torch.zeros((rows, self.response_length), dtype=torch.long)
        log_probs = torch.zeros((rows, self.response_length), dtype=torch.float32)
        for row, sample in enumerate(samples):
            length = min(len(sample.token_ids), self.response_length)
            responses[row, :length] = torch.tensor(sample.token_ids[:length], dtype=torch.long)
            response_mask[row, :length] = 1
            log_probs[row, :length] = torch.tensor(sample.log_probs[:length], dtype=torch.float32)
        return RolloutBatch(prompts=prompts, responses=responses,
                            attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
                            response_mask=response_mask, rollout_log_probs=log_probs)

    def generate_texts(self, messages: list[list[dict]], n: int, seeds: list[int]) -> list[list[str]]:
        """`n` decoded completions per chat prompt with the validation settings, each prompt seeded."""
        params = sampling_params(self.config, validate=True)
        spec = parse_sampling(params, default_ignore_eos=bool(self.config.ignore_eos))
        texts = []
        for chat, seed in zip(messages, seeds, strict=True):
            ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            limit = max_new_tokens(params, len(ids), self.config)
            out = self._batch([ids] * n, self.engine.generate([ids] * n, [limit] * n, spec, seed=seed % (2**63),
                                                              aborted=lambda: False))
            texts.append(self.decode(out.responses, out.response_mask))
        return texts

    def decode(self, responses: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode(row[mask.bool()].tolist(), skip_special_tokens=True)
                for row, mask in zip(responses, response_mask)]
