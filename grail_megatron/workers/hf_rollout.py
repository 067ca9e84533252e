"""A verl 0.9.1 rollout backend that samples with Hugging Face `generate` (`rollout.name=hf`).

Why: vLLM does not run on a CPU box and may be missing on a GPU node. This backend plugs into
verl's own rollout machinery, so verl's trainer, agent loop, load balancer and weight sync run
unchanged; only the engine behind the server handle differs. Three pieces, as for vLLM:

* `HFReplica` (a verl `RolloutReplica`, found through `RolloutReplicaRegistry` under "hf"):
  in HYBRID mode (verl's default for the colocated actor+rollout worker) it starts one
  `HFRolloutServer` Ray actor per replica, on the node and accelerator of the replica's first
  worker, and publishes it as `server_handle` for verl's agent loop.
* `HFRolloutServer` (Ray async actor): an `AutoModelForCausalLM` on the platform's device. It
  serves verl's token-in/token-out `generate(prompt_ids, sampling_params, request_id, ...)`
  and returns a verl `TokenOutput` with the sampled ids and their log-probs. Concurrent
  requests with equal sampling settings are batched into one `generate` call; one batch runs
  at a time, and weight updates, aborts and sleep wait for it.
* `HFServerAdapter` (a verl `BaseRollout`, built inside verl's `ActorRolloutRefWorker` by
  `get_rollout_class("hf", "async")`): verl's `update_weights` hands it the generator of
  (HF name, full tensor) pairs exported by the Megatron engine. Every rank of the replica
  drains the generator (it may run TP/PP collectives); only the replica's rollout rank 0
  forwards the tensors, in buckets, to the server.

Deterministic sampling (`rollout.full_determinism=true`): an unseeded request gets its own seed,
`derived_seed(rollout.seed, global_steps, prompt ids, occurrence, sampling settings)`, where
`global_steps` is the weight version verl's weight sync last pushed to the server and
`occurrence` counts the earlier requests with the same prompt and settings since the last
weight update (a resumed run's first sync and the uninterrupted run's sync of that step agree).
Such a request runs alone (no padding, no batch neighbours), so its tokens depend only on the
weights, the prompt and that key, not on batching or the process's history: a step of a resumed
run samples, for each prompt, the same set of responses as the uninterrupted run (which of a
prompt's identical requests gets which occurrence follows their arrival order). verl's request
ids cannot serve as the key (its v1 agent loop sends "det-0" for every request). Caveat: a
validation between the weight sync of step k and the rollout of step k+1 (test_freq dividing k,
or val_before_train on a resume) that repeats a training prompt with the same settings shifts
that prompt's occurrences. Without full_determinism, batches are seeded from rollout.seed, the
replica rank and a per-process batch counter (fast, not reproducible across processes).

Log-probs returned with each sampled token are `log_softmax(logits / temperature)` over the
full vocabulary, taken from the very logits the token was sampled from (before top-k/top-p
truncation; temperature 1 when greedy). That is the quantity verl's actor recomputes as its
old log-probs, so their difference measures only engine numerics. It is neither vLLM's
`raw_logprobs` (no temperature) nor its `processed_logprobs` (renormalised over the top-k/top-p
set); `rollout.logprobs_mode` is not read. A repetition penalty other than 1 is applied before
the log-probs are taken.

Register both pieces with `register_hf_rollout()` in every Ray process (verl imports the
modules named in `VERL_USE_EXTERNAL_MODULES` on `import verl`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, TokenOutput

logger = logging.getLogger(__name__)

ROLLOUT_NAME = "hf"
ROLLOUT_MODE = "async"
ADAPTER_FQN = f"{__name__}.HFServerAdapter"
# Sampling keys verl's agent loops send; anything else is refused rather than silently ignored.
SUPPORTED_SAMPLING_KEYS = frozenset(
    {"temperature", "top_p", "top_k", "repetition_penalty", "logprobs", "max_tokens", "max_new_tokens",
     "seed", "ignore_eos", "n"}
)
# vLLM's convention: a temperature below this samples greedily.
GREEDY_EPS = 1e-5
# How long the first request of a batch waits for concurrent ones to join it (seconds).
BATCH_WINDOW_S = 0.005


# --------------------------------------------------------------------------- registration
def _load_replica() -> type[RolloutReplica]:
    return HFReplica


def register_hf_rollout() -> None:
    """Register `rollout.name=hf` with verl in this process (idempotent).

    The replica goes through verl's `RolloutReplicaRegistry.register`. The in-worker adapter
    has no registration API in verl 0.9.1: `get_rollout_class` reads the plain dict
    `verl.workers.rollout.base._ROLLOUT_REGISTRY`, keyed by (name, mode) -> "module.Class".
    Adding our key to that dict is the one runtime adjustment this backend needs; nothing of
    verl is replaced. A different backend already registered as "hf" is an error.
    """
    from verl.workers.rollout import base as rollout_base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    key = (ROLLOUT_NAME, ROLLOUT_MODE)
    known = rollout_base._ROLLOUT_REGISTRY.get(key)
    if known not in (None, ADAPTER_FQN):
        raise RuntimeError(f"verl rollout {key} is already registered as {known!r}, not {ADAPTER_FQN!r}")
    loader = RolloutReplicaRegistry._registry.get(ROLLOUT_NAME)
    if loader is not None and getattr(loader, "__qualname__", None) != _load_replica.__qualname__:
        raise RuntimeError(f"verl rollout replica {ROLLOUT_NAME!r} is already registered by {loader!r}")
    RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica)
    rollout_base._ROLLOUT_REGISTRY[key] = ADAPTER_FQN


def server_actor_name(replica_rank: int, kind: str = "", suffix: str = "") -> str:
    """Ray actor name of a replica's server; the adapter finds its server by this name."""
    return f"{ROLLOUT_NAME}_server_{kind}{replica_rank}{suffix}"


# --------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class SamplingSpec:
    """verl's per-request sampling parameters in HF terms. Equal specs can share a batch."""

    greedy: bool
    temperature: float
    top_k: int  # 0: off (vLLM's -1)
    top_p: float
    repetition_penalty: float
    ignore_eos: bool
    seed: int | None  # a seeded request runs alone, so its samples depend on the seed only


def parse_sampling(params: dict[str, Any], default_ignore_eos: bool) -> SamplingSpec:
    unknown = set(params) - SUPPORTED_SAMPLING_KEYS
    if unknown:
        raise ValueError(f"hf rollout: unsupported sampling params {sorted(unknown)}; "
                         f"supported: {sorted(SUPPORTED_SAMPLING_KEYS)}")
    if int(params.get("n", 1)) != 1:
        raise ValueError("hf rollout: n > 1 per request is not supported (verl's agent loop repeats prompts)")
    temperature = float(params.get("temperature", 1.0))
    greedy = temperature < GREEDY_EPS
    top_k = int(params.get("top_k", -1))
    seed = params.get("seed")
    return SamplingSpec(
        greedy=greedy,
        temperature=1.0 if greedy else temperature,
        top_k=0 if greedy or top_k <= 0 else top_k,
        top_p=1.0 if greedy else min(float(params.get("top_p", 1.0)), 1.0),
        repetition_penalty=float(params.get("repetition_penalty", 1.0)),
        ignore_eos=bool(params.get("ignore_eos", default_ignore_eos)),
        seed=None if seed is None else int(seed),
    )


def max_new_tokens(params: dict[str, Any], prompt_len: int, config) -> int:
    """Tokens a request may generate: its own limit, else the configured response budget."""
    max_model_len = config.max_model_len or (config.prompt_length + config.response_length)
    room = max_model_len - prompt_len
    if room < 1:
        raise ValueError(f"prompt of {prompt_len} tokens leaves no room within max_model_len={max_model_len}")
    limit = params.get("max_tokens", params.get("max_new_tokens"))
    if limit is None:
        limit = min(config.response_length, config.prompt_length + config.response_length - prompt_len)
    return max(1, min(int(limit), room))


def derived_seed(base_seed: int, global_steps: int | None, prompt_ids: list[int], occurrence: int,
                 spec: SamplingSpec | None = None) -> int:
    """The seed of a request under full_determinism: a 63-bit hash of (rollout.seed, weight
    version, prompt token ids, occurrence of that prompt at that version, sampling settings)."""
    key = hashlib.blake2b(digest_size=8)
    key.update(repr((int(base_seed), -1 if global_steps is None else int(global_steps), int(occurrence),
                     None if spec is None else spec)).encode())
    key.update(b"|" + ",".join(map(str, prompt_ids)).encode())
    return int.from_bytes(key.digest(), "little") & (2**63 - 1)


class SampledLogProbs:
    """HF logits processor that records log p(sampled token) from the logits it was sampled from.

    `generate` calls it once per step with the step's raw float32 logits, before temperature,
    top-k and top-p. The token sampled from step t is known at step t+1 (the last column of
    `input_ids`), so only one [batch, vocab] log-softmax is kept at a time.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self._pending: torch.Tensor | None = None
        self._taken: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._pending is not None:
            self._taken.append(self._pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self._pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, generated: torch.LongTensor) -> torch.Tensor:
        """[batch, generated] log-probs, the last step's taken from the final sampled column."""
        if self._pending is not None and len(self._taken) < generated.shape[1]:
            self._taken.append(self._pending.gather(-1, generated[:, len(self._taken)].unsqueeze(-1)).squeeze(-1))
        self._pending = None
        if not self._taken:
            return torch.zeros(generated.shape, dtype=torch.float32)
        return torch.stack(self._taken, dim=1).float().cpu()


class StopWhen:
    """HF stopping criterion that ends a running `generate` when `flag()` turns true (abort)."""

    def __init__(self, flag: Callable[[], bool]):
        self.flag = flag

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.flag(), dtype=torch.bool, device=input_ids.device)


# --------------------------------------------------------------------------- engine
@dataclass
class Sample:
    token_ids: list[int]
    log_probs: list[float]
    stop_reason: str  # "completed" (eos or length) or "aborted"


def _resolve_device(device_name: str) -> torch.device:
    """The platform's device if this process can use it, else cpu (a CPU box, a CPU-only actor)."""
    if device_name != "cpu":
        module = getattr(torch, device_name, None)
        if module is not None and module.is_available():
            return torch.device(device_name, 0)
        logger.warning("hf rollout: platform device %r is not available in this process; using cpu", device_name)
    return torch.device("cpu")


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def special_token_ids(generation_config, tokenizer, hf_config, where: str) -> tuple[list[int], int]:
    """EOS ids: the generation config's (else the model config's) and the tokenizer's; pad: the
    tokenizer's, the model config's, else the first EOS."""
    eos = _as_id_list(getattr(generation_config, "eos_token_id", None)) or \
        _as_id_list(getattr(hf_config, "eos_token_id", None))
    eos += [e for e in _as_id_list(getattr(tokenizer, "eos_token_id", None)) if e not in eos]
    if not eos:
        raise ValueError(f"hf rollout: no eos token id in {where}")
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = getattr(hf_config, "pad_token_id", None) if pad is None else pad
    return eos, eos[0] if pad is None else int(pad)


class HFGenerationEngine:
    """The HF model and the synchronous work on it (generate, load weights, move)."""

    def __init__(self, model_path: str, dtype: str, device: torch.device, eos_ids: list[int], pad_id: int,
                 trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        ).to(device).eval()
        # The checkpoint's generation defaults (e.g. a repetition penalty or top_k) must not leak
        # into verl's sampling: every setting comes from the request.
        self.model.generation_config = GenerationConfig(pad_token_id=pad_id)
        self.eos_ids = eos_ids
        self.pad_id = pad_id

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _generation_config(self, spec: SamplingSpec, new_tokens: int):
        from transformers import GenerationConfig

        return GenerationConfig(
            do_sample=not spec.greedy,
            temperature=None if spec.greedy else spec.temperature,
            top_k=None if spec.greedy else spec.top_k,
            top_p=None if spec.greedy else spec.top_p,
            repetition_penalty=spec.repetition_penalty,
            max_new_tokens=new_tokens,
            eos_token_id=None if spec.ignore_eos else self.eos_ids,
            pad_token_id=self.pad_id,
            return_dict_in_generate=True,
        )

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], limits: list[int], spec: SamplingSpec, seed: int,
                 aborted: Callable[[], bool]) -> list[Sample]:
        """Sample one continuation per prompt (left-padded batch) with `seed`; cut each at eos/limit."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        ids, mask = self._left_pad(prompts)
        recorder = SampledLogProbs(spec.temperature)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=ids, attention_mask=mask,
                generation_config=self._generation_config(spec, max(limits)),
                logits_processor=LogitsProcessorList([recorder]),
                stopping_criteria=StoppingCriteriaList([StopWhen(aborted)]),
            )
        generated = out.sequences[:, ids.shape[1]:]
        log_probs = recorder.finish(generated)
        was_aborted = aborted()
        return [self._cut(generated[row].tolist(), log_probs[row].tolist(), limits[row], spec, was_aborted)
                for row in range(len(prompts))]

    def _cut(self, tokens: list[int], log_probs: list[float], limit: int, spec: SamplingSpec,
             was_aborted: bool) -> Sample:
        end = min(limit, len(tokens))
        if not spec.ignore_eos:
            end = next((i + 1 for i, t in enumerate(tokens[:end]) if t in self.eos_ids), end)
        finished = end == limit or (end > 0 and not spec.ignore_eos and tokens[end - 1] in self.eos_ids)
        return Sample(tokens[:end], log_probs[:end], "completed" if finished or not was_aborted else "aborted")

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy full HF tensors into the model by name; unknown names and shapes are errors."""
        targets = dict(self.model.named_parameters(remove_duplicate=False))
        targets.update(dict(self.model.named_buffers(remove_duplicate=False)))
        loaded = 0
        for name, tensor in named_tensors:
            if name not in targets:
                raise KeyError(f"hf rollout: the model has no weight {name!r}")
            if tuple(targets[name].shape) != tuple(tensor.shape):
                raise ValueError(f"hf rollout: {name} has shape {tuple(tensor.shape)}, "
                                 f"the model {tuple(targets[name].shape)}")
            targets[name].copy_(tensor)
            loaded += 1
        return loaded

    def move(self, device: torch.device) -> None:
        self.model.to(device)
        if device.type == "cpu" and self.device.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- server
@dataclass
class _Request:
    prompt_ids: list[int]
    spec: SamplingSpec
    limit: int
    request_id: str
    want_log_probs: bool
    future: asyncio.Future = field(repr=False)
    seed: int | None = None  # set: the request runs alone with this seed (its own or derived)


def _aborted_output(global_steps) -> TokenOutput:
    return TokenOutput(token_ids=[], log_probs=None, stop_reason="aborted", extra_fields={"global_steps": global_steps})


class HFRolloutServer:
    """Ray async actor serving verl's token-in/token-out `generate` with an HF model.

    Concurrency: requests queue up; whoever holds `_lock` runs one batch (the oldest request
    plus queued requests with the same SamplingSpec) in a thread, so the event loop keeps
    accepting requests and control calls. A closed gate (weight update, abort, sleep) parks
    new batches; `abort_all_requests` also stops the running batch between tokens.
    """

    def __init__(self, config, model_config, rollout_mode: RolloutMode, replica_rank: int,
                 visible_devices: str | None = None):
        from verl.utils.config import omega_conf_to_dataclass
        from verl.utils.device import get_device_name, get_visible_devices_keyword
        from verl.workers.config import HFModelConfig, RolloutConfig

        if visible_devices:
            os.environ[get_visible_devices_keyword()] = visible_devices
        self.config = omega_conf_to_dataclass(config, dataclass_type=RolloutConfig)
        self.model_config = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        self.rollout_mode = rollout_mode
        self.replica_rank = replica_rank
        self.global_steps = None
        self.device = _resolve_device(get_device_name())
        eos_ids, pad_id = self._special_ids()
        self.engine = HFGenerationEngine(self.model_config.local_path, self.config.dtype, self.device, eos_ids, pad_id,
                                         trust_remote_code=self.model_config.trust_remote_code)
        self._queue: list[_Request] = []
        self._lock = asyncio.Lock()
        self._closed_by: set[str] = set()
        self._gate = asyncio.Event()
        self._gate.set()
        self._rejecting = False
        self._abort_running = False
        self._stats = {"requests": 0, "batches": 0, "largest_batch": 0, "weight_updates": 0, "tensors_loaded": 0}
        self._running = False
        self.deterministic = bool(getattr(self.config, "full_determinism", False))
        # full_determinism: (global_steps, prompt, spec) -> requests seen since the last weight update
        self._occurrences: dict[tuple, int] = {}

    def _special_ids(self) -> tuple[list[int], int]:
        m = self.model_config
        return special_token_ids(m.generation_config, m.tokenizer, m.hf_config, m.local_path)

    # ---- addresses (no HTTP endpoint: verl's agent loops use the handle, token in/token out)
    def get_server_address(self) -> str:
        return f"hf://{ray.util.get_node_ip_address().strip('[]')}/replica-{self.replica_rank}"

    def stats(self) -> dict:
        """Counters for tests and logs: requests, batches, largest_batch, weight_updates, ..."""
        return {**self._stats, "running": self._running, "queued": len(self._queue), "device": str(self.device),
                "global_steps": self.global_steps, "gate_closed_by": sorted(self._closed_by)}

    # ---- generation
    async def generate(self, prompt_ids: list[int], sampling_params: dict[str, Any], request_id: str,
                       image_data=None, video_data=None, audio_data=None, mm_processor_kwargs=None,
                       priority: int = 0, **kwargs) -> TokenOutput:
        """verl's server call: sample a continuation of `prompt_ids` (one sequence)."""
        if image_data is not None or video_data is not None or audio_data is not None:
            raise NotImplementedError("hf rollout serves text-only models")
        prompt_ids = [int(t) for t in prompt_ids]
        params = dict(sampling_params)
        spec = parse_sampling(params, default_ignore_eos=self.config.ignore_eos)
        limit = max_new_tokens(params, len(prompt_ids), self.config)
        if self._rejecting:
            return _aborted_output(self.global_steps)
        request = _Request(prompt_ids, spec, limit, request_id, bool(params.get("logprobs", False)),
                           asyncio.get_running_loop().create_future(), seed=self._request_seed(prompt_ids, spec))
        self._queue.append(request)
        self._stats["requests"] += 1
        await self._serve(request)
        return await request.future

    async def _serve(self, request: _Request) -> None:
        """Run batches until `request` is answered (by its own batch, another's, or an abort)."""
        while not request.future.done():
            if not self._gate.is_set():
                await self._gate_or_answer(request)
                continue
            async with self._lock:
                if request.future.done() or not self._gate.is_set():
                    continue
                await asyncio.sleep(BATCH_WINDOW_S)  # let concurrent requests join this batch
                if self._gate.is_set():
                    await self._run_batch(self._take_batch())

    async def _gate_or_answer(self, request: _Request) -> None:
        """Wait until the gate opens or the request is answered (an abort answers parked requests)."""
        gate = asyncio.ensure_future(self._gate.wait())
        try:
            await asyncio.wait({gate, request.future}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gate.cancel()

    def _request_seed(self, prompt_ids: list[int], spec: SamplingSpec) -> int | None:
        """The request's own seed; under full_determinism a derived one (module docstring); else None."""
        if spec.seed is not None or not self.deterministic:
            return spec.seed
        key = (self.global_steps, tuple(prompt_ids), spec)
        occurrence = self._occurrences.get(key, 0)
        self._occurrences[key] = occurrence + 1
        return derived_seed(self.config.seed, self.global_steps, prompt_ids, occurrence, spec)

    def _set_global_steps(self, global_steps: int) -> None:
        if global_steps != self.global_steps:
            self._occurrences.clear()  # occurrences count within one weight version
        self.global_steps = global_steps

    def _take_batch(self) -> list[_Request]:
        """The oldest queued request and the queued ones that can share its `generate` call."""
        head = self._queue[0]  # every unanswered request is queued; answered ones are removed
        if head.seed is not None:
            batch = [head]
        else:
            batch = [r for r in self._queue if r.spec == head.spec][: max(1, self.config.max_num_seqs)]
        taken = set(map(id, batch))
        self._queue = [r for r in self._queue if id(r) not in taken]
        return batch

    def _batch_seed(self, head: _Request) -> int:
        if head.seed is not None:
            return head.seed
        return (self.config.seed * 1_000_003 + self.replica_rank * 10_007 + self._stats["batches"]) % (2**63)

    async def _run_batch(self, batch: list[_Request]) -> None:
        self._stats["batches"] += 1
        self._stats["largest_batch"] = max(self._stats["largest_batch"], len(batch))
        self._running = True
        try:
            samples = await asyncio.to_thread(
                self.engine.generate, [r.prompt_ids for r in batch], [r.limit for r in batch], batch[0].spec,
                self._batch_seed(batch[0]), lambda: self._abort_running,
            )
        except Exception as exc:  # noqa: BLE001 - every waiting request must learn of the failure
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(exc)
            return
        finally:
            self._running = False
        for r, s in zip(batch, samples, strict=True):
            log_probs = s.log_probs if r.want_log_probs else None
            r.future.set_result(TokenOutput(token_ids=s.token_ids, log_probs=log_probs, stop_reason=s.stop_reason,
                                            extra_fields={"global_steps": self.global_steps}))

    # ---- gate shared by weight updates, aborts and sleep
    def _close(self, reason: str) -> None:
        self._closed_by.add(reason)
        self._gate.clear()

    def _open(self, reason: str) -> None:
        self._closed_by.discard(reason)
        if not self._closed_by:
            self._gate.set()

    async def _drain_running(self) -> None:
        async with self._lock:  # the running batch (if any) has finished when this is acquired
            pass

    # ---- weights
    async def begin_weight_update(self) -> None:
        """Park new batches and wait for the running one: no batch mixes old and new weights."""
        self._close("weights")
        await self._drain_running()

    async def load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        loaded = await asyncio.to_thread(self.engine.load_weights, named_tensors)
        self._stats["tensors_loaded"] += loaded
        return loaded

    async def finish_weight_update(self, global_steps: int | None = None) -> None:
        self._stats["weight_updates"] += 1
        self._occurrences.clear()  # a weight update starts a new count (module docstring)
        if global_steps is not None:
            self.global_steps = global_steps
        self._open("weights")

    async def set_global_steps(self, global_steps: int) -> None:
        self._set_global_steps(global_steps)

    # ---- verl's control calls on servers
    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict:
        """Stop the running batch between tokens, answer queued requests as aborted, close the gate."""
        self._close("abort")
        self._rejecting = reject_request
        self._abort_running = True
        try:
            await self._drain_running()
        finally:
            self._abort_running = False
        queued, self._queue = self._queue, []
        for r in queued:
            if not r.future.done():
                r.future.set_result(_aborted_output(self.global_steps))
        return {"aborted_count": len(queued), "request_ids": [r.request_id for r in queued]}

    async def resume_generation(self) -> None:
        self._rejecting = False
        self._open("abort")

    async def wait_for_requests_to_drain(self) -> None:
        while self._queue:
            await asyncio.sleep(0.01)
        await self._drain_running()

    async def sleep(self) -> None:
        """HYBRID/COLOCATED with free_cache_engine: move the model off the accelerator for training."""
        if not self._offloads():
            return
        self._close("sleep")
        await self._drain_running()
        await asyncio.to_thread(self.engine.move, torch.device("cpu"))

    async def wake_up(self, tags: list[str] | None = None) -> None:
        if self._offloads() and "sleep" in self._closed_by:
            await asyncio.to_thread(self.engine.move, self.device)
        self._open("sleep")

    def _offloads(self) -> bool:
        return (self.config.free_cache_engine and self.device.type != "cpu"
                and self.rollout_mode != RolloutMode.STANDALONE)

    async def clear_kv_cache(self) -> None:
        """No-op: `generate` builds a fresh KV cache per batch, nothing outlives a batch."""

    async def release_kv_cache(self) -> None:
        """No-op: see clear_kv_cache."""

    async def resume_kv_cache(self) -> None:
        """No-op: see clear_kv_cache."""

    async def start_profile(self, **kwargs) -> None:
        """No-op: this backend has no engine profiler."""

    async def stop_profile(self) -> None:
        """No-op: this backend has no engine profiler."""


# --------------------------------------------------------------------------- replica
class HFReplica(RolloutReplica):
    """verl rollout replica backed by one `HFRolloutServer` (single device, any rollout TP).

    The HF model is not sharded: the server uses the accelerator of the replica's first worker
    (`rollout.tensor_model_parallel_size` only sets how many workers form a replica).
    """

    def _kind(self) -> str:
        return "reward_" if self.is_reward_model else "teacher_" if self.is_teacher_model else ""

    async def launch_servers(self):
        """Start the server on the first worker's node and accelerator and wait for its model."""
        from verl.utils.device import get_resource_name, get_visible_devices_keyword

        assert self.workers, "hf rollout: launch_servers needs the replica's workers (init_hybrid/colocated)"
        node_id, accelerator_ids = await self.workers[0].__ray_call__.remote(_node_and_accelerators,
                                                                           get_resource_name())
        visible = ",".join(str(a) for a in accelerator_ids[:1]) or None
        env = _server_env(visible, get_visible_devices_keyword())
        server = ray.remote(HFRolloutServer).options(
            name=server_actor_name(self.replica_rank, self._kind(), self.name_suffix),
            scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node_id=node_id,
                                                                                               soft=False),
            max_concurrency=self.max_concurrency,
            **({"runtime_env": {"env_vars": env}} if env else {}),
        ).remote(config=self.config, model_config=self.model_config, rollout_mode=self.rollout_mode,
                 replica_rank=self.replica_rank, visible_devices=visible)
        self.servers = [server]
        self._server_handle = server
        self._server_address = await server.get_server_address.remote()


def _node_and_accelerators(worker, resource_name: str) -> tuple[str, list[str]]:
    context = ray.get_runtime_context()
    return context.get_node_id(), list(context.get_accelerator_ids().get(resource_name, []))


def _server_env(visible: str | None, visible_keyword: str) -> dict[str, str]:
    """Env for the server process: see the worker's accelerator (Ray must not reset it), as vLLM's."""
    if not visible:
        return {}
    from verl.plugin.platform import get_platform

    env = {var: "1" for var in get_platform().ray_noset_envvars()}
    env[visible_keyword] = visible
    return env


# --------------------------------------------------------------------------- adapter
class HFServerAdapter(BaseRollout):
    """verl's in-worker rollout object for `rollout.name=hf`: forwards weight syncs to the server.

    Built by verl's `ActorRolloutRefWorker` (HYBRID) or `CheckpointEngineWorker`. The worker's
    global `RANK` gives the replica (`rank // rollout world size`) and the rollout rank within
    it; rollout rank 0 talks to the server, every rank drains the weight generator.
    """

    def __init__(self, config, model_config, device_mesh=None, replica_rank: int = -1, *args, **kwargs):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", "0"))
        world = (self.config.tensor_model_parallel_size * self.config.data_parallel_size
                 * self.config.pipeline_model_parallel_size)
        self.replica_rank = rank // world if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % world
        self.is_leader_rank = self.rollout_rank == 0
        self.server_handle = None
        self.bucket_bytes = max(1, int(self.config.checkpoint_engine.update_weights_bucket_megabytes)) << 20

    def _server(self):
        """The replica's server (looked up lazily: verl launches it after building the workers)."""
        if not self.is_leader_rank:
            return None
        if self.server_handle is None:
            self.server_handle = ray.get_actor(server_actor_name(self.replica_rank))
        return self.server_handle

    async def resume(self, tags: list[str]):
        if self.config.free_cache_engine and self._server() is not None:
            await self._server().wake_up.remote(tags=tags)

    async def release(self):
        if self.config.free_cache_engine and self._server() is not None:
            await self._server().sleep.remote()

    async def update_weights(self, weights, wire_format: str = "named_tensors", global_steps: int | None = None,
                             **kwargs) -> dict:
        """Drain `weights` on every rank; the leader sends them to the server in buckets.

        Returns {"tensors": n, "forwarded": bool} (n counted on every rank).
        """
        from verl.workers.rollout.utils import ensure_async_iterator

        if wire_format != "named_tensors":
            raise NotImplementedError(f"hf rollout takes full named tensors, not wire_format={wire_format!r}")
        if kwargs.get("peft_config") is not None:
            raise NotImplementedError("hf rollout loads merged weights only: set actor_rollout_ref.model.lora.merge")
        server = self._server()
        if server is not None:
            await server.begin_weight_update.remote()
        count, bucket, size = 0, [], 0
        try:
            async for name, tensor in ensure_async_iterator(weights):
                count += 1
                if server is None:
                    continue
                bucket.append((name, tensor.detach().to("cpu", copy=True)))
                size += tensor.numel() * tensor.element_size()
                if size >= self.bucket_bytes:
                    await server.load_weights.remote(bucket)
                    bucket, size = [], 0
            if server is not None and bucket:
                await server.load_weights.remote(bucket)
        finally:
            if server is not None:
                await server.finish_weight_update.remote(global_steps)
        return {"tensors": count, "forwarded": server is not None}

    def generate_sequences(self, prompts):
        raise NotImplementedError("hf rollout serves verl's async agent loop through its server handle")


__all__ = [
    "ADAPTER_FQN", "HFGenerationEngine", "HFReplica", "HFRolloutServer", "HFServerAdapter", "ROLLOUT_NAME",
    "SampledLogProbs", "SamplingSpec", "derived_seed", "parse_sampling", "register_hf_rollout", "server_actor_name",
]
