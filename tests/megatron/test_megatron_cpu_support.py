"""grail_megatron.megatron.cpu_support's own mechanics: the RNG tracker setting, the per-thread
device mode, the CUDA-to-CPU mapping, unknown names.

That each adjustment is needed is shown with verl's real engine (the only training code now):
tests/workers/test_verl_adjustments.py removes one at a time and asserts the original failure.
"""

import traceback

import pytest
import torch

from grail_megatron.megatron import cpu_support
from grail_megatron.megatron.spawn import RankPool

NO_DRIVER = "Found no NVIDIA driver"


# ----------------------------------------------------------------------------- rank tasks
def _failure(exc):
    frames = [f"{f.filename.split('site-packages/')[-1]}:{f.name}"
              for f in traceback.extract_tb(exc.__traceback__)]
    return type(exc).__name__, str(exc), frames


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
