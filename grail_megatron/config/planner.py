"""Pre-flight planner: which TP/PP/DP(/VPP) layouts can work, and how much GPU memory they need.

verl 0.9.1 checks only a few of the rules a Megatron GRPO run must satisfy (world size vs the
actor's TP x PP, and the total batch vs DP x micro batch). Everything else fails minutes into a
run on the cluster, or silently does something else. This module checks those rules on a laptop:

* heads and KV heads divisible by TP (actor, reference, vLLM rollout);
* layers divisible by PP x VPP; VPP needs PP > 1 and a micro-batch count divisible by PP;
* world size divisible by TP x PP for the reference too (verl checks only the actor);
* train_batch_size divisible by ppo_mini_batch_size; mini-batch completions divisible by
  DP x micro batch; log-prob batches divisible by DP;
* actor and reference with different TP/PP in ONE process (verl's default ActorRolloutRef
  worker): verl's MegatronEngine reuses the process's parallel state, so the second engine
  silently runs with the first one's layout (verl's `_init_device_mesh` notes per-role
  parallelism as not yet supported). The grail_megatron trainer mode gives the reference its
  own processes, which lifts the rule;
* `use_dist_checkpointing` without `dist_checkpointing_path`;
* prompt + response longer than the model's positions;
* per-GPU memory of each phase (rollout, log-probs, training) under the 80 GB budget.

The memory model is documented (and compared with published runs) in docs/planner.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from grail_megatron.config.model_spec import ModelSpec

GIB = 1024**3

# Fixed per-process costs that no formula below covers: CUDA context, NCCL buffers, cuBLAS
# workspaces and allocator fragmentation (measured 2-4 GiB on H100 for Megatron ranks).
PROCESS_OVERHEAD_GIB = 3.0
# What a sleeping vLLM engine (verl's hybrid engine, free_cache_engine=True) keeps on the GPU.
VLLM_SLEEP_RESIDUAL_GIB = 1.0
# vLLM's profiling peak besides weights and KV cache: CUDA graphs, sampler, temp buffers.
VLLM_WORKSPACE_GIB = 1.5

ACTOR_KEY = "actor_rollout_ref.actor"
REF_KEY = "actor_rollout_ref.ref"
ROLLOUT_KEY = "actor_rollout_ref.rollout"

OFFLOAD_LEVELS = ("none", "optimizer", "param+grad+optimizer")


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClusterSpec:
    nnodes: int
    gpus_per_node: int
    gpu_memory_gib: float

    @property
    def world_size(self) -> int:
        return self.nnodes * self.gpus_per_node


@dataclass(frozen=True)
class BatchSpec:
    train_batch_size: int  # prompts per rollout step
    n: int  # completions per prompt
    ppo_mini_batch_size: int  # prompts per optimiser step
    micro_batch_per_gpu: int  # sequences per micro batch (training)
    log_prob_micro_batch_per_gpu: int  # sequences per micro batch (actor old log-probs)
    ref_log_prob_micro_batch_per_gpu: int
    max_prompt_length: int
    max_response_length: int
    use_dynamic_bsz: bool = False
    max_token_len_per_gpu: int = 16384

    @property
    def seq_len(self) -> int:
        return self.max_prompt_length + self.max_response_length

    @property
    def completions_per_step(self) -> int:
        return self.train_batch_size * self.n

    @property
    def completions_per_mini_batch(self) -> int:
        return self.ppo_mini_batch_size * self.n


@dataclass(frozen=True)
class TrainLayout:
    """Megatron layout of the actor or the reference."""

    tp: int
    pp: int
    vpp: int = 1  # 1 = no virtual pipeline
    distributed_optimizer: bool = True
    recompute: str = "full"  # "full" or "none" (selective core_attn costs nothing with flash attention)
    param_offload: bool = False
    optimizer_offload: bool = False

    def dp(self, world: int) -> int:
        return world // (self.tp * self.pp)

    @property
    def label(self) -> str:
        return f"TP{self.tp} PP{self.pp}" + (f" VPP{self.vpp}" if self.vpp > 1 else "")


@dataclass(frozen=True)
class RolloutLayout:
    tp: int
    gpu_memory_utilization: float
    max_num_batched_tokens: int = 8192


@dataclass(frozen=True)
class PlanInput:
    model: ModelSpec
    cluster: ClusterSpec
    batch: BatchSpec
    actor: TrainLayout
    ref: TrainLayout | None  # None: no reference policy (no KL)
    rollout: RolloutLayout
    ref_in_own_processes: bool = True  # grail_megatron trainer mode; False = verl's ActorRolloutRef
    use_dist_checkpointing: bool = False
    dist_checkpointing_path: str | None = None


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """A rule a layout breaks: the config key, what is wrong, and the fix."""

    key: str
    reason: str
    fix: str

    def __str__(self) -> str:
        return f"{self.key}: {self.reason} -> fix: {self.fix}"


@dataclass
class TrainMemory:
    """Per-GPU memory (GiB) of the busiest pipeline stage of a Megatron role."""

    weights: float
    grads: float
    optimizer: float  # as configured
    optimizer_with_dist_opt: float
    optimizer_without_dist_opt: float
    activations: float
    activations_without_recompute: float
    activations_with_full_recompute: float
    logits: float
    log_prob_transient: float

    @property
    def train_total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits


@dataclass
class RolloutMemory:
    weights: float
    workspace: float
    reserved: float  # gpu_memory_utilization x GPU memory
    kv_cache: float
    kv_tokens: int
    concurrent_sequences: int


@dataclass
class PhasePeaks:
    """Per-GPU peak of each phase for one offload choice (GiB)."""

    offload: str
    rollout: float
    actor_log_prob: float
    ref_log_prob: float
    train: float

    @property
    def peak(self) -> float:
        return max(self.rollout, self.actor_log_prob, self.ref_log_prob, self.train)


@dataclass
class LayoutVerdict:
    layout: TrainLayout
    dp: int
    problems: list[Problem] = field(default_factory=list)
    memory: TrainMemory | None = None
    phases: list["PhasePeaks"] = field(default_factory=list)  # whole-run peaks with this layout
    offload_needed: str | None = None  # least offload that fits; None: nothing fits

    @property
    def valid(self) -> bool:
        return not self.problems


@dataclass
class RolloutVerdict:
    layout: RolloutLayout
    replicas: int
    problems: list[Problem] = field(default_factory=list)
    memory: RolloutMemory | None = None

    @property
    def valid(self) -> bool:
        return not self.problems


@dataclass
class Plan:
    input: PlanInput
    actor: LayoutVerdict
    ref: LayoutVerdict | None
    rollout: RolloutVerdict
    phases: list[PhasePeaks]  # one per offload level, least offload first
    chosen_offload: str | None  # least offload that fits; None when nothing fits
    problems: list[Problem]  # everything that blocks a launch of the configured run

    @property
    def ok(self) -> bool:
        return not self.problems


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _join(values: list[int]) -> str:
    return ", ".join(str(v) for v in values) if values else "(none)"


def valid_tp_values(model: ModelSpec, cluster: ClusterSpec) -> list[int]:
    return [
        tp for tp in _divisors(cluster.gpus_per_node)
        if model.num_attention_heads % tp == 0 and model.num_key_value_heads % tp == 0
        and cluster.world_size % tp == 0
    ]


def valid_pp_values(model: ModelSpec, cluster: ClusterSpec, tp: int, vpp: int = 1) -> list[int]:
    return [
        pp for pp in _divisors(cluster.world_size // tp) if model.num_layers % (pp * vpp) == 0
        and (vpp == 1 or pp > 1)
    ]


def check_train_layout(model: ModelSpec, cluster: ClusterSpec, layout: TrainLayout, key: str) -> list[Problem]:
    """Structural rules for a Megatron role's TP/PP/VPP (no batch, no memory)."""
    problems: list[Problem] = []
    tp, pp, vpp = layout.tp, layout.pp, layout.vpp
    tp_key = f"{key}.megatron.tensor_model_parallel_size"
    pp_key = f"{key}.megatron.pipeline_model_parallel_size"
    vpp_key = f"{key}.megatron.virtual_pipeline_model_parallel_size"
    good_tp = valid_tp_values(model, cluster)
    if model.num_attention_heads % tp:
        problems.append(Problem(tp_key, f"num_attention_heads={model.num_attention_heads} is not divisible by TP={tp}",
                                f"use TP in {{{_join(good_tp)}}}"))
    if model.num_key_value_heads % tp:
        problems.append(Problem(tp_key, f"num_key_value_heads={model.num_key_value_heads} is not divisible by TP={tp} "
                                "(Megatron splits query groups across TP ranks)", f"use TP in {{{_join(good_tp)}}}"))
    if tp > cluster.gpus_per_node:
        problems.append(Problem(tp_key, f"TP={tp} spans nodes ({cluster.gpus_per_node} GPUs per node): tensor-parallel "
                                "all-reduces would cross the network", f"use TP in {{{_join(good_tp)}}} and raise PP"))
    if cluster.world_size % (tp * pp):
        ok = [p for p in _divisors(cluster.world_size) if cluster.world_size % (tp * p) == 0]
        problems.append(Problem(pp_key, f"world size {cluster.world_size} is not divisible by TP x PP = {tp}x{pp}",
                                f"with TP={tp} use PP in {{{_join(ok)}}}"))
    if model.num_layers % (pp * vpp):
        if vpp > 1:
            good_vpp = [v for v in range(2, model.num_layers // max(pp, 1) + 1) if model.num_layers % (pp * v) == 0]
            problems.append(Problem(vpp_key, f"num_layers={model.num_layers} is not divisible by PP x VPP = {pp}x{vpp}",
                                    f"with PP={pp} use VPP in {{{_join(good_vpp)}}} or null"))
        else:
            good_pp = valid_pp_values(model, cluster, tp) if cluster.world_size % tp == 0 else []
            problems.append(Problem(pp_key, f"num_layers={model.num_layers} is not divisible by PP={pp}",
                                    f"use PP in {{{_join(good_pp)}}}"))
    if vpp > 1 and pp == 1:
        problems.append(Problem(vpp_key, f"VPP={vpp} needs pipeline parallelism but PP=1", f"set {vpp_key}=null or PP>1"))
    return problems


def check_batches(inp: PlanInput, layout: TrainLayout, key: str, role: str) -> list[Problem]:
    """Batch divisibility that verl does not check (role: 'actor' or 'ref')."""
    b, world = inp.batch, inp.cluster.world_size
    if world % (layout.tp * layout.pp):
        return []  # reported by check_train_layout
    dp = layout.dp(world)
    problems: list[Problem] = []
    if b.completions_per_step % dp:
        problems.append(Problem("data.train_batch_size", f"train_batch_size x n = {b.completions_per_step} "
                                f"completions do not split over {role} DP={dp}",
                                f"make train_batch_size x n a multiple of {dp}"))
    if role != "actor" or b.use_dynamic_bsz:
        return problems
    if b.train_batch_size % b.ppo_mini_batch_size:
        multiples = [b.ppo_mini_batch_size * k for k in (1, 2, 4, 8)]
        problems.append(Problem(f"{ACTOR_KEY}.ppo_mini_batch_size",
                                f"data.train_batch_size={b.train_batch_size} is not divisible by "
                                f"ppo_mini_batch_size={b.ppo_mini_batch_size} (the last mini batch would be ragged)",
                                f"use ppo_mini_batch_size in {{{_join([d for d in _divisors(b.train_batch_size) if d <= b.ppo_mini_batch_size * 4][-6:])}}} "
                                f"or train_batch_size in {{{_join(multiples)}}}"))
    per_rank = b.completions_per_mini_batch / dp
    if b.completions_per_mini_batch % (dp * b.micro_batch_per_gpu):
        good = [m for m in _divisors(int(per_rank)) if m <= 32] if per_rank == int(per_rank) else []
        problems.append(Problem(f"{key}.ppo_micro_batch_size_per_gpu",
                                f"a mini batch of {b.ppo_mini_batch_size} prompts x n={b.n} = {b.completions_per_mini_batch} "
                                f"completions does not split into DP={dp} x micro batch {b.micro_batch_per_gpu}",
                                f"use ppo_micro_batch_size_per_gpu in {{{_join(good)}}}" if good else
                                f"make ppo_mini_batch_size x n a multiple of DP={dp}"))
    elif layout.vpp > 1:
        n_micro = b.completions_per_mini_batch // (dp * b.micro_batch_per_gpu)
        if n_micro % layout.pp:
            problems.append(Problem(f"{key}.megatron.virtual_pipeline_model_parallel_size",
                                    f"the interleaved (VPP) schedule needs the micro-batch count ({n_micro}) to be "
                                    f"divisible by PP={layout.pp}", "change the micro batch size or drop VPP"))
    return problems


def check_rollout(model: ModelSpec, cluster: ClusterSpec, layout: RolloutLayout) -> list[Problem]:
    problems: list[Problem] = []
    tp = layout.tp
    key = f"{ROLLOUT_KEY}.tensor_model_parallel_size"
    good = [t for t in _divisors(cluster.gpus_per_node) if model.num_attention_heads % t == 0
            and (model.num_key_value_heads % t == 0 or t % model.num_key_value_heads == 0)]
    if model.num_attention_heads % tp:
        problems.append(Problem(key, f"vLLM needs num_attention_heads={model.num_attention_heads} divisible by TP={tp}",
                                f"use rollout TP in {{{_join(good)}}}"))
    if model.num_key_value_heads % tp and tp % model.num_key_value_heads:
        problems.append(Problem(key, f"vLLM needs num_key_value_heads={model.num_key_value_heads} and TP={tp} to divide "
                                "one another", f"use rollout TP in {{{_join(good)}}}"))
    if cluster.world_size % tp or tp > cluster.gpus_per_node:
        problems.append(Problem(key, f"rollout TP={tp} must divide the {cluster.gpus_per_node} GPUs of a node",
                                f"use rollout TP in {{{_join(good)}}}"))
    if not 0.0 < layout.gpu_memory_utilization < 1.0:
        problems.append(Problem(f"{ROLLOUT_KEY}.gpu_memory_utilization",
                                f"{layout.gpu_memory_utilization} is outside (0, 1)", "use a value such as 0.5-0.7"))
    return problems


def check_global(inp: PlanInput) -> list[Problem]:
    problems: list[Problem] = []
    if inp.batch.seq_len > inp.model.max_position_embeddings:
        problems.append(Problem("data.max_response_length",
                                f"prompt + response = {inp.batch.seq_len} tokens exceed the model's "
                                f"max_position_embeddings={inp.model.max_position_embeddings}",
                                f"keep max_prompt_length + max_response_length <= {inp.model.max_position_embeddings}"))
    if inp.use_dist_checkpointing and not inp.dist_checkpointing_path:
        problems.append(Problem(f"{ACTOR_KEY}.megatron.dist_checkpointing_path",
                                "use_dist_checkpointing=true makes verl 0.9.1 load the initial weights from a Megatron "
                                "dist checkpoint, but no path is set",
                                "convert the HF model with `grail-megatron convert` and set the path, or set "
                                f"{ACTOR_KEY}.megatron.use_dist_checkpointing=false"))
    if inp.ref is not None and not inp.ref_in_own_processes and (inp.ref.tp, inp.ref.pp, inp.ref.vpp) != (
            inp.actor.tp, inp.actor.pp, inp.actor.vpp):
        problems.append(Problem(f"{REF_KEY}.megatron.tensor_model_parallel_size",
                                f"reference {inp.ref.label} differs from actor {inp.actor.label}, but verl's "
                                "ActorRolloutRef worker builds both in one process and its MegatronEngine reuses the "
                                "first engine's parallel state, so the reference would silently run at the wrong layout",
                                "use trainer.v1.trainer_mode=grail_megatron (reference in its own processes) or "
                                "give the reference the actor's TP/PP"))
    return problems


# --------------------------------------------------------------------------------------------
# Memory model (see docs/planner.md)
# --------------------------------------------------------------------------------------------
def stage_params(model: ModelSpec, tp: int, pp: int) -> int:
    """Parameters held by one GPU of the busiest pipeline stage."""
    per_layer = model.layer_params() / tp
    layers = model.num_layers / pp
    embedding = model.padded_vocab(tp) * model.hidden_size / tp
    first = layers * per_layer + embedding
    # The last stage holds the output layer; with tied embeddings and PP=1 it is the same tensor.
    output = 0 if (model.tie_word_embeddings and pp == 1) else embedding
    last = layers * per_layer + output + model.hidden_size
    return int(max(first, last) if pp > 1 else first + output + model.hidden_size)


def layer_activation_bytes(model: ModelSpec, tokens: int, tp: int) -> float:
    """bf16 tensors one layer keeps for backward per micro batch (flash attention, SwiGLU, SP)."""
    h, f = model.hidden_size, model.intermediate_size
    attention = 4 * h + 2 * model.kv_dim  # norm in, qkv in, q/k/v out, attention out
    mlp = 2 * h + 3 * f  # norm in, fc1 in, gate+up out, swiglu out
    return 2.0 * tokens * (attention + mlp) / tp


def logits_bytes(model: ModelSpec, tokens: int, tp: int, with_grad: bool) -> float:
    """Vocab-parallel logits: bf16 output + fp32 log-softmax (+ fp32 grad) (+ fp32 entropy)."""
    per_entry = 2 + 4 + (4 if with_grad else 4)  # training keeps the grad, log-prob passes the entropy
    return float(tokens) * model.padded_vocab(tp) / tp * per_entry


def train_memory(model: ModelSpec, cluster: ClusterSpec, batch: BatchSpec, layout: TrainLayout,
                 log_prob_micro: int) -> TrainMemory:
    world = cluster.world_size
    dp = max(1, layout.dp(world))
    params = stage_params(model, layout.tp, layout.pp)
    optimizer_full = 12.0 * params  # fp32 master copy + Adam m + v
    tokens = (batch.max_token_len_per_gpu if batch.use_dynamic_bsz
              else batch.micro_batch_per_gpu * batch.seq_len)
    per_layer = layer_activation_bytes(model, tokens, layout.tp)
    layers_per_stage = model.num_layers / layout.pp
    n_micro = max(1, batch.completions_per_mini_batch // max(1, dp * batch.micro_batch_per_gpu))
    in_flight = min(layout.pp, n_micro)
    if layout.vpp > 1:
        in_flight = layout.pp * (1 + (layout.pp - 1) / (layout.pp * layout.vpp))
    no_recompute = per_layer * layers_per_stage * in_flight
    # Full uniform recompute keeps each layer's input, plus one layer's tensors while recomputing.
    checkpoints = 2.0 * tokens * model.hidden_size / layout.tp * layers_per_stage * in_flight
    full_recompute = checkpoints + per_layer
    lp_tokens = (batch.max_token_len_per_gpu if batch.use_dynamic_bsz else log_prob_micro * batch.seq_len)
    log_prob = layer_activation_bytes(model, lp_tokens, layout.tp) + logits_bytes(model, lp_tokens, layout.tp, False)
    return TrainMemory(
        weights=2.0 * params / GIB,
        grads=4.0 * params / GIB,
        optimizer=(optimizer_full / dp if layout.distributed_optimizer else optimizer_full) / GIB,
        optimizer_with_dist_opt=optimizer_full / dp / GIB,
        optimizer_without_dist_opt=optimizer_full / GIB,
        activations=(full_recompute if layout.recompute == "full" else no_recompute) / GIB,
        activations_without_recompute=no_recompute / GIB,
        activations_with_full_recompute=full_recompute / GIB,
        logits=logits_bytes(model, tokens, layout.tp, True) / GIB,
        log_prob_transient=log_prob / GIB,
    )


def rollout_memory(model: ModelSpec, cluster: ClusterSpec, batch: BatchSpec, layout: RolloutLayout) -> RolloutMemory:
    tp = layout.tp
    weights = 2.0 * model.total_params() / tp
    h, f = model.hidden_size, model.intermediate_size
    workspace = VLLM_WORKSPACE_GIB * GIB + 2.0 * layout.max_num_batched_tokens * (2 * f + 4 * h) / tp
    reserved = layout.gpu_memory_utilization * cluster.gpu_memory_gib * GIB
    kv_cache = reserved - weights - workspace
    kv_heads_per_gpu = max(1, model.num_key_value_heads // tp)
    kv_per_token = 2 * model.num_layers * kv_heads_per_gpu * model.head_dim * 2  # K and V, bf16
    kv_tokens = int(max(0.0, kv_cache) // kv_per_token)
    return RolloutMemory(weights=weights / GIB, workspace=workspace / GIB, reserved=reserved / GIB,
                         kv_cache=kv_cache / GIB, kv_tokens=kv_tokens,
                         concurrent_sequences=kv_tokens // max(1, batch.seq_len))


def _offloaded(offload: str) -> tuple[bool, bool]:
    """(params+grads offloaded, optimizer offloaded) under an actor offload level."""
    return offload == "param+grad+optimizer", offload in ("optimizer", "param+grad+optimizer")


def phase_peaks(inp: PlanInput, actor: TrainMemory, ref: TrainMemory | None, rollout: RolloutMemory,
                offload: str) -> PhasePeaks:
    """Per-GPU peak of each phase. verl's engine context loads offloaded states only for the
    phase that needs them: eval (log-probs) loads the parameters, train loads parameters, grad
    buffers and the optimizer (verl/workers/engine/base.py BaseEngineCtx)."""
    processes = 2 if (inp.ref is not None and inp.ref_in_own_processes) else 1
    overhead = PROCESS_OVERHEAD_GIB + (processes - 1) * 1.0
    sleeping = VLLM_SLEEP_RESIDUAL_GIB + overhead
    params_off, optim_off = _offloaded(offload)
    grads = actor.grads
    actor_idle = (0.0 if params_off else actor.weights + grads) + (0.0 if optim_off else actor.optimizer)
    ref_idle = ref.weights if (ref is not None and inp.ref is not None and not inp.ref.param_offload) else 0.0
    actor_lp = actor.weights + (0.0 if params_off else grads) + (0.0 if optim_off else actor.optimizer)
    ref_lp = (ref.weights + ref.log_prob_transient + actor_idle + sleeping) if ref is not None else 0.0
    return PhasePeaks(
        offload=offload,
        rollout=actor_idle + ref_idle + rollout.reserved + overhead,
        actor_log_prob=actor_lp + actor.log_prob_transient + ref_idle + sleeping,
        ref_log_prob=ref_lp,
        train=actor.weights + grads + actor.optimizer + actor.activations + actor.logits + ref_idle + sleeping,
    )


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------
def judge_train_layout(inp: PlanInput, layout: TrainLayout, key: str, role: str) -> LayoutVerdict:
    problems = check_train_layout(inp.model, inp.cluster, layout, key)
    problems += check_batches(inp, layout, key, role)
    dp = layout.dp(inp.cluster.world_size) if inp.cluster.world_size % (layout.tp * layout.pp) == 0 else 0
    verdict = LayoutVerdict(layout=layout, dp=dp, problems=problems)
    if not problems:
        micro = inp.batch.log_prob_micro_batch_per_gpu if role == "actor" else inp.batch.ref_log_prob_micro_batch_per_gpu
        verdict.memory = train_memory(inp.model, inp.cluster, inp.batch, layout, micro)
    return verdict


def judge_rollout(inp: PlanInput, layout: RolloutLayout) -> RolloutVerdict:
    problems = check_rollout(inp.model, inp.cluster, layout)
    replicas = inp.cluster.world_size // layout.tp if inp.cluster.world_size % layout.tp == 0 else 0
    verdict = RolloutVerdict(layout=layout, replicas=replicas, problems=problems)
    if problems or inp.cluster.gpu_memory_gib <= 0:
        return verdict
    mem = rollout_memory(inp.model, inp.cluster, inp.batch, layout)
    verdict.memory = mem
    if mem.kv_cache <= 0:
        needed = (mem.weights + mem.workspace + 1.0) / inp.cluster.gpu_memory_gib
        verdict.problems.append(Problem(
            f"{ROLLOUT_KEY}.gpu_memory_utilization",
            f"no memory left for vLLM's KV cache: {layout.gpu_memory_utilization} x {inp.cluster.gpu_memory_gib:g} GiB = "
            f"{mem.reserved:.1f} GiB < weights {mem.weights:.1f} + workspace {mem.workspace:.1f} GiB "
            "(vLLM: 'No available memory for the cache blocks')",
            f"raise gpu_memory_utilization to >= {math.ceil(needed * 20) / 20:.2f} or raise rollout TP"))
    elif mem.concurrent_sequences < 1:
        verdict.problems.append(Problem(
            f"{ROLLOUT_KEY}.gpu_memory_utilization",
            f"the KV cache holds {mem.kv_tokens} tokens, less than one sequence of {inp.batch.seq_len}",
            "raise gpu_memory_utilization or rollout TP"))
    return verdict


def plan(inp: PlanInput, suggest: bool = True) -> Plan:
    """Judge the configured layouts, estimate memory per phase and pick the least offload that fits.

    `suggest`: when nothing fits, name the actor layouts that do (costs one plan per layout)."""
    actor = judge_train_layout(inp, inp.actor, ACTOR_KEY, "actor")
    ref = judge_train_layout(inp, inp.ref, REF_KEY, "ref") if inp.ref is not None else None
    rollout = judge_rollout(inp, inp.rollout)
    problems = check_global(inp) + actor.problems + (ref.problems if ref else []) + rollout.problems
    phases: list[PhasePeaks] = []
    chosen: str | None = None
    budget = inp.cluster.gpu_memory_gib
    if actor.memory and rollout.memory and (ref is None or ref.memory):
        for level in OFFLOAD_LEVELS:
            phases.append(phase_peaks(inp, actor.memory, ref.memory if ref else None, rollout.memory, level))
        fitting = [p for p in phases if p.peak <= budget]
        chosen = fitting[0].offload if fitting else None
        configured = configured_offload(inp.actor)
        configured_peak = next(p for p in phases if p.offload == configured)
        if configured_peak.peak > budget:
            fitting_layouts = fitting_actor_layouts(inp) if suggest and chosen is None else []
            problems.append(_memory_problem(inp, configured_peak, chosen, fitting_layouts, phases[-1]))
    return Plan(input=inp, actor=actor, ref=ref, rollout=rollout, phases=phases, chosen_offload=chosen,
                problems=problems)


def configured_offload(layout: TrainLayout) -> str:
    if layout.param_offload:
        return "param+grad+optimizer"
    return "optimizer" if layout.optimizer_offload else "none"


def _memory_problem(inp: PlanInput, peak: PhasePeaks, chosen: str | None, fitting: list["LayoutVerdict"],
                    most_offload: PhasePeaks) -> Problem:
    phase = max(("rollout", peak.rollout), ("actor log-prob", peak.actor_log_prob),
                ("reference log-prob", peak.ref_log_prob), ("training", peak.train), key=lambda kv: kv[1])
    budget = inp.cluster.gpu_memory_gib
    reason = f"estimated peak {peak.peak:.1f} GiB per GPU in the {phase[0]} phase exceeds {budget:g} GiB"
    if chosen == "optimizer":
        return Problem("memory", reason, f"set {ACTOR_KEY}.megatron.optimizer_offload=true")
    if chosen == "param+grad+optimizer":
        return Problem("memory", reason, f"set {ACTOR_KEY}.megatron.param_offload=true (also releases the grad "
                                         f"buffers) and {ACTOR_KEY}.megatron.optimizer_offload=true")
    if most_offload.train > budget:
        reason += f"; the training phase alone needs {most_offload.train:.1f} GiB even with full offload"
    return Problem("memory", reason, _layout_fix(inp, fitting, most_offload))


def _layout_fix(inp: PlanInput, fitting: list["LayoutVerdict"], most_offload: PhasePeaks) -> str:
    """Only what would fit: the actor layouts that do (with their offload), else more or bigger GPUs."""
    rollout_hint = (f"; or lower {ROLLOUT_KEY}.gpu_memory_utilization"
                    if most_offload.train <= inp.cluster.gpu_memory_gib else "")
    if not fitting:
        return (f"no actor TP x PP layout fits on {inp.cluster.world_size} GPU(s) of {inp.cluster.gpu_memory_gib:g} GiB: "
                f"use more GPUs (trainer.nnodes) or GPUs with more memory{rollout_hint}")
    names = ", ".join(f"{v.layout.label} ({v.offload_needed} offload)" for v in fitting[:3])
    return f"use an actor layout that fits: {names} ({ACTOR_KEY}.megatron.*){rollout_hint}"


def fitting_actor_layouts(inp: PlanInput) -> list["LayoutVerdict"]:
    """Valid actor layouts for which some offload level fits, best first."""
    return [v for v in enumerate_train_layouts(inp, "actor", suggest=False)
            if v.valid and v.phases and v.offload_needed not in (None, "n/a")]


def enumerate_train_layouts(inp: PlanInput, role: str = "actor", vpps: tuple[int, ...] = (1, 2),
                            suggest: bool = False) -> list[LayoutVerdict]:
    """Every TP x PP (x VPP) candidate for a role with TP inside a node and TP x PP dividing the
    world size; each valid one is costed inside the whole run (configured rollout and other
    role), then ranked (see rank_key)."""
    base = inp.actor if role == "actor" else (inp.ref or inp.actor)
    key = ACTOR_KEY if role == "actor" else REF_KEY
    verdicts = []
    for tp in _divisors(inp.cluster.gpus_per_node):
        for pp in _divisors(inp.cluster.world_size // tp) if inp.cluster.world_size % tp == 0 else []:
            if pp > inp.model.num_layers:
                continue
            for vpp in vpps:
                if vpp > 1 and pp == 1:
                    continue
                layout = replace(base, tp=tp, pp=pp, vpp=vpp)
                verdict = judge_train_layout(inp, layout, key, role)
                if verdict.valid:
                    trial = replace(inp, actor=layout) if role == "actor" else replace(inp, ref=layout)
                    whole = plan(trial, suggest=suggest)
                    verdict.phases = whole.phases
                    verdict.offload_needed = whole.chosen_offload if whole.phases else "n/a"
                verdicts.append(verdict)
    return sorted(verdicts, key=rank_key)


def rank_key(verdict: LayoutVerdict) -> tuple:
    """Valid first; then the least offload needed for the whole run to fit; then the smallest
    model-parallel group (least communication, most DP), fewer pipeline stages (smaller
    bubble), no VPP; then the lower peak memory."""
    if not verdict.valid:
        return (1, 0, 0, 0, 0, 0.0)
    levels = {level: i for i, level in enumerate(OFFLOAD_LEVELS)}
    fit = levels.get(verdict.offload_needed, len(OFFLOAD_LEVELS)) if verdict.phases else 0
    chosen = [p.peak for p in verdict.phases if p.offload == verdict.offload_needed]
    peak = chosen[0] if chosen else min((p.peak for p in verdict.phases), default=0.0)
    lay = verdict.layout
    return (0, fit, lay.tp * lay.pp, lay.pp, lay.vpp, peak)


def enumerate_rollout_layouts(inp: PlanInput) -> list[RolloutVerdict]:
    verdicts = [judge_rollout(inp, replace(inp.rollout, tp=tp)) for tp in _divisors(inp.cluster.gpus_per_node)]
    return sorted(verdicts, key=lambda v: (not v.valid, -(v.memory.concurrent_sequences if v.memory else 0)))


# --------------------------------------------------------------------------------------------
# From a composed config
# --------------------------------------------------------------------------------------------
def _layout_from(node: Any, recompute: str) -> TrainLayout:
    megatron = node.megatron
    return TrainLayout(
        tp=int(megatron.tensor_model_parallel_size),
        pp=int(megatron.pipeline_model_parallel_size),
        vpp=int(megatron.get("virtual_pipeline_model_parallel_size") or 1),
        distributed_optimizer=bool(megatron.get("use_distributed_optimizer", True)),
        recompute=recompute,
        param_offload=bool(megatron.get("param_offload", False)),
        optimizer_offload=bool(megatron.get("optimizer_offload", False)),
    )


def needs_reference_policy(cfg: Any) -> bool:
    """verl's `need_reference_policy` (KL in the reward or as a loss), without importing verl."""
    return bool(cfg.algorithm.get("use_kl_in_reward", False) or cfg.actor_rollout_ref.actor.use_kl_loss)


def plan_input_from_config(cfg: Any, model: ModelSpec | None = None, cluster: ClusterSpec | None = None) -> PlanInput:
    """Build the planner's input from a composed grail/verl config (checked by config.rules first)."""
    arr = cfg.actor_rollout_ref
    model = model or ModelSpec.from_mapping(cfg.grail.model)
    cluster = cluster or ClusterSpec(nnodes=int(cfg.trainer.nnodes), gpus_per_node=int(cfg.trainer.n_gpus_per_node),
                                     gpu_memory_gib=float(cfg.grail.cluster.gpu_memory_gb))
    tcfg = arr.actor.megatron.get("override_transformer_config") or {}
    recompute = "full" if tcfg.get("recompute_granularity") == "full" else "none"
    ref_micro = arr.ref.get("log_prob_micro_batch_size_per_gpu") or arr.rollout.log_prob_micro_batch_size_per_gpu or 1
    batch = BatchSpec(
        train_batch_size=int(cfg.data.train_batch_size),
        n=int(arr.rollout.n),
        ppo_mini_batch_size=int(arr.actor.ppo_mini_batch_size),
        micro_batch_per_gpu=int(arr.actor.ppo_micro_batch_size_per_gpu or 1),
        log_prob_micro_batch_per_gpu=int(arr.rollout.log_prob_micro_batch_size_per_gpu or 1),
        ref_log_prob_micro_batch_per_gpu=int(ref_micro),
        max_prompt_length=int(cfg.data.max_prompt_length),
        max_response_length=int(cfg.data.max_response_length),
        use_dynamic_bsz=bool(arr.actor.use_dynamic_bsz),
        max_token_len_per_gpu=int(arr.actor.ppo_max_token_len_per_gpu),
    )
    use_ref = needs_reference_policy(cfg)
    return PlanInput(
        model=model,
        cluster=cluster,
        batch=batch,
        actor=_layout_from(arr.actor, recompute),
        ref=replace(_layout_from(arr.ref, "none"), distributed_optimizer=False) if use_ref else None,
        rollout=RolloutLayout(tp=int(arr.rollout.tensor_model_parallel_size),
                              gpu_memory_utilization=float(arr.rollout.gpu_memory_utilization),
                              max_num_batched_tokens=int(arr.rollout.get("max_num_batched_tokens") or 8192)),
        ref_in_own_processes=str(cfg.trainer.v1.trainer_mode) == "grail_megatron",
        use_dist_checkpointing=bool(arr.actor.megatron.use_dist_checkpointing),
        dist_checkpointing_path=arr.actor.megatron.get("dist_checkpointing_path"),
    )
