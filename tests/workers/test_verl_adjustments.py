"""Each runtime adjustment that lets verl 0.9.1's own Megatron engine run: what fails without it.

verl's real classes run in process on 2 gloo ranks (`RankPool`, no Ray), with the environment a
`cluster=cpu` run gives every verl worker (VERL_PLATFORM=cpu, VERL_USE_EXTERNAL_MODULES naming
`grail_megatron.workers.plugins`) and the composed `model_preset=tiny cluster=cpu` config:

- reference path: the project's `GrailRefWorker` (verl's `ActorRolloutRefWorker`, role "ref");
  verl's `init_model` turns the config into the `TrainingWorkerConfig` of `CpuTrainingWorker`
  (verl's `TrainingWorker`), which builds verl's `MegatronEngineWithLMHead` through mbridge;
  then verl's `compute_ref_log_prob` (one padded forward, TP2);
- actor path: the project's `GrailActorRolloutWorker`; verl's `init_model` (Megatron's
  DistributedOptimizer), `compute_log_prob` and one `update_actor` (PPO loss, clipped gradient);
- pipeline path: the reference at PP2 (Megatron's p2p shape exchange).

Each scenario removes one adjustment (`cpu_support.without`, `mbridge_compat.without`, or the
one function of `cpu_worker` that does it), runs the path, records the failure (exception,
message, frames), restores it and runs the path again; the tests assert the original error at
the verl / mbridge / Megatron frame and that the restored run matches the baseline log-probs.
Subprocesses check what does not fit a running rank: the process group verl would create, the
platform registration through VERL_USE_EXTERNAL_MODULES, and that nothing CPU-specific happens
when CUDA is reported present.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import subprocess
import sys
import textwrap
import threading
import traceback

import pytest
import torch

from grail_megatron.megatron.spawn import RankPool, free_port

pytestmark = [pytest.mark.multiproc, pytest.mark.filterwarnings("ignore")]

NO_DRIVER = "Found no NVIDIA driver"
# what `grail-megatron train ... cluster=cpu` puts in every Ray worker's environment
WORKER_ENV = {
    "VERL_PLATFORM": "cpu",
    "VERL_USE_EXTERNAL_MODULES": "grail_megatron.workers.plugins",
    "OMP_NUM_THREADS": "1",
    "TORCHDYNAMO_DISABLE": "1",
}
ROWS, PROMPT, RESPONSE = 4, 4, 4
MICRO = ["actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2",
         "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
         "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
         f"actor_rollout_ref.actor.ppo_mini_batch_size={ROWS}",
         "actor_rollout_ref.rollout.n=1",
         # verl's trainer sets this from the dataloader; Megatron's LR scheduler needs it
         "actor_rollout_ref.actor.optim.total_training_steps=10",
         "actor_rollout_ref.actor.optim.lr=0.01"]  # an update that shows in the log-probs
PP2 = ["actor_rollout_ref.ref.megatron.tensor_model_parallel_size=1",
       "actor_rollout_ref.ref.megatron.pipeline_model_parallel_size=2"]


# ----------------------------------------------------------------------------- rank side
_configs: dict = {}


def _config(model_dir, extra=()):
    key = (model_dir, tuple(extra))
    if key not in _configs:
        from omegaconf import OmegaConf

        from grail_megatron.config.compose import compose

        cfg = compose(["model_preset=tiny", "cluster=cpu", f"actor_rollout_ref.model.path={model_dir}",
                       *MICRO, *extra])
        OmegaConf.resolve(cfg)
        _configs[key] = cfg
    # verl's init_model edits the role's config in place: every worker gets its own copy
    return copy.deepcopy(_configs[key].actor_rollout_ref)


def _batch(pad=1):
    """A right-padded batch in verl's no-padding layout, as verl's trainer hands it to workers."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (ROWS, PROMPT + RESPONSE), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -pad:] = 0  # one shorter answer: verl's padded forward gets a real padding mask
    td = TensorDict(dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         prompts=ids[:, :PROMPT], responses=ids[:, PROMPT:], response_mask=mask[:, PROMPT:]),
                    batch_size=[ROWS])
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, calculate_entropy=False, compute_loss=False, temperature=1.0)
    return td


def _padded_log_probs(output, td):
    """verl returns the outputs on the TP source rank only: broadcast them (padded) to both."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import no_padding_2_padding

    mine = no_padding_2_padding(tu.get(output, "log_probs"), td).float() if output is not None else None
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return next(value for value in everyone if value is not None)


def _ref_worker(model_dir, extra=()):
    from grail_megatron.workers.trainer import GrailRefWorker

    return GrailRefWorker(_config(model_dir, extra), role="ref")


def _ref_path(worker, init_model=None, compute=None):
    """verl's init_model (which builds the engine) and one reference forward; the log-probs."""
    cls = type(worker)
    (init_model or cls.init_model)(worker)
    td = _batch()
    return _padded_log_probs((compute or cls.compute_ref_log_prob)(worker, td), td)


def _actor_worker(model_dir, extra=()):
    from grail_megatron.workers.trainer import GrailActorRolloutWorker

    return GrailActorRolloutWorker(_config(model_dir, extra), role="actor")


def _actor_path(worker):
    """verl's init_model, old log-probs, one PPO update, log-probs again; (old, grad norm, new)."""
    from verl.utils import tensordict_utils as tu

    worker.init_model()
    td = _batch()
    old = _padded_log_probs(worker.compute_log_prob(td), td)
    td = _batch()
    td["old_log_probs"] = old
    # rewards that differ within the group: a non-zero policy gradient (DESIGN.md section 9)
    td["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5]).unsqueeze(1).expand(ROWS, RESPONSE).clone()
    tu.assign_non_tensor(td, calculate_entropy=False, distillation_use_topk=False, distillation_only=False,
                         global_batch_size=ROWS, mini_batch_size=ROWS, epochs=1, seed=0,
                         dataloader_kwargs={"shuffle": False}, temperature=1.0)
    output = worker.update_actor(td)
    metrics = [tu.get(output, "metrics") if output is not None else None]
    torch.distributed.broadcast_object_list(metrics, src=0)
    td = _batch()
    new = _padded_log_probs(worker.compute_log_prob(td), td)
    return old, metrics[0]["grad_norm"][0], new


def _to_device_path(worker):
    """verl's init_model, then the engine's `to(device)` (as before each weight export)."""
    worker.init_model()
    worker.to("device")
    return True


def _failure(exc):
    frames = [f"{f.filename.split('site-packages/')[-1]}:{f.name}" for f in traceback.extract_tb(exc.__traceback__)]
    return type(exc).__name__, str(exc)[:4000], frames


def _attempt(fn, *args):
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - the failure is the result
        return _failure(exc)
    return None


def _reset_megatron_rng_tracker():
    from megatron.core.tensor_parallel import random

    random._CUDA_RNG_STATE_TRACKER = None
    random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False


@contextlib.contextmanager
def _replaced(module, name, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def _without_rng_tracker():
    """CpuTrainingWorker without its inference RNG tracker: Megatron's tracker starts unset, as
    in a fresh worker process, and verl's set_random_seed seeds it."""
    from grail_megatron.workers import cpu_worker

    _reset_megatron_rng_tracker()
    try:
        with _replaced(cpu_worker, "init_cpu_rng_tracker", lambda: None):
            yield
    finally:
        _reset_megatron_rng_tracker()  # the failed seeding left a CUDA tracker half set up


@contextlib.contextmanager
def _without_cpu_engine():
    """verl's EngineRegistry as verl ships it: Megatron engines for device "cuda" only."""
    from verl.workers.engine.base import EngineRegistry

    from grail_megatron.workers import cpu_worker

    saved = {kind: dict(backends["megatron"]) for kind, backends in EngineRegistry._engines.items()
             if "megatron" in backends}
    for kind in saved:
        EngineRegistry._engines[kind]["megatron"].pop("cpu", None)
    try:
        with _replaced(cpu_worker, "register_megatron_engines_for_cpu", lambda: None):
            yield
    finally:
        for kind, engines in saved.items():
            EngineRegistry._engines[kind]["megatron"] = engines


@contextlib.contextmanager
def _verl_detected_platform():
    """verl's own platform choice on this machine: no VERL_PLATFORM and no "cpu" platform."""
    from verl.plugin.platform import PlatformRegistry, platform_manager

    ours = platform_manager.get_platform()
    saved_env = os.environ.pop("VERL_PLATFORM")
    saved_cls = PlatformRegistry._platforms.pop("cpu")
    platform_manager._current_platform = None
    try:
        yield
    finally:
        PlatformRegistry._platforms["cpu"] = saved_cls
        os.environ["VERL_PLATFORM"] = saved_env
        platform_manager._current_platform = ours


def _ref_scenarios():
    from grail_megatron.megatron import cpu_support, mbridge_compat

    return {
        "mbridge:encoder_and_decoder": lambda: mbridge_compat.without("encoder_and_decoder"),
        "mbridge:grail_bridge_classes": lambda: mbridge_compat.without("grail_bridge_classes"),
        "mbridge:padding_mask_local": lambda: mbridge_compat.without("padding_mask_local"),
        "cpu_support:current_device": lambda: cpu_support.without("current_device"),
        "cpu_support:cuda_literals": lambda: cpu_support.without("cuda_literals"),
        "cpu_worker:rng_tracker": _without_rng_tracker,
        "cpu_worker:engine_for_cpu": _without_cpu_engine,
    }


def _in_new_thread(fn, *args):
    """Run fn in a fresh thread (as Ray runs actor methods in executor threads); re-raise there."""
    outcome = {}

    def target():
        try:
            outcome["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _scenario(without, path, build, build_inside=False):
    """Run `path` on a freshly built worker without one adjustment, then restored."""
    from grail_megatron.megatron import cpu_support

    worker = None if build_inside else build()  # building the worker (re)applies mbridge_compat
    with without():
        failure = _attempt(lambda: path(worker or build()))
    return failure, path(build()), cpu_support.active()


def task_ref(model_dir):
    """Baseline, each reference scenario, and the worker methods in a fresh thread."""
    import verl  # noqa: F401  (imports VERL_USE_EXTERNAL_MODULES, as in every verl process)
    from verl.utils.device import get_device_name

    setup = {"plugins_loaded_by_verl": "grail_megatron.workers.plugins" in sys.modules,
             "device_name": get_device_name()}
    build = functools.partial(_ref_worker, model_dir)
    baseline = _ref_path(build())
    results = {name: _scenario(without, _ref_path, build) for name, without in _ref_scenarios().items()}

    # Ray runs worker methods in executor threads; torch function modes are per thread.
    from grail_megatron.megatron import cpu_support
    from grail_megatron.workers.trainer import GrailRefWorker

    def init_then_forward_in_two_threads(init_model, compute):
        worker = build()
        _in_new_thread(init_model, worker)
        return _in_new_thread(_ref_path, worker, lambda w: None, compute)

    failure = _attempt(init_then_forward_in_two_threads, GrailRefWorker.init_model.__wrapped__,
                       GrailRefWorker.compute_ref_log_prob.__wrapped__)  # verl's methods as verl ships them
    restored = init_then_forward_in_two_threads(GrailRefWorker.init_model, GrailRefWorker.compute_ref_log_prob)
    results["cpu_worker:methods_in_threads"] = (failure, restored, cpu_support.active())
    return setup, baseline, results


def task_actor(model_dir):
    from grail_megatron.megatron import cpu_support, mbridge_compat

    build = functools.partial(_actor_worker, model_dir)
    baseline = _actor_path(build())
    results = {f"cpu_support:{name}": _scenario(lambda name=name: cpu_support.without(name), _actor_path, build)
               for name in ("tensor_type",)}
    no_dist_opt = functools.partial(_actor_worker, model_dir, ["actor_rollout_ref.actor.megatron.use_distributed_optimizer=false"])
    results["mbridge:no_param_buffer"] = _scenario(lambda: mbridge_compat.without("no_param_buffer"),
                                                   _to_device_path, no_dist_opt)
    return baseline, results


def task_pipeline(model_dir):
    """The reference at PP2: Megatron's parallel state is rebuilt (verl keeps an existing one)."""
    from megatron.core import parallel_state

    from grail_megatron.megatron import cpu_support

    parallel_state.destroy_model_parallel()
    try:
        build = functools.partial(_ref_worker, model_dir, PP2)
        baseline = _ref_path(build())
        results = {"cpu_support:synchronize": _scenario(lambda: cpu_support.without("synchronize"), _ref_path, build)}
    finally:
        parallel_state.destroy_model_parallel()
    return baseline, results


def make_model_dir(root) -> str:
    """A tiny Qwen2 whose vocabulary (296) divides TP2 (the composed config's is the preset's; the model's wins)."""
    from grail_megatron.models.tiny import make_tiny_model, train_tokenizer

    train_tokenizer([f"What is {a} + {b}? {a + b}" for a in range(10) for b in range(10)], root / "tok")
    return str(make_tiny_model(root / "model", tokenizer_dir=root / "tok", hidden=32, layers=2, heads=2,
                               kv_heads=1, vocab_size=296))


@contextlib.contextmanager
def worker_rank_pool():
    """2 gloo ranks with the environment a cluster=cpu verl worker gets (spawned ranks inherit it)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in WORKER_ENV.items():
            mp.setenv(key, value)
        with RankPool(world_size=2) as pool:
            yield pool


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("verl_adjustments"))


@pytest.fixture(scope="module")
def pool():
    with worker_rank_pool() as p:
        yield p


@pytest.fixture(scope="module")
def ref_results(pool, model_dir):
    return pool.run(task_ref, model_dir)


@pytest.fixture(scope="module")
def actor_results(pool, model_dir):
    return pool.run(task_actor, model_dir)


@pytest.fixture(scope="module")
def pipeline_results(pool, model_dir):
    return pool.run(task_pipeline, model_dir)



def _value(results, name):
    return results[name][1][0] if isinstance(results[name][1], tuple) else results[name][1]


def _assert_failure(failure, kind, message, frame):
    assert failure is not None, "verl's engine ran without the adjustment: it is not needed"
    got_kind, text, frames = failure
    assert (got_kind, message in text) == (kind, True), (got_kind, text)
    assert any(frame in f for f in frames), "\n".join(frames)


# name: (exception, message, the frame (file:function) it comes from or passes through)
REF_CASES = {
    "mbridge:encoder_and_decoder": ("AttributeError", "has no attribute 'encoder_and_decoder'",
                                    "mbridge/core/util.py:build_model"),
    # mbridge's own Qwen2 class asks Megatron for the Transformer Engine layer spec (TE absent)
    "mbridge:grail_bridge_classes": ("TypeError", "'NoneType' object is not callable",
                                     "gpt_layer_specs.py:get_gpt_layer_with_transformer_engine_submodules"),
    "mbridge:padding_mask_local": ("RuntimeError", "must match the size of tensor b (2)",
                                   "megatron/core/transformer/utils.py:attention_mask_func"),
    "cpu_support:current_device": ("RuntimeError", NO_DRIVER, "mbridge/core/util.py:get_model"),
    # mbridge's get_model calls module.cuda(current_device()): Tensor.cuda(cpu) refuses
    "cpu_support:cuda_literals": ("RuntimeError", "Invalid device, must be cuda device", "torch/nn/modules/module.py:cuda"),
    "cpu_worker:rng_tracker": ("RuntimeError", NO_DRIVER, "megatron/core/tensor_parallel/random.py:model_parallel_cuda_manual_seed"),
    "cpu_worker:engine_for_cpu": ("ValueError", "No engine registered for device='cpu'", "verl/workers/engine/base.py:get_engine_cls"),
    # the forward in a second executor thread (no device mode there): verl's batch on device "cuda"
    "cpu_worker:methods_in_threads": ("RuntimeError", NO_DRIVER,
                                      "verl/workers/engine/megatron/transformer_impl.py:forward_backward_batch"),
}


def test_verl_loads_the_plugins_and_the_cpu_platform(ref_results):
    for setup, _, _ in ref_results:
        assert setup == {"plugins_loaded_by_verl": True, "device_name": "cpu"}


@pytest.mark.parametrize("name", list(REF_CASES))
def test_reference_engine_needs(ref_results, name):
    kind, message, frame = REF_CASES[name]
    for _, baseline, results in ref_results:
        failure, restored, active = results[name]
        _assert_failure(failure, kind, message, frame)
        assert torch.equal(restored, baseline)  # restored: verl's engine gives the baseline log-probs
        assert active == sorted(cpu_support_names())
    assert torch.equal(ref_results[0][1], ref_results[1][1])
    assert ref_results[0][1][0, -1] == 0.0 and (ref_results[0][1][:, :-1] < 0).all()  # padding, real log-probs


def cpu_support_names():
    from grail_megatron.megatron import cpu_support

    return cpu_support.VERL_NAMES  # verl's workers apply enable_verl_cpu_support


def test_actor_update_needs_tensor_type(actor_results):
    (old, grad_norm, new), results = actor_results[0]
    assert grad_norm > 1.0  # above clip_grad=1.0: the update clips
    assert (new - old).abs().max() > 1e-3  # the update moved the policy
    failure, restored, _ = results["cpu_support:tensor_type"]
    _assert_failure(failure, "TypeError", "Wrapped parameters must be one of torch.cuda.FloatTensor",
                    "megatron/core/optimizer/distrib_optimizer.py:_build_model_and_main_param_groups")
    assert restored[1] == grad_norm and torch.equal(restored[2], new)


def test_export_without_flat_param_buffer_needs_the_stand_in(actor_results):
    failure, restored, _ = actor_results[0][1]["mbridge:no_param_buffer"]
    _assert_failure(failure, "AttributeError", "'NoneType' object has no attribute 'storage'",
                    "verl/utils/megatron_utils.py:load_megatron_model_to_gpu")
    assert restored is True


def test_pipeline_parallel_needs_synchronize(pipeline_results, ref_results):
    baseline, results = pipeline_results[0]
    failure, restored, _ = results["cpu_support:synchronize"]
    _assert_failure(failure, "RuntimeError", NO_DRIVER, "megatron/core/pipeline_parallel/p2p_communication.py:_communicate_shapes")
    assert torch.equal(restored, baseline)
    # PP2 and TP2 compute the same bf16 log-probs up to rounding
    assert torch.allclose(baseline, ref_results[0][1], atol=0.05)


# ----------------------------------------------------------------------------- single processes
SINGLE_RANK = r"""
import json, os, sys, traceback
sys.path.insert(0, sys.argv[1])
import torch
import test_verl_adjustments as t

out = {}
import verl  # no VERL_USE_EXTERNAL_MODULES: our platform is not registered
from verl.plugin.platform import PlatformRegistry, platform_manager
from verl.utils.device import get_device_name
out["unregistered"] = t._attempt(get_device_name)

import grail_megatron.workers.plugins  # what VERL_USE_EXTERNAL_MODULES makes `import verl` do
platform_manager._current_platform = None
out["device_name"] = get_device_name()

from verl.utils.distributed import initialize_global_process_group_ray
from grail_megatron.workers import cpu_worker
out["verl_process_group"] = t._attempt(initialize_global_process_group_ray)
cpu_worker.init_gloo_process_group()
out["gloo"] = torch.distributed.get_backend()

t.MICRO.append("actor_rollout_ref.ref.megatron.tensor_model_parallel_size=1")  # one rank
build = lambda: t._ref_worker(sys.argv[2])
out["platform"] = t._scenario(t._verl_detected_platform, t._ref_path, build, build_inside=True)[0]
out["restored"] = t._ref_path(build()).tolist()
print("RESULT " + json.dumps(out))
"""

GPU_PRESENT = r"""
import json, os, sys
import torch
torch.cuda.is_available = lambda: True  # as on a GPU node
originals = (torch.Tensor.type, torch.cuda.current_device, torch.cuda.synchronize)
import verl  # imports grail_megatron.workers.plugins (VERL_USE_EXTERNAL_MODULES), as on a GPU node
from megatron.core.optimizer import clip_grads
from megatron.core.transformer.enums import ModelType
from grail_megatron.megatron import cpu_support
from grail_megatron.workers.cpu_worker import CpuTrainingWorker
from grail_megatron.workers.trainer import GrailRefWorker, prepare_engine_process
from verl.workers.engine_workers import TrainingWorker

out = {"plugins": "grail_megatron.workers.plugins" in sys.modules, "after_import": cpu_support.active(),
       "enable": cpu_support.enable_verl_cpu_support(), "enable_all": cpu_support.enable_cpu_support()}
out["active"] = cpu_support.active()
out["untouched"] = originals == (torch.Tensor.type, torch.cuda.current_device, torch.cuda.synchronize)
out["clip_grad_untouched"] = clip_grads.clip_grad_by_total_norm_fp32.__module__ == clip_grads.__name__
out["function_modes"] = torch._C._len_torch_function_stack()
worker = object.__new__(GrailRefWorker)
prepare_engine_process(worker)
out["mbridge_alias"] = hasattr(ModelType, "encoder_and_decoder")  # needed on every device
out["active_after_worker"] = cpu_support.active()
out["worker_cls"] = [worker.ref_worker_cls is TrainingWorker, worker.actor_worker_cls is TrainingWorker]
os.environ["VERL_PLATFORM"] = "cpu"
prepare_engine_process(worker)
out["cpu_worker_cls"] = worker.ref_worker_cls is CpuTrainingWorker
print("RESULT " + json.dumps(out))
"""


def _run_python(code, env, *args, timeout=240):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("VERL_")},
           "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1", **env}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def single_rank(model_dir):
    env = {"VERL_PLATFORM": "cpu", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    return _run_python(SINGLE_RANK, env, os.path.dirname(__file__), model_dir)


def test_cpu_platform_is_unknown_to_verl_without_the_plugin(single_rank):
    kind, text, frames = single_rank["unregistered"]
    assert kind == "ValueError" and "Unknown platform 'cpu'" in text
    assert any("verl/plugin/platform/platform_manager.py:_create_platform" in f for f in frames)
    assert single_rank["device_name"] == "cpu"


def test_verls_process_group_is_rejected_by_torch_and_plain_gloo_works(single_rank):
    kind, text, frames = single_rank["verl_process_group"]
    assert kind == "ValueError" and "cpu:gloo,cpu:gloo" in text, text
    assert any("verl/utils/distributed.py:initialize_global_process_group_ray" in f for f in frames)
    assert single_rank["gloo"] == "gloo"


def test_engine_on_verls_own_platform_choice_fails(single_rank):
    """No cpu platform: verl falls back to its CUDA platform, our worker is not selected, and
    verl's engine fails at the first CUDA call (mbridge's get_model)."""
    kind, text, frames = single_rank["platform"]
    assert kind == "RuntimeError" and NO_DRIVER in text, (text, "\n".join(frames))
    assert any("verl/utils/megatron_utils.py:make_megatron_module" in f for f in frames), "\n".join(frames)
    assert any("torch/cuda/__init__.py:current_device" in f for f in frames), "\n".join(frames)
    restored = torch.tensor(single_rank["restored"])
    assert restored[0, -1] == 0.0 and (restored[:, :-1] < 0).all()


def test_nothing_cpu_specific_when_cuda_is_present():
    out = _run_python(GPU_PRESENT, {"VERL_USE_EXTERNAL_MODULES": "grail_megatron.workers.plugins"})
    assert out == {"plugins": True, "after_import": [], "enable": [], "enable_all": [], "active": [],
                   "untouched": True, "clip_grad_untouched": True, "function_modes": 0,
                   "mbridge_alias": True, "active_after_worker": [], "worker_cls": [True, True], "cpu_worker_cls": True}
