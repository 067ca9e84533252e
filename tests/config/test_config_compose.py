"""Composition of configs/ on verl 0.9.1's installed config tree, verl's validator, bad input."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from grail_megatron.config import ConfigError, compose, config_names, preset_options

pytestmark = pytest.mark.filterwarnings("ignore")

MODELS = ["qwen2.5-1.5b-instruct", "qwen2.5-7b-instruct", "qwen2.5-14b-instruct", "qwen2-7b-instruct", "tiny"]


def _verl_validate(cfg):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    return need_reference_policy(cfg), need_critic(cfg)


def _our_plan(cfg):
    from grail_megatron.config.planner import plan, plan_input_from_config

    return plan(plan_input_from_config(cfg))


def test_shipped_presets_are_the_documented_ones():
    assert config_names() == ["grpo_grail", "grpo_grail_kl"]
    assert preset_options("model_preset") == sorted(MODELS)
    assert preset_options("dataset") == ["gsm8k", "math", "mbpp"]
    assert preset_options("cluster") == ["1x8", "cpu", "nx8"]
    assert preset_options("kl") == ["low_var_kl", "off"]


@pytest.mark.parametrize("config_name", ["grpo_grail", "grpo_grail_kl"])
@pytest.mark.parametrize("model", MODELS)
def test_every_model_preset_passes_verl_and_our_checks(model, config_name):
    cluster = "cpu" if model == "tiny" else "1x8"
    cfg = compose([f"model_preset={model}", f"cluster={cluster}"], config_name)
    use_ref, use_critic = _verl_validate(cfg)
    assert (use_ref, use_critic) == (config_name == "grpo_grail_kl", False)
    result = _our_plan(cfg)
    assert result.ok, [str(p) for p in result.problems]
    if cluster != "cpu":
        assert result.chosen_offload is not None  # fits 8 x 80 GiB with the preset's offload flags


@pytest.mark.parametrize("dataset,cluster", [("gsm8k", "1x8"), ("math", "nx8"), ("mbpp", "nx8")])
def test_dataset_and_cluster_presets(dataset, cluster, monkeypatch):
    monkeypatch.setenv("GRAIL_DATA_ROOT", "/data/grail")
    monkeypatch.setenv("GRAIL_NNODES", "4")
    cfg = compose([f"dataset={dataset}", f"cluster={cluster}"])
    _verl_validate(cfg)
    assert _our_plan(cfg).ok
    assert cfg.data.train_files == f"/data/grail/{dataset}/train.parquet"
    assert cfg.data.val_files == f"/data/grail/{dataset}/val.parquet"
    assert (cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node) == ((1 if cluster == "1x8" else 4), 8)
    assert cfg.trainer.experiment_name == f"qwen2.5-7b-instruct-{dataset}"


def test_grail_recipe_values():
    cfg = compose()
    arr = cfg.actor_rollout_ref
    assert cfg.actor_rollout_ref.actor.strategy == "megatron"  # model_engine=megatron from verl's tree
    assert cfg.algorithm.adv_estimator == "grpo"
    assert arr.rollout.n == 16
    assert (arr.actor.clip_ratio_low, arr.actor.clip_ratio_high) == (0.2, 0.28)
    assert arr.actor.loss_agg_mode == "token-mean"
    assert arr.actor.optim.lr == pytest.approx(3e-6)
    assert (arr.actor.optim.lr_warmup_steps, arr.actor.optim.lr_decay_style) == (20, "constant")
    assert cfg.trainer.total_training_steps == 400
    assert (arr.actor.use_kl_loss, cfg.algorithm.use_kl_in_reward) == (False, False)
    assert (arr.rollout.temperature, arr.rollout.top_p, arr.rollout.top_k) == (0.7, 0.95, 50)
    assert (cfg.data.max_prompt_length, cfg.data.max_response_length) == (1024, 1024)
    assert arr.rollout.name == "vllm"
    assert arr.actor.megatron.use_dist_checkpointing is True
    assert cfg.trainer.v1.trainer_mode == "grail_megatron"
    assert cfg.reward.custom_reward_function.path == "pkg://grail_megatron.rewards.verl_reward"
    assert cfg.ray_kwargs.ray_init.runtime_env.worker_process_setup_hook == "grail_megatron.workers.setup_worker_process"
    # verl's own defaults are inherited, not copied: a key we never set keeps verl's value
    assert arr.actor.megatron.seed == 42 and arr.rollout.max_num_batched_tokens == 8192


def test_kl_variant_and_reference_layout():
    cfg = compose(["model_preset=qwen2.5-14b-instruct"], "grpo_grail_kl")
    arr = cfg.actor_rollout_ref
    assert (arr.actor.use_kl_loss, arr.actor.kl_loss_type, arr.actor.kl_loss_coef) == (True, "low_var_kl", 0.001)
    assert compose(["kl=low_var_kl"]).actor_rollout_ref.actor.use_kl_loss is True
    assert (arr.ref.megatron.tensor_model_parallel_size, arr.ref.megatron.pipeline_model_parallel_size) == (4, 2)
    assert arr.ref.megatron.param_offload is True and arr.actor.megatron.optimizer_offload is True
    other = compose(["actor_rollout_ref.ref.megatron.tensor_model_parallel_size=2"], "grpo_grail_kl")
    assert other.actor_rollout_ref.ref.megatron.tensor_model_parallel_size == 2
    assert other.actor_rollout_ref.actor.megatron.tensor_model_parallel_size == 2  # the actor keeps its own


def test_reward_path_loads_the_way_verl_loads_it():
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.utils.import_utils import load_extern_object

    import grail_megatron.rewards.verl_reward as verl_reward

    cfg = compose(["dataset=gsm8k"])
    fn = load_extern_object(cfg.reward.custom_reward_function.path, cfg.reward.custom_reward_function.name)
    assert fn is verl_reward.compute_score
    wrapped = get_custom_reward_fn(cfg)  # verl's own loader, with reward_kwargs merged in
    good = "<start_working_out>6 x 7</end_working_out><SOLUTION>42</SOLUTION>"
    result = wrapped(data_source="grail_gsm8k", solution_str=good, ground_truth="#### 42", extra_info={})
    assert result["score"] == pytest.approx(1.0)
    # GRAIL's GSM8K rule: without tags only the "nothing trailing" term (0.05) is earned
    assert wrapped(data_source="grail_gsm8k", solution_str="no tags", ground_truth="#### 42",
                   extra_info={})["score"] == pytest.approx(0.05)


def test_compose_from_any_cwd_and_repeatedly(tmp_path, monkeypatch):
    first = OmegaConf.to_container(compose(["dataset=mbpp"]), resolve=False)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert OmegaConf.to_container(compose(["dataset=mbpp"]), resolve=False) == first


def test_unknown_key_names_the_key_and_the_allowed_keys():
    with pytest.raises(ConfigError) as err:
        compose(["actor_rollout_ref.actor.clip_ratio_hgh=0.3"])
    message = str(err.value)
    assert "unknown config key 'actor_rollout_ref.actor.clip_ratio_hgh'" in message
    assert "did you mean 'clip_ratio_high'" in message
    assert "Keys allowed under actor_rollout_ref.actor:" in message and "loss_agg_mode" in message


def test_misspelled_preset_lists_the_allowed_values():
    with pytest.raises(ConfigError, match=r"model_preset='qwen2.5-7b' is not a shipped model .*allowed values for "
                                          r"model_preset: qwen2-7b-instruct, qwen2.5-1.5b-instruct, "
                                          r"qwen2.5-14b-instruct, qwen2.5-7b-instruct, tiny"):
        compose(["model_preset=qwen2.5-7b"])
    with pytest.raises(ConfigError, match="unknown config_name 'grpo'; allowed: grpo_grail, grpo_grail_kl"):
        compose([], "grpo")


def test_adding_a_key_on_purpose_works():
    assert compose(["+trainer.my_tag=abc"]).trainer.my_tag == "abc"


def _run_files(tmp_path, monkeypatch):
    """The files a launch reads: parquet files under GRAIL_DATA_ROOT and a tiny model folder."""
    for dataset in ("math", "gsm8k"):
        (tmp_path / "data" / dataset).mkdir(parents=True)
        for split in ("train", "val"):
            (tmp_path / "data" / dataset / f"{split}.parquet").write_bytes(b"")
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text("{}")
    monkeypatch.setenv("GRAIL_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("GRAIL_TINY_MODEL_DIR", str(tmp_path / "tiny"))
    monkeypatch.setenv("GRAIL_MODEL_PATH", str(tmp_path / "tiny"))


def test_train_rejects_a_non_dividing_layout_before_launching(capsys, tmp_path, monkeypatch):
    from grail_megatron.cli import train as train_cli

    _run_files(tmp_path, monkeypatch)
    code = train_cli.main(["actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=3"])
    err = capsys.readouterr().err
    assert code == 1
    assert "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size: num_layers=28 is not divisible by PP=3" in err
    assert "fix: use PP in {1, 2, 4}" in err
    assert "world size 8 is not divisible by TP x PP = 2x3" in err


def test_train_rejects_bad_keys_with_exit_code_2(capsys):
    from grail_megatron.cli import train as train_cli

    assert train_cli.main(["--dry-run", "dataset=gsm9k"]) == 2
    assert "allowed values for dataset: gsm8k, math, mbpp" in capsys.readouterr().err


def test_train_dry_run_prints_config_and_plan(capsys):
    from grail_megatron.cli import train as train_cli

    assert train_cli.main(["--dry-run", "--kl", "model_preset=qwen2.5-14b-instruct", "dataset=gsm8k"]) == 0
    out = capsys.readouterr().out
    assert "algorithm.adv_estimator: 'gae' -> 'grpo'" in out
    assert "actor_rollout_ref.actor.use_kl_loss: False -> True" in out
    assert "# resolved config" not in out  # the whole config only with --print-config
    assert "reference       TP4 PP2 (own processes)" in out
    assert "least offload that fits: optimizer" in out
    assert "verl validate_config: passed" in out and out.rstrip().endswith("DRY RUN: nothing launched.")


def test_real_launch_without_gpu_or_init_checkpoint_stops_with_a_fix(capsys, tmp_path, monkeypatch):
    from grail_megatron.cli import train as train_cli

    _run_files(tmp_path, monkeypatch)
    code = train_cli.main([f"grail.mcore_init_root={tmp_path}/missing"])
    err = capsys.readouterr().err
    assert code == 2  # a file the run must read is missing: bad input
    assert f"dist_checkpointing_path={tmp_path}/missing/qwen2.5-7b-instruct/global_step_0/actor/model/dist_ckpt does not exist" in err
    code = train_cli.main(["actor_rollout_ref.actor.megatron.use_dist_checkpointing=false"])
    assert code == 3  # broken environment: no GPU
    assert "no CUDA GPU is visible" in capsys.readouterr().err


def test_local_mode_hands_the_composed_config_to_the_local_loop(monkeypatch, tmp_path):
    import grail_megatron.local as local
    from grail_megatron.cli import train as train_cli

    _run_files(tmp_path, monkeypatch)
    seen = {}

    def fake_entry(overrides, config_name, cfg):
        seen.update(overrides=list(overrides), config_name=config_name, cfg=cfg)
        return 0

    # the local loop is owned by another module; here only the hand-over is under test
    monkeypatch.setattr(local, "main", fake_entry)
    assert train_cli.main(["--local", "--kl", "model_preset=tiny", "cluster=cpu"]) == 0
    assert seen["config_name"] == "grpo_grail_kl"
    assert seen["overrides"] == ["model_preset=tiny", "cluster=cpu"]
    assert seen["cfg"].actor_rollout_ref.actor.megatron.tensor_model_parallel_size == 2
    assert seen["cfg"].trainer.device == "cpu"
