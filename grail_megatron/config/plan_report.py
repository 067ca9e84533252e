"""Text rendering of a planner result (tables a human reads before renting 8 GPUs)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from grail_megatron.config.planner import LayoutVerdict, Plan, PlanInput, RolloutVerdict


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A fixed-width text table (no wrapping, so logs and tests can grep it)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _g(value: float) -> str:
    return f"{value:.1f}"


def describe_input(inp: PlanInput) -> str:
    m, c, b = inp.model, inp.cluster, inp.batch
    return "\n".join([
        f"model    {m.name}: {m.total_params() / 1e9:.2f}B params, {m.num_layers} layers, hidden {m.hidden_size}, "
        f"{m.num_attention_heads} heads / {m.num_key_value_heads} KV heads, vocab {m.vocab_size}, "
        f"ffn {m.intermediate_size}, tied embeddings {m.tie_word_embeddings}",
        f"cluster  {c.nnodes} node(s) x {c.gpus_per_node} GPUs = {c.world_size}, {c.gpu_memory_gib:g} GiB per GPU",
        f"batch    {b.train_batch_size} prompts x n={b.n} = {b.completions_per_step} completions per step; mini batch "
        f"{b.ppo_mini_batch_size} prompts ({b.completions_per_mini_batch} completions); micro {b.micro_batch_per_gpu}/GPU; "
        f"log-prob micro {b.log_prob_micro_batch_per_gpu} (ref {b.ref_log_prob_micro_batch_per_gpu}); "
        f"sequence {b.max_prompt_length}+{b.max_response_length} tokens"
        + (f"; dynamic batch {b.max_token_len_per_gpu} tokens/GPU" if b.use_dynamic_bsz else ""),
    ])


def configured_section(plan: Plan) -> str:
    inp = plan.input
    parts = ["== configured run =="]
    rows = [["actor", inp.actor.label, plan.actor.dp, "ok" if plan.actor.valid else "REJECTED"]]
    if plan.ref is not None:
        where = "own processes" if inp.ref_in_own_processes else "inside the actor process"
        rows.append(["reference", f"{inp.ref.label} ({where})", plan.ref.dp, "ok" if plan.ref.valid else "REJECTED"])
    rows.append(["rollout (vLLM)", f"TP{inp.rollout.tp} x {plan.rollout.replicas} replicas, "
                 f"gpu_memory_utilization {inp.rollout.gpu_memory_utilization}", "-",
                 "ok" if plan.rollout.valid else "REJECTED"])
    parts.append(table(["role", "layout", "DP", "verdict"], rows))
    if plan.actor.memory is not None:
        parts.append("")
        parts.append(memory_breakdown(plan))
    if plan.phases:
        parts.append("")
        parts.append(table(
            ["offload", "rollout", "actor log-prob", "ref log-prob", "train", "peak", "fits"],
            [[p.offload, _g(p.rollout), _g(p.actor_log_prob), _g(p.ref_log_prob) if plan.ref else "-", _g(p.train),
              _g(p.peak), "yes" if p.peak <= inp.cluster.gpu_memory_gib else "NO"] for p in plan.phases]))
        parts.append("configured actor offload: " + _configured(plan) + "; least offload that fits: "
                     + (plan.chosen_offload or "none of them (see fixes)"))
    return "\n".join(parts)


def _configured(plan: Plan) -> str:
    from grail_megatron.config.planner import configured_offload

    return configured_offload(plan.input.actor)


def memory_breakdown(plan: Plan) -> str:
    a = plan.actor.memory
    rows = [
        ["actor weights (bf16)", _g(a.weights)],
        ["actor grads (fp32 main grads)", _g(a.grads)],
        ["actor optimizer (fp32 master + Adam m, v), as configured", _g(a.optimizer)],
        ["actor optimizer with distributed optimizer (sharded over DP)", _g(a.optimizer_with_dist_opt)],
        ["actor optimizer without distributed optimizer", _g(a.optimizer_without_dist_opt)],
        ["actor activations, configured recompute=" + plan.input.actor.recompute, _g(a.activations)],
        ["actor activations without recompute", _g(a.activations_without_recompute)],
        ["actor activations with full recompute", _g(a.activations_with_full_recompute)],
        ["actor logits (last stage, one micro batch)", _g(a.logits)],
        ["log-prob pass transient (one micro batch)", _g(a.log_prob_transient)],
    ]
    if plan.ref is not None and plan.ref.memory is not None:
        rows.append(["reference weights (bf16, forward only)", _g(plan.ref.memory.weights)])
        rows.append(["reference log-prob transient", _g(plan.ref.memory.log_prob_transient)])
    r = plan.rollout.memory
    if r is not None:
        rows += [
            ["vLLM reserved (gpu_memory_utilization x GPU)", _g(r.reserved)],
            ["  of which rollout weights", _g(r.weights)],
            ["  of which workspace (graphs, activations)", _g(r.workspace)],
            ["  of which KV cache", f"{_g(r.kv_cache)} ({r.kv_tokens} tokens, {r.concurrent_sequences} sequences)"],
        ]
    return table(["memory per GPU (GiB)", "GiB"], rows)


def _run_peak(v: LayoutVerdict) -> float:
    """Peak of the whole run at the least offload that fits (the smallest peak if none fits)."""
    chosen = [p for p in v.phases if p.offload == v.offload_needed]
    return chosen[0].peak if chosen else min(p.peak for p in v.phases)


def _fit_text(v: LayoutVerdict) -> str:
    if not v.phases:
        return "n/a"
    return f"offload {v.offload_needed}" if v.offload_needed else "NO"


def layouts_section(title: str, verdicts: Sequence[LayoutVerdict], role: str, top: int) -> str:
    valid = [v for v in verdicts if v.valid]
    rejected = [v for v in verdicts if not v.valid]
    rows = []
    for rank, v in enumerate(valid[:top], 1):
        m = v.memory
        peak = _g(_run_peak(v)) if v.phases else "-"
        if role == "actor":
            rows.append([rank, v.layout.label, v.dp, _g(m.weights), _g(m.grads),
                         f"{_g(m.optimizer_with_dist_opt)}/{_g(m.optimizer_without_dist_opt)}",
                         f"{_g(m.activations_with_full_recompute)}/{_g(m.activations_without_recompute)}",
                         _g(m.logits), _g(m.train_total), peak, _fit_text(v)])
        else:
            rows.append([rank, v.layout.label, v.dp, _g(m.weights), _g(m.log_prob_transient), peak, _fit_text(v)])
    if role == "actor":
        headers = ["#", "layout", "DP", "weights", "grads", "optim dist/plain", "act recompute/none", "logits",
                   "train", "run peak", "fits"]
    else:
        headers = ["#", "layout", "DP", "weights", "log-prob transient", "run peak", "fits"]
    out = [f"== {title}: {len(valid)} valid layouts (GiB per GPU; run peak = whole run with the least offload) ==",
           table(headers, rows) if rows else "(none)"]
    if len(valid) > top:
        out.append(f"({len(valid) - top} more valid layouts not shown; use --top)")
    if rejected:
        out.append(f"-- {title}: {len(rejected)} rejected layouts --")
        out.append(table(["layout", "reason"], [[v.layout.label, "; ".join(p.reason for p in v.problems)]
                                                for v in rejected]))
    return "\n".join(out)


def rollout_section(verdicts: Sequence[RolloutVerdict]) -> str:
    rows = []
    for v in verdicts:
        m = v.memory
        rows.append([f"TP{v.layout.tp}", v.replicas, _g(m.weights) if m else "-", _g(m.kv_cache) if m else "-",
                     m.concurrent_sequences if m else "-",
                     "ok" if v.valid else "; ".join(p.reason for p in v.problems)])
    return "\n".join(["== rollout (vLLM) layouts ==",
                      table(["layout", "replicas", "weights", "KV cache", "sequences in flight", "verdict"], rows)])


def problems_section(plan: Plan) -> str:
    if plan.ok:
        return "RESULT: the configured run passes every check."
    lines = [f"RESULT: {len(plan.problems)} problem(s) block this run:"]
    for p in plan.problems:
        lines.append(f"  - {p.key}: {p.reason}")
        lines.append(f"      fix: {p.fix}")
    return "\n".join(lines)


def plan_to_dict(plan: Plan) -> dict:
    """JSON-ready summary (for scripts and the train command)."""
    return {
        "ok": plan.ok,
        "chosen_offload": plan.chosen_offload,
        "problems": [asdict(p) for p in plan.problems],
        "actor": {"layout": plan.input.actor.label, "dp": plan.actor.dp,
                  "memory_gib": asdict(plan.actor.memory) if plan.actor.memory else None},
        "ref": None if plan.ref is None else {"layout": plan.input.ref.label, "dp": plan.ref.dp},
        "rollout": {"tp": plan.input.rollout.tp, "replicas": plan.rollout.replicas,
                    "memory_gib": asdict(plan.rollout.memory) if plan.rollout.memory else None},
        "phases_gib": [asdict(p) | {"peak": p.peak} for p in plan.phases],
    }
