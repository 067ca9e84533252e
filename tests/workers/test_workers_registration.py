"""The grail_megatron trainer mode with verl 0.9.1's real classes, on CPU.

What runs here: verl's trainer registry, verl's `_init_resource_pool_mgr` (called through our
override), verl's `ActorRolloutRefWorker.__init__`/`init_model` (which turns the composed config
into the TrainingWorkerConfig each role's engine receives), verl's ResourcePoolManager and
RayResourcePool placement groups on a local Ray with logical GPUs. The one seam: the Megatron
engine itself (needs CUDA) is replaced through verl's own extension point
`actor_worker_cls`/`ref_worker_cls` by a worker that records the config it is given.
"""

from __future__ import annotations

import os
import socket

import pytest

from grail_megatron.config import compose

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def verl_classes():
    from verl.single_controller.base.worker import Worker
    from verl.trainer.ppo.utils import Role
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from grail_megatron.workers import register
    from grail_megatron.workers.trainer import GrailActorRolloutWorker, GrailMegatronTrainer

    register()
    return Role, Worker, ActorRolloutRefWorker, GrailActorRolloutWorker, GrailMegatronTrainer


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from grail_megatron.models.tiny import make_tiny_model, train_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    texts = [f"What is {a} + {b}? <start_working_out>{a} + {b} = {a + b}</end_working_out>"
             f"<SOLUTION>{a + b}</SOLUTION>" for a in range(10) for b in range(10)]
    train_tokenizer(texts, root / "tok")
    return make_tiny_model(root / "model", tokenizer_dir=root / "tok", hidden=128, layers=2, heads=4, kv_heads=2,
                           intermediate=256)


def _mapped(trainer, Role):
    """role name -> (worker class name, pool name)."""
    return {str(role): (cls.__ray_metadata__.modified_class.__name__, trainer.mapping[role])
            for role, cls in trainer.role_worker_mapping.items()}


def _trainer(cfg, Trainer):
    trainer = object.__new__(Trainer)  # PPOTrainer.__init__ builds datasets; the mapping needs only the config
    trainer.config = cfg
    trainer._init_resource_pool_mgr()
    return trainer


def test_trainer_mode_is_registered_with_verl(verl_classes):
    from verl.trainer.ppo.v1 import get_trainer_cls

    *_, GrailMegatronTrainer = verl_classes
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    assert get_trainer_cls("grail_megatron") is GrailMegatronTrainer
    assert issubclass(GrailMegatronTrainer, PPOTrainerSync)
    assert compose().trainer.v1.trainer_mode == "grail_megatron"


def test_registered_trainer_adds_grail_pass_at_k_to_verl_validation(verl_classes):
    """verl's validation of the registered mode reports GRAIL's k-metrics over 5 sampled answers."""
    *_, GrailMegatronTrainer = verl_classes
    trainer = object.__new__(GrailMegatronTrainer)
    trainer.config = compose()
    assert trainer.config.actor_rollout_ref.rollout.val_kwargs.n == 5
    assert trainer.config.actor_rollout_ref.rollout.val_kwargs.do_sample is True
    sources = ["grail_gsm8k"] * 5
    uids = ["task-0"] * 5
    rewards = [1.0, 0.0, 0.0, 0.0, 0.0]
    metrics = trainer._val_metrics_update(sources, uids, {"reward": rewards}, [1] * 5)
    pass_at = {k: v for k, v in metrics.items() if k.startswith("val/grail_gsm8k/pass@")}
    assert pass_at["val/grail_gsm8k/pass@1"] == pytest.approx(0.2)
    assert pass_at["val/grail_gsm8k/pass@5"] == pytest.approx(1.0)


def test_no_kl_maps_one_actor_rollout_worker_on_the_global_pool(verl_classes):
    Role, *_, GrailMegatronTrainer = verl_classes
    trainer = _trainer(compose(["model_preset=qwen2.5-7b-instruct"]), GrailMegatronTrainer)
    assert _mapped(trainer, Role) == {"actor_rollout": ("GrailActorRolloutWorker", "global_pool")}
    assert trainer.resource_pool_manager.resource_pool_spec == {"global_pool": [8]}
    assert trainer.resource_pool_manager.colocated_pools == {}


def test_kl_maps_actor_and_a_separate_reference_worker(verl_classes):
    Role, *_, GrailMegatronTrainer = verl_classes
    trainer = _trainer(compose(["model_preset=qwen2.5-7b-instruct"], "grpo_grail_kl"), GrailMegatronTrainer)
    assert _mapped(trainer, Role) == {
        "actor": ("GrailActorRolloutWorker", "global_pool"),
        "ref": ("GrailRefWorker", "ref_pool"),
    }
    # colocated: the reference reuses the global pool's GPUs, so Ray is asked for 8 GPUs only
    assert trainer.resource_pool_manager.resource_pool_spec == {"global_pool": [8]}
    assert trainer.resource_pool_manager.colocated_pools == {"ref_pool": "global_pool"}
    assert trainer.resource_pool_manager.get_n_gpus() == 8


def test_dedicated_reference_pool_asks_for_its_own_gpus(verl_classes):
    Role, *_, GrailMegatronTrainer = verl_classes
    cfg = compose(["cluster=nx8", "trainer.nnodes=2", "grail.ref_placement=dedicated", "grail.ref_pool.nnodes=1",
                   "grail.ref_pool.n_gpus_per_node=4"], "grpo_grail_kl")
    trainer = _trainer(cfg, GrailMegatronTrainer)
    assert trainer.resource_pool_manager.resource_pool_spec == {"global_pool": [8, 8], "ref_pool": [4]}
    assert trainer.resource_pool_manager.colocated_pools == {}
    assert trainer.mapping[Role.RefPolicy] == "ref_pool"


def test_bad_reference_placement_names_the_allowed_values(verl_classes):
    *_, GrailMegatronTrainer = verl_classes
    cfg = compose(["grail.ref_placement=shared"], "grpo_grail_kl")
    with pytest.raises(ValueError, match=r"grail.ref_placement='shared'; allowed values: colocated, dedicated"):
        _trainer(cfg, GrailMegatronTrainer)


def test_actor_role_string_still_builds_the_rollout(verl_classes, monkeypatch):
    Role, Worker, ActorRolloutRefWorker, GrailActorRolloutWorker, _ = verl_classes
    _worker_env(monkeypatch)
    cfg = compose(["model_preset=tiny", "cluster=cpu"], "grpo_grail_kl")
    actor = GrailActorRolloutWorker(cfg.actor_rollout_ref, role="actor")
    assert (actor.role, actor._is_actor, actor._is_rollout, actor._is_ref) == ("actor_rollout", True, True, False)
    plain = ActorRolloutRefWorker(cfg.actor_rollout_ref, role="actor")  # verl's own: no rollout
    assert (plain._is_actor, plain._is_rollout) == (True, False)


def _worker_env(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)


def _recording_worker_classes(Worker, ActorRolloutRefWorker):
    received = {}

    class EngineSeam(Worker):
        """Stands in for verl's TrainingWorker, whose MegatronEngine needs CUDA: records its config."""

        def __init__(self, config):
            import torch.distributed as dist

            Worker.__init__(self)
            if not dist.is_initialized():  # verl's TrainingWorker initialises the process group too
                dist.init_process_group("gloo", rank=0, world_size=1,
                                        init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}")
            received[config.engine_config.forward_only and "ref" or "actor"] = config
            self._register_dispatch_collect_info(mesh_name="train", dp_rank=0, is_collect=True)

        def reset(self):
            pass

        def set_loss_fn(self, loss_fn):
            self.loss_fn = loss_fn

    class Recording(ActorRolloutRefWorker):
        actor_worker_cls = EngineSeam
        ref_worker_cls = EngineSeam

    return Recording, received


@pytest.mark.parametrize("config_name", ["grpo_grail", "grpo_grail_kl"])
def test_worker_config_each_role_receives(verl_classes, tiny_model_dir, monkeypatch, config_name):
    Role, Worker, ActorRolloutRefWorker, *_ = verl_classes
    _worker_env(monkeypatch)
    cfg = compose(["model_preset=tiny", "cluster=cpu", f"actor_rollout_ref.model.path={tiny_model_dir}",
                   "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2",
                   "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=1",
                   "actor_rollout_ref.actor.megatron.optimizer_offload=true",
                   "actor_rollout_ref.ref.megatron.tensor_model_parallel_size=1",
                   "actor_rollout_ref.ref.megatron.pipeline_model_parallel_size=2",
                   "actor_rollout_ref.ref.megatron.param_offload=true",
                   "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3",
                   "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=5",
                   "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=7",
                   "actor_rollout_ref.actor.optim.lr_warmup_steps=20"],  # GRAIL's (the tiny preset has 0)
                  config_name)
    Recording, received = _recording_worker_classes(Worker, ActorRolloutRefWorker)
    trainer_roles = ["actor", "ref"] if config_name == "grpo_grail_kl" else ["actor"]
    try:
        for role in trainer_roles:  # the role strings the grail_megatron mode hands to verl
            Recording(cfg.actor_rollout_ref.copy(), role=role).init_model()
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    actor = received["actor"]
    assert actor.engine_config.strategy == "megatron"
    assert (actor.engine_config.tensor_model_parallel_size, actor.engine_config.pipeline_model_parallel_size) == (2, 1)
    assert actor.engine_config.forward_only is False
    assert actor.engine_config.micro_batch_size_per_gpu == 3
    assert actor.engine_config.infer_micro_batch_size_per_gpu == 5
    assert (actor.engine_config.param_offload, actor.engine_config.optimizer_offload) == (False, True)
    assert actor.optimizer_config.lr == pytest.approx(3e-6)
    assert actor.optimizer_config.lr_warmup_steps == 20
    assert actor.model_config.hf_config.num_hidden_layers == 2
    if config_name == "grpo_grail_kl":
        ref = received["ref"]
        assert (ref.engine_config.tensor_model_parallel_size, ref.engine_config.pipeline_model_parallel_size) == (1, 2)
        assert ref.engine_config.forward_only is True
        assert ref.engine_config.infer_micro_batch_size_per_gpu == 7
        assert ref.engine_config.param_offload is True
    else:
        assert "ref" not in received


def test_resource_pools_on_a_local_ray_cluster(verl_classes, monkeypatch):
    """verl's real placement groups: the colocated reference pool sits on the actor's bundles."""
    import shutil
    import tempfile

    import ray

    Role, *_, GrailMegatronTrainer = verl_classes
    cfg = compose(["trainer.n_gpus_per_node=2"], "grpo_grail_kl")
    trainer = _trainer(cfg, GrailMegatronTrainer)
    ray_dir = tempfile.mkdtemp(prefix="gr", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
    monkeypatch.setenv("HOME", ray_dir)  # Ray writes its auth token under $HOME/.ray
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # never join another helper's cluster
    # Ray 2.60 turns token auth on when a token exists and caches where it found it per process;
    # after an earlier ray.init in this pytest process (tests/slurm) the new GCS, started with
    # the HOME above, finds no token and aborts. A loopback test cluster needs no auth.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=8, num_gpus=2, include_dashboard=False, _temp_dir=ray_dir,
             object_store_memory=80 * 1024**2, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    try:
        manager = trainer.resource_pool_manager
        manager.create_resource_pool()
        global_pool = manager.get_resource_pool(Role.Actor)
        ref_pool = manager.get_resource_pool(Role.RefPolicy)
        assert ref_pool is not global_pool  # its own worker group and processes
        assert ref_pool.world_size == global_pool.world_size == 2
        assert [pg.id for pg in ref_pool.get_placement_groups()] == [pg.id for pg in global_pool.get_placement_groups()]
        assert len(manager.resource_pool_dict) == 2
    finally:
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_ray_setup_hook_named_in_the_config_registers_the_mode(verl_classes):
    import importlib

    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY

    *_, GrailMegatronTrainer = verl_classes
    hook = compose().ray_kwargs.ray_init.runtime_env.worker_process_setup_hook
    module, _, func = hook.rpartition(".")
    TRAINER_REGISTRY.pop("grail_megatron")  # as in a fresh Ray worker process
    getattr(importlib.import_module(module), func)()
    assert TRAINER_REGISTRY["grail_megatron"] is GrailMegatronTrainer
