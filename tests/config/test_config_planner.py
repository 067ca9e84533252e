"""The planner: rules verl does not check, the memory model, the CLI."""

from __future__ import annotations

import json

import pytest

from grail_megatron.config import compose
from grail_megatron.config.model_spec import ModelSpec
from grail_megatron.config.planner import (GIB, ClusterSpec, TrainLayout, enumerate_rollout_layouts,
                                           enumerate_train_layouts, plan, plan_input_from_config, stage_params,
                                           train_memory)

pytestmark = pytest.mark.filterwarnings("ignore")

# verl's upstream 7B reference run (examples/grpo_trainer/run_qwen2-7b_math_megatron.sh):
# Qwen2-7B-Instruct, actor and ref TP2 PP2, 8 GPUs, train/mini/micro 1024/256/4, n=5, rollout TP2
# at gpu_memory_utilization 0.6, no recompute, KL loss, verl's default trainer (ref inside the actor).
UPSTREAM_7B = [
    "model_preset=qwen2-7b-instruct", "data.train_batch_size=1024", "actor_rollout_ref.actor.ppo_mini_batch_size=256",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4", "actor_rollout_ref.rollout.n=5",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4", "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.rollout.gpu_memory_utilization=0.6", "actor_rollout_ref.rollout.tensor_model_parallel_size=2",
    "actor_rollout_ref.actor.megatron.override_transformer_config.recompute_granularity=null",
    "actor_rollout_ref.actor.megatron.use_dist_checkpointing=false", "trainer.v1.trainer_mode=sync",
]


def _plan(overrides=(), config_name="grpo_grail"):
    return plan(plan_input_from_config(compose(list(overrides), config_name)))


def _reasons(result):
    return [f"{p.key}: {p.reason}" for p in result.problems]


@pytest.mark.parametrize("preset,billions", [("qwen2.5-1.5b-instruct", 1.5437), ("qwen2.5-7b-instruct", 7.6156),
                                             ("qwen2.5-14b-instruct", 14.7700), ("qwen2-7b-instruct", 7.6156)])
def test_parameter_counts_match_the_published_sizes(preset, billions):
    spec = ModelSpec.from_mapping(compose([f"model_preset={preset}"]).grail.model)
    assert spec.total_params() / 1e9 == pytest.approx(billions, abs=5e-4)


def test_upstream_reference_run_is_valid():
    result = _plan(UPSTREAM_7B, "grpo_grail_kl")
    assert result.ok, _reasons(result)
    assert (result.actor.dp, result.ref.dp, result.rollout.replicas) == (2, 2, 4)
    assert result.input.ref_in_own_processes is False
    assert result.chosen_offload == "none"
    none = result.phases[0]
    assert 70.0 < none.peak < 80.0  # it ran on 8 x 80 GB without offload, with little headroom


def test_megatron_bytes_per_parameter():
    """Megatron's documented budget: 18 bytes/param (bf16 params, fp32 grads + Adam), 6 + 12/DP distributed."""
    model = ModelSpec.from_mapping(compose([]).grail.model)
    cluster = ClusterSpec(1, 8, 80)
    inp = plan_input_from_config(compose([]))
    layout = TrainLayout(tp=2, pp=2)
    params = stage_params(model, 2, 2)
    mem = train_memory(model, cluster, inp.batch, layout, 8)
    per_param = lambda gib: gib * GIB / params  # noqa: E731
    assert per_param(mem.weights + mem.grads + mem.optimizer_without_dist_opt) == pytest.approx(18.0)
    assert per_param(mem.weights + mem.grads + mem.optimizer_with_dist_opt) == pytest.approx(6 + 12 / 2)
    assert mem.activations_with_full_recompute < mem.activations_without_recompute / 5


def test_stage_params_sum_to_the_model():
    model = ModelSpec.from_mapping(compose(["model_preset=qwen2.5-14b-instruct"]).grail.model)
    # TP1 PP1 holds everything (vocab padded to a multiple of 128)
    assert stage_params(model, 1, 1) == model.total_params() + (model.padded_vocab(1) - model.vocab_size) * 2 * model.hidden_size
    # the first stage of PP2 holds half the layers plus the embedding
    assert stage_params(model, 1, 2) == pytest.approx(24 * model.layer_params() + model.padded_vocab(1) * 5120 + 5120, rel=1e-6)


@pytest.mark.parametrize("overrides,key,reason,fix", [
    (["actor_rollout_ref.actor.megatron.tensor_model_parallel_size=8", "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=1"],
     "actor_rollout_ref.actor.megatron.tensor_model_parallel_size", "num_attention_heads=28 is not divisible by TP=8",
     "use TP in {1, 2, 4}"),
    (["actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=8", "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=1"],
     "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size", "num_layers=28 is not divisible by PP=8",
     "use PP in {1, 2, 4}"),
    (["actor_rollout_ref.actor.megatron.virtual_pipeline_model_parallel_size=4"],
     "actor_rollout_ref.actor.megatron.virtual_pipeline_model_parallel_size",
     "num_layers=28 is not divisible by PP x VPP = 2x4", "with PP=2 use VPP in {2, 7, 14} or null"),
    (["data.train_batch_size=48"], "actor_rollout_ref.actor.ppo_mini_batch_size",
     "data.train_batch_size=48 is not divisible by ppo_mini_batch_size=32", "train_batch_size in {32, 64, 128, 256}"),
    (["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3"], "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
     "512 completions does not split into DP=2 x micro batch 3", "use ppo_micro_batch_size_per_gpu in {1, 2, 4, 8, 16, 32}"),
    (["actor_rollout_ref.rollout.tensor_model_parallel_size=8"], "actor_rollout_ref.rollout.tensor_model_parallel_size",
     "vLLM needs num_attention_heads=28 divisible by TP=8", "use rollout TP in {1, 2, 4}"),
    (["actor_rollout_ref.rollout.gpu_memory_utilization=0.1", "actor_rollout_ref.rollout.tensor_model_parallel_size=1"],
     "actor_rollout_ref.rollout.gpu_memory_utilization", "'No available memory for the cache blocks'",
     "raise gpu_memory_utilization to >= 0.25"),
    (["data.max_prompt_length=30000", "data.max_response_length=4096"], "data.max_response_length",
     "34096 tokens exceed the model's max_position_embeddings=32768", "<= 32768"),
    (["actor_rollout_ref.actor.megatron.dist_checkpointing_path=null"], "actor_rollout_ref.actor.megatron.dist_checkpointing_path",
     "no path is set", "use_dist_checkpointing=false"),
])
def test_known_bad_layouts_are_rejected_with_the_reason_and_fix(overrides, key, reason, fix):
    result = _plan(overrides)
    assert not result.ok
    matching = [p for p in result.problems if p.key == key and reason in p.reason]
    assert matching, _reasons(result)
    assert fix in matching[0].fix


def test_reference_layout_differing_from_the_actor_inside_one_process_is_rejected():
    overrides = ["trainer.v1.trainer_mode=sync", "actor_rollout_ref.ref.megatron.tensor_model_parallel_size=4",
                 "actor_rollout_ref.ref.megatron.pipeline_model_parallel_size=1"]
    result = _plan(overrides, "grpo_grail_kl")
    [problem] = [p for p in result.problems if p.key == "actor_rollout_ref.ref.megatron.tensor_model_parallel_size"]
    assert "reference TP4 PP1 differs from actor TP2 PP2" in problem.reason
    assert "trainer.v1.trainer_mode=grail_megatron" in problem.fix
    # the grail_megatron mode gives the reference its own processes: the same layouts are fine
    assert _plan(overrides[1:], "grpo_grail_kl").ok


def test_reference_data_parallel_must_split_the_batch():
    result = _plan(["data.train_batch_size=1", "actor_rollout_ref.actor.ppo_mini_batch_size=1",
                    "actor_rollout_ref.rollout.n=1", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
                    "actor_rollout_ref.ref.megatron.tensor_model_parallel_size=1",
                    "actor_rollout_ref.ref.megatron.pipeline_model_parallel_size=1"], "grpo_grail_kl")
    assert any("completions do not split over ref DP=8" in p.reason for p in result.problems)


def test_memory_over_budget_names_the_phase_and_the_offload_fix():
    result = _plan(["model_preset=qwen2.5-14b-instruct", "actor_rollout_ref.actor.megatron.optimizer_offload=false"],
                   "grpo_grail_kl")
    [problem] = [p for p in result.problems if p.key == "memory"]
    assert "in the rollout phase exceeds 80 GiB" in problem.reason
    assert problem.fix == "set actor_rollout_ref.actor.megatron.optimizer_offload=true"
    assert result.chosen_offload == "optimizer"
    assert [p.offload for p in result.phases] == ["none", "optimizer", "param+grad+optimizer"]
    assert result.phases[0].peak > result.phases[1].peak > result.phases[2].peak


def test_layout_enumeration_ranks_valid_layouts_and_explains_rejections():
    inp = plan_input_from_config(compose([]))
    verdicts = enumerate_train_layouts(inp, "actor")
    valid = [v for v in verdicts if v.valid]
    rejected = [v for v in verdicts if not v.valid]
    assert verdicts[: len(valid)] == valid  # valid first
    assert all(v.problems for v in rejected)
    labels = {v.layout.label: v for v in verdicts}
    assert labels["TP2 PP2"].valid and labels["TP4 PP1"].valid
    assert "num_attention_heads=28 is not divisible by TP=8" in labels["TP8 PP1"].problems[0].reason
    assert "num_layers=28 is not divisible by PP x VPP = 4x2" in labels["TP1 PP4 VPP2"].problems[0].reason
    # a layout whose whole run fits without offload ranks above one that needs offload
    fit_order = [v.offload_needed for v in valid]
    assert fit_order.index("none") < len(fit_order) and fit_order == sorted(
        fit_order, key=lambda o: ["none", "optimizer", "param+grad+optimizer", None].index(o))
    rollouts = enumerate_rollout_layouts(inp)
    assert [v.layout.tp for v in rollouts if v.valid] == [4, 2, 1]


def test_model_from_an_hf_config_file(tmp_path):
    config = {"model_type": "qwen2", "num_hidden_layers": 28, "hidden_size": 3584, "num_attention_heads": 28,
              "num_key_value_heads": 4, "vocab_size": 152064, "intermediate_size": 18944,
              "tie_word_embeddings": False, "max_position_embeddings": 32768}
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = ModelSpec.from_hf_config(tmp_path)
    assert spec.total_params() == ModelSpec.from_mapping(compose([]).grail.model).total_params()
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="bad.json: HF config lacks 'num_hidden_layers'"):
        ModelSpec.from_hf_config(tmp_path / "bad.json")


def test_plan_cli(capsys, tmp_path):
    from grail_megatron.cli import plan as plan_cli

    assert plan_cli.main(["--kl"]) == 0
    out = capsys.readouterr().out
    assert "== actor:" in out and "== reference:" in out and "== rollout (vLLM) layouts ==" in out
    assert "RESULT: the configured run passes every check." in out
    assert plan_cli.main(["--model", "qwen2.5-14b-instruct", "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=3"]) == 1
    out = capsys.readouterr().out
    assert "num_key_value_heads=8 is not divisible by TP=3" in out and "fix: use TP in {1, 2, 4, 8}" in out
    assert plan_cli.main(["--json", "--nnodes", "2", "--gpu-memory-gb", "40"]) in (0, 1)
    summary = json.loads(capsys.readouterr().out)
    assert summary["actor"]["layout"] == "TP2 PP2" and summary["actor"]["dp"] == 4
    assert plan_cli.main(["--model", "qwen3-7b"]) == 2
    assert "allowed values for model_preset" in capsys.readouterr().err
