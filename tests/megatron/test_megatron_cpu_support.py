"""Each CPU adjustment of grail_megatron.megatron.cpu_support: what fails without it.

On 2 gloo ranks, the real workflow (build, log-probs, update) runs once with one adjustment
temporarily removed (`cpu_support.without(name)`) and must fail with the original CUDA error
at the Megatron line the adjustment exists for; then it runs again with all adjustments.
"""

import traceback

import pytest
import torch

from grail_megatron.megatron import cpu_support
from grail_megatron.megatron.spawn import RankPool
from grail_megatron.models.tiny import make_tiny_model, train_tokenizer

NO_DRIVER = "Found no NVIDIA driver"


# ----------------------------------------------------------------------------- rank tasks
def _batch(rows=4, prompt=3, response=3):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (rows, prompt + response), generator=g)
    mask = torch.ones_like(ids)
    return dict(input_ids=ids, attention_mask=mask, responses=ids[:, prompt:],
                response_mask=mask[:, prompt:], advantages=torch.ones(rows, response))


def _workflow(model_dir, tp, pp, update):
    from grail_megatron.megatron import parallel
    from grail_megatron.megatron.actor import ActorConfig, MegatronActor

    parallel.initialize(tp, pp, seed=0)
    actor = MegatronActor.from_pretrained(model_dir, ActorConfig(ppo_micro_batch_size_per_gpu=2),
                                          trainable=update)
    batch = _batch()
    batch["old_log_probs"] = actor.compute_log_prob(batch)
    if update:
        return actor.update_policy(batch)["actor/grad_norm"]
    return float(batch["old_log_probs"].sum())


def _failure(exc):
    frames = [f"{f.filename.split('site-packages/')[-1]}:{f.name}"
              for f in traceback.extract_tb(exc.__traceback__)]
    return type(exc).__name__, str(exc), frames


def task_without(name, model_dir, tp, pp, update):
    """Run the workflow without adjustment `name` (expect a failure), then with it."""
    try:
        with cpu_support.without(name):
            _workflow(model_dir, tp, pp, update)
        failure = None
    except Exception as exc:  # noqa: BLE001 - the failure is the result
        failure = _failure(exc)
    return failure, _workflow(model_dir, tp, pp, update), cpu_support.active()


def task_rng_tracker():
    """The setting `inference_rng_tracker=True` (parallel.seed_everything) and its reason."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    from grail_megatron.megatron import parallel

    parallel.initialize(2, 1, seed=0)
    try:
        model_parallel_cuda_manual_seed(0, inference_rng_tracker=False, force_reset_rng=True)
        failure = None
    except Exception as exc:  # noqa: BLE001
        failure = _failure(exc)
    parallel.seed_everything(0)
    with get_cuda_rng_tracker().fork():
        sample = torch.rand(3)
    return failure, sample


def task_bf16(model_dir):
    """bf16 models run forward on CPU; bf16 *training* is refused there with a clear error."""
    from grail_megatron.megatron import parallel
    from grail_megatron.megatron.actor import ActorConfig, MegatronActor
    from grail_megatron.megatron.bridge import BridgeConfig

    parallel.initialize(2, 1, seed=0)
    batch = _batch()
    fp32 = MegatronActor.from_pretrained(model_dir, ActorConfig(), trainable=False)
    bf16_config = ActorConfig(bridge=BridgeConfig(dtype=torch.bfloat16))
    bf16 = MegatronActor.from_pretrained(model_dir, bf16_config, trainable=False)
    diff = (fp32.compute_log_prob(batch) - bf16.compute_log_prob(batch)).abs().max().item()
    try:
        MegatronActor.from_pretrained(model_dir, bf16_config, trainable=True)
        error = None
    except ValueError as exc:
        error = str(exc)
    return diff, error


def task_threads():
    """The device mode is per thread: `on_cpu_thread` carries it into worker threads."""
    import threading

    def allocate():
        return torch.zeros(1, device="cuda").device.type

    outcome = {}

    def plain():
        try:
            outcome["plain"] = allocate()
        except RuntimeError as exc:
            outcome["plain"] = str(exc)

    def wrapped():
        outcome["wrapped"] = cpu_support.on_cpu_thread(allocate)()

    for target in (plain, wrapped):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    return outcome, allocate()


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pool():
    with RankPool(world_size=2) as p:
        yield p


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpu")
    texts = [f"What is {a} + {b}? {a + b}" for a in range(10) for b in range(10)]
    train_tokenizer(texts, root / "tok")
    return make_tiny_model(root / "m", tokenizer_dir=root / "tok", hidden=32, layers=2,
                           heads=2, kv_heads=1)


CASES = [
    # name, tp, pp, update, expected error, Megatron frame where it is raised
    ("current_device", 1, 1, True, NO_DRIVER, "param_and_grad_buffer.py"),
    ("cuda_literals", 2, 1, False, NO_DRIVER, "pipeline_parallel/schedules.py"),
    ("synchronize", 1, 2, False, NO_DRIVER, "pipeline_parallel/p2p_communication.py"),
    ("tensor_type", 2, 1, True, "", "optimizer/clip_grads.py:clip_grad_by_total_norm_fp32"),
]


@pytest.mark.multiproc
@pytest.mark.parametrize("name,tp,pp,update,message,frame", CASES, ids=[c[0] for c in CASES])
def test_adjustment_is_needed(pool, model_dir, name, tp, pp, update, message, frame):
    results = pool.run(task_without, name, model_dir, tp, pp, update)
    for failure, value, active in results:
        assert failure is not None, f"the workflow ran without {name}: the adjustment is not needed"
        kind, text, frames = failure
        assert message in text, (kind, text)
        megatron_frames = [f for f in frames if f.startswith("megatron/")]
        assert any(frame in f for f in megatron_frames), megatron_frames
        assert kind == ("AssertionError" if name == "tensor_type" else "RuntimeError")
        assert value == value and value != 0.0  # the second run (all adjustments) worked
        assert active == sorted(cpu_support.NAMES)  # `without` restored the adjustment
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-6)


@pytest.mark.multiproc
def test_rng_tracker_setting_is_needed(pool):
    (failure, sample0), (_, sample1) = pool.run(task_rng_tracker)
    kind, text, frames = failure
    assert NO_DRIVER in text and any("torch/cuda/random.py" in f for f in frames)
    # The inference tracker's fork() does not switch streams: both TP ranks draw the same
    # numbers. Harmless here: with use_cpu_initialization Megatron initialises the full master
    # weight and slices it, and dropout is 0, so no TP-rank-specific stream is ever needed.
    assert torch.equal(sample0, sample1)


@pytest.mark.multiproc
def test_bf16_forward_on_cpu_and_training_needs_gpu(pool, model_dir):
    for diff, error in pool.run(task_bf16, model_dir):
        assert 0.0 < diff < 0.05  # bf16 rounding, but the same model
        assert error is not None and "needs a GPU" in error and "float32" in error


@pytest.mark.multiproc
def test_device_mode_is_per_thread(pool):
    outcome, main_thread = pool.run(task_threads)[0]
    assert main_thread == "cpu" and outcome["wrapped"] == "cpu"
    assert NO_DRIVER in outcome["plain"]


# ----------------------------------------------------------------------------- in-process units
def test_cuda_to_cpu_mode_maps_devices():
    x = torch.ones(2)
    with cpu_support.CudaToCpuMode():
        assert torch.zeros(3, device="cuda").device.type == "cpu"
        assert torch.empty(1, device=torch.device("cuda", 0)).device.type == "cpu"
        assert torch.tensor([1], device=0).device.type == "cpu"
        assert x.cuda() is x
        assert x.to("cuda").device.type == "cpu"
        assert x.to(device="cuda:0").device.type == "cpu"
    with pytest.raises(RuntimeError, match="NVIDIA|CUDA"):
        torch.zeros(1, device="cuda")  # outside the mode the CUDA build still refuses


def test_unknown_adjustment_is_rejected():
    with pytest.raises(ValueError, match="unknown CPU adjustments"):
        cpu_support.enable_cpu_support(skip=["cuda_graphs"])
    with pytest.raises(ValueError, match="unknown CPU adjustment"):
        with cpu_support.without("cuda_graphs"):
            pass
