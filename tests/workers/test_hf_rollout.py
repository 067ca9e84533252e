"""The `rollout.name=hf` backend on a real local Ray cluster, driven through verl 0.9.1's own code.

What runs: verl's `LLMServerManager` (replica registry -> `HFReplica.init_hybrid` -> our server
actor, verl's load balancer and client), verl's `RayWorkerGroup` whose workers build the
rollout adapter with verl's `get_rollout_class("hf", "async")` and push weights through it as
`ActorRolloutRefWorker.update_weights` does (a generator of (HF name, tensor) with a gloo
collective per tensor, like the Megatron export), and verl's `AgentLoopWorker` running the
single-turn agent loop against the server. The reference every log-prob is checked against is
a plain HF forward pass over prompt + response.

The only stand-in is the trainer half of the worker (`RolloutRankWorker`): verl's Megatron
engine needs CUDA and ~80 s here, and it is not the component under test.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore")

TP = 2  # rollout ranks of the one replica: rank 0 forwards weights, rank 1 only drains them
TEMPERATURE = 0.7
SAMPLING = dict(temperature=TEMPERATURE, top_p=0.95, top_k=50, repetition_penalty=1.0, logprobs=True)
TOL = 1e-5


# --------------------------------------------------------------------------- model and reference
def _sharpen(model, seed: int, scale: float) -> None:
    """Add noise to every matrix: a random-init tiny model is nearly uniform, which would make
    log-prob comparisons weak."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A sharp tiny Qwen2 whose generation config adds one extra EOS: the greedy token at step 3
    of `eos_prompt` (so one request provably stops at an EOS mid-way)."""
    from transformers import AutoModelForCausalLM

    from grail_megatron.models.tiny import EOS_TOKEN, make_tiny_model, train_tokenizer

    root = tmp_path_factory.mktemp("hf_rollout")
    texts = [f"What is {a} + {b}? <start_working_out>{a} + {b} = {a + b}</end_working_out>"
             f"<SOLUTION>{a + b}</SOLUTION>" for a in range(10) for b in range(10)]
    tok = train_tokenizer(texts, root / "tok")
    path = make_tiny_model(root / "model", tokenizer_dir=root / "tok", hidden=64, layers=2, heads=4, kv_heads=2)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    _sharpen(model, seed=1, scale=0.15)
    eos_prompt = tok("What is 3 + 4?")["input_ids"]
    greedy = _greedy(model, eos_prompt, 6)
    extra_eos = greedy[3]
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids(EOS_TOKEN), extra_eos]
    model.save_pretrained(path)
    return {"path": str(path), "tok": tok, "model": model, "eos_prompt": eos_prompt, "greedy": greedy,
            "eos_ids": set(model.generation_config.eos_token_id)}


@torch.no_grad()
def _greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@torch.no_grad()
def reference_log_probs(model, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of each response token from one forward pass over prompt + response."""
    logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1: -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)


def _max_diff(output, model, prompt, temperature=TEMPERATURE) -> float:
    ref = reference_log_probs(model, prompt, output.token_ids, temperature)
    return (torch.tensor(output.log_probs) - ref).abs().max().item()


# --------------------------------------------------------------------------- cluster and verl pieces
def rollout_worker_class():
    from verl.single_controller.base import Worker
    from verl.single_controller.base.decorator import Dispatch, register

    class RolloutRankWorker(Worker):
        """The rollout half of verl's `ActorRolloutRefWorker`: builds the adapter the way verl does
        and syncs weights the way `update_weights` does (resume, update_weights(generator), resume)."""

        def __init__(self, config):
            super().__init__()
            import torch.distributed as dist
            from verl.utils.config import omega_conf_to_dataclass
            from verl.workers.rollout.base import get_rollout_class

            from grail_megatron.workers.hf_rollout import register_hf_rollout

            register_hf_rollout()  # in the trainer: grail_megatron.workers.plugins via VERL_USE_EXTERNAL_MODULES
            dist.init_process_group("gloo")  # verl's worker group set RANK/WORLD_SIZE/MASTER_*
            rollout_config = omega_conf_to_dataclass(config.rollout)
            model_config = omega_conf_to_dataclass(config.model)
            self.rollout = get_rollout_class(rollout_config.name, rollout_config.mode)(
                config=rollout_config, model_config=model_config, device_mesh=None)

        @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
        async def push_weights(self, state: dict, global_steps: int):
            """Every rank calls update_weights; each tensor passes an all_reduce (as a TP gather would)."""
            import torch.distributed as dist

            def exported():
                for name, tensor in state.items():
                    part = tensor / dist.get_world_size()
                    dist.all_reduce(part)  # a rank that stopped iterating would hang the others here
                    yield name, part

            await self.rollout.resume(tags=["weights"])
            info = await self.rollout.update_weights(exported(), global_steps=global_steps)
            await self.rollout.resume(tags=["kv_cache"])
            return {**info, "rank": dist.get_rank(), "leader": self.rollout.is_leader_rank}

    return RolloutRankWorker


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray_dir = tempfile.mkdtemp(prefix="ghf", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", ray_dir)  # Ray writes its auth token under $HOME/.ray
        mp.delenv("RAY_ADDRESS", raising=False)  # never join another engineer's cluster
        mp.setenv("RAY_AUTH_MODE", "disabled")  # a loopback test cluster (see test_workers_registration)
        env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                          "TOKENIZERS_PARALLELISM", "RAY_USAGE_STATS_ENABLED") if k in os.environ}
        ray.init(num_cpus=8, num_gpus=TP, include_dashboard=False, _temp_dir=ray_dir,
                 object_store_memory=100 * 1024**2, log_to_driver=False, runtime_env={"env_vars": env})
        try:
            yield ray
        finally:
            ray.shutdown()
            shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cfg(tiny):
    from grail_megatron.config import compose

    return compose(["model_preset=tiny", "cluster=cpu", f"actor_rollout_ref.model.path={tiny['path']}",
                    f"trainer.n_gpus_per_node={TP}", f"actor_rollout_ref.rollout.tensor_model_parallel_size={TP}",
                    "actor_rollout_ref.rollout.dtype=float32", "actor_rollout_ref.rollout.calculate_log_probs=true"])


@pytest.fixture(scope="module")
def stack(ray_cluster, cfg):
    """verl's worker group (TP ranks) + verl's LLMServerManager with one hf replica in HYBRID mode."""
    import cloudpickle
    from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
    from verl.workers.rollout.llm_server import LLMServerManager

    from grail_megatron.workers.hf_rollout import HFReplica, register_hf_rollout

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    register_hf_rollout()
    started = time.monotonic()
    pool = RayResourcePool(process_on_nodes=[TP], use_gpu=True, max_colocate_count=1, name_prefix="hfr")
    worker_cls = ray_cluster.remote(rollout_worker_class())
    wg = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=RayClassWithInitArgs(cls=worker_cls,
                                                                                 config=cfg.actor_rollout_ref))
    manager = LLMServerManager.create(config=cfg, worker_group=wg)
    (replica,) = manager.get_replicas()
    assert isinstance(replica, HFReplica)
    print(f"\nhf rollout stack up in {time.monotonic() - started:.1f} s")
    return {"wg": wg, "manager": manager, "replica": replica, "server": replica.server_handle}


def _generate(server, prompt, **params):
    import ray

    return ray.get(server.generate.remote(prompt_ids=prompt, sampling_params=params, request_id="t"), timeout=60)


# --------------------------------------------------------------------------- tests
def test_registration_is_idempotent_and_reaches_verl_lookups():
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY, get_rollout_class
    from verl.workers.rollout.replica import get_rollout_replica_class

    from grail_megatron.workers.hf_rollout import HFReplica, HFServerAdapter, register_hf_rollout

    register_hf_rollout()
    register_hf_rollout()
    assert get_rollout_replica_class("hf") is HFReplica
    assert get_rollout_class("hf", "async") is HFServerAdapter
    assert _ROLLOUT_REGISTRY[("vllm", "async")].endswith("ServerAdapter")  # verl's own entries untouched


def test_replica_launched_by_verl_in_hybrid_mode(stack):
    import ray
    from verl.workers.rollout.replica import RolloutMode

    replica = stack["replica"]
    assert replica.rollout_mode == RolloutMode.HYBRID
    assert len(replica.workers) == TP and replica.servers == [replica.server_handle]
    assert stack["manager"].get_addresses() == [replica.server_address]
    stats = ray.get(replica.server_handle.stats.remote())
    assert stats["device"] == "cpu"
    # the server sees the first worker's accelerator and still inherits the job's env
    accel = ray.get(replica.workers[0].__ray_call__.remote(lambda w: ray.get_runtime_context().get_accelerator_ids()))
    env = ray.get(replica.server_handle.__ray_call__.remote(
        lambda s: {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}))
    assert env == {"CUDA_VISIBLE_DEVICES": accel["GPU"][0], "OMP_NUM_THREADS": "1"}


def test_sampled_log_probs_equal_a_forward_pass(stack, tiny):
    prompt = tiny["tok"]("What is 2 + 5?")["input_ids"]
    out = _generate(stack["server"], prompt, max_tokens=12, **SAMPLING)
    assert out.stop_reason == "completed"
    assert 1 <= len(out.token_ids) <= 12 and len(out.log_probs) == len(out.token_ids)
    assert len(out.token_ids) == 12 or out.token_ids[-1] in tiny["eos_ids"]
    diff = _max_diff(out, tiny["model"], prompt)
    print(f"\nsingle request: {len(out.token_ids)} tokens, max |rollout - forward| log-prob = {diff:.2e}")
    assert diff < TOL


def test_concurrent_requests_are_batched_and_each_matches_its_own_forward(stack, tiny):
    """Different prompt lengths share one left-padded generate; every row equals its unpadded forward."""
    import ray

    server, tok = stack["server"], tiny["tok"]
    prompts = [tok(f"What is {a} + {b}?" + " ok" * a)["input_ids"] for a, b in [(1, 2), (4, 4), (0, 9), (7, 1),
                                                                                 (2, 2), (9, 9)]]
    before = ray.get(server.stats.remote())
    refs = [server.generate.remote(prompt_ids=p, sampling_params=dict(max_tokens=10, **SAMPLING), request_id=str(i))
            for i, p in enumerate(prompts)]
    outs = ray.get(refs, timeout=60)
    after = ray.get(server.stats.remote())
    diffs = [_max_diff(o, tiny["model"], p) for o, p in zip(outs, prompts)]
    batches = after["batches"] - before["batches"]
    print(f"\n{len(prompts)} concurrent requests in {batches} batches (largest {after['largest_batch']}); "
          f"max diff {max(diffs):.2e}")
    assert len({len(p) for p in prompts}) > 1
    assert max(diffs) < TOL
    assert batches < len(prompts) and after["largest_batch"] > 1


def test_seeded_requests_repeat_and_greedy_follows_argmax_until_eos(stack, tiny):
    server, prompt = stack["server"], tiny["tok"]("What is 5 + 5?")["input_ids"]
    first = _generate(server, prompt, max_tokens=8, seed=123, **SAMPLING)
    again = _generate(server, prompt, max_tokens=8, seed=123, **SAMPLING)
    other = _generate(server, prompt, max_tokens=8, seed=124, **SAMPLING)
    assert first.token_ids == again.token_ids and first.log_probs == again.log_probs
    assert other.token_ids != first.token_ids

    greedy = dict(SAMPLING, temperature=0, top_k=-1, top_p=1.0)  # verl's greedy validation settings
    out = _generate(server, tiny["eos_prompt"], max_tokens=6, **greedy)
    ref = tiny["greedy"]
    stop = next(i for i, t in enumerate(ref) if t in tiny["eos_ids"])  # <= 3 by construction
    assert out.token_ids == ref[: stop + 1] and out.stop_reason == "completed"
    assert _max_diff(out, tiny["model"], tiny["eos_prompt"], temperature=1.0) < TOL


def test_weights_pushed_through_the_adapter_drive_the_next_generation(stack, tiny):
    """verl's weight sync: all ranks drain the generator, rank 0 forwards, the server samples with them."""
    import copy

    import ray

    server, old = stack["server"], tiny["model"]
    new = copy.deepcopy(old)
    _sharpen(new, seed=2, scale=0.1)
    state = {k: v.clone() for k, v in new.state_dict().items()}

    results = ray.get(stack["wg"].push_weights(state=state, global_steps=3), timeout=60)
    assert sorted(r["rank"] for r in results) == list(range(TP))
    assert all(r["tensors"] == len(state) for r in results)  # every rank drained the generator
    assert [r["forwarded"] for r in sorted(results, key=lambda r: r["rank"])] == [True] + [False] * (TP - 1)
    stats = ray.get(server.stats.remote())
    assert stats["weight_updates"] == 1 and stats["tensors_loaded"] == len(state)
    assert stats["gate_closed_by"] == []

    prompt = tiny["tok"]("What is 8 + 1?")["input_ids"]
    try:
        out = _generate(server, prompt, max_tokens=12, seed=5, **SAMPLING)
        new_diff, old_diff = _max_diff(out, new, prompt), _max_diff(out, old, prompt)
        print(f"\nafter push: max diff vs new weights {new_diff:.2e}, vs old weights {old_diff:.2f}")
        assert new_diff < TOL and old_diff > 0.1
        assert out.extra_fields["global_steps"] == 3
    finally:  # the tests below run against the original weights
        restore = {k: v.clone() for k, v in old.state_dict().items()}
        ray.get(stack["wg"].push_weights(state=restore, global_steps=4), timeout=60)
    out = _generate(server, prompt, max_tokens=6, seed=5, **SAMPLING)
    assert _max_diff(out, old, prompt) < TOL and out.extra_fields["global_steps"] == 4


def test_abort_stops_a_running_generation_and_parks_new_requests_until_resume(stack, tiny):
    import ray

    server, prompt = stack["server"], tiny["tok"]("What is 6 + 6?")["input_ids"]
    long = server.generate.remote(prompt_ids=prompt, request_id="long",
                                  sampling_params=dict(max_tokens=80, ignore_eos=True, **SAMPLING))
    deadline = time.monotonic() + 30
    while not ray.get(server.stats.remote())["running"]:
        assert time.monotonic() < deadline, "the long request never started"
        time.sleep(0.002)
    asyncio.run(stack["replica"].abort_all_requests())  # verl's replica call, as its async trainers make
    out = ray.get(long, timeout=60)
    assert out.stop_reason == "aborted" and len(out.token_ids) < 80
    assert _max_diff(out, tiny["model"], prompt) < TOL  # the partial tokens keep exact log-probs

    parked = server.generate.remote(prompt_ids=prompt, request_id="parked",
                                    sampling_params=dict(max_tokens=4, **SAMPLING))
    ready, _ = ray.wait([parked], timeout=0.5)
    assert not ready  # the gate stays closed until verl resumes generation
    asyncio.run(stack["replica"].resume_generation())
    assert ray.get(parked, timeout=60).stop_reason == "completed"

    asyncio.run(stack["replica"].abort_all_requests(reject_request=True))  # replica leaving rotation
    rejected = _generate(server, prompt, max_tokens=4, **SAMPLING)
    assert (rejected.stop_reason, rejected.token_ids) == ("aborted", [])
    asyncio.run(stack["replica"].resume_generation())
    for call in ("sleep", "wake_up", "clear_kv_cache"):  # what verl's sync trainer calls between steps
        asyncio.run(getattr(stack["replica"], call)())
    assert _generate(server, prompt, max_tokens=4, **SAMPLING).stop_reason == "completed"
    assert ray.get(server.stats.remote())["gate_closed_by"] == []


def test_verl_single_turn_agent_loop_returns_rollout_log_probs_the_actor_would_compute(stack, cfg, tiny):
    """verl's AgentLoopWorker + single-turn loop + client + load balancer against the hf server."""
    import numpy as np
    from verl import DataProto
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

    worker = AgentLoopWorker(cfg, stack["manager"].get_client())
    chats = [[{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in [(1, 1), (2, 7), (9, 3)]]
    raw_prompt = np.empty(len(chats), dtype=object)
    raw_prompt[:] = chats
    batch = DataProto.from_dict(non_tensors={"raw_prompt": raw_prompt,
                                             "data_source": np.array(["grail_gsm8k"] * len(chats), dtype=object)})
    batch.meta_info["global_steps"] = 1
    out = asyncio.run(worker.generate_sequences(batch))

    rollout = cfg.actor_rollout_ref.rollout
    assert out.batch["responses"].shape == (len(chats), rollout.response_length)
    assert out.batch["prompts"].shape == (len(chats), rollout.prompt_length)
    mask = out.batch["response_mask"].bool()
    assert mask.sum(1).min() >= 1
    with torch.no_grad():  # what verl's actor computes as old log-probs, here with the HF model
        logits = tiny["model"](input_ids=out.batch["input_ids"], attention_mask=out.batch["attention_mask"],
                               position_ids=out.batch["position_ids"]).logits.float()
        logits = logits[:, rollout.prompt_length - 1: -1] / rollout.temperature
        actor = torch.log_softmax(logits, -1).gather(-1, out.batch["responses"].unsqueeze(-1)).squeeze(-1)
    diff = (out.batch["rollout_log_probs"] - actor)[mask].abs().max().item()
    print(f"\nagent loop: {int(mask.sum())} response tokens, max |rollout - actor-style| log-prob = {diff:.2e}")
    assert diff < TOL


# --------------------------------------------------------------------------- full_determinism
@pytest.fixture(scope="module")
def deterministic_servers(tiny):
    """Two independent servers (two processes' worth of state) with rollout.full_determinism=true,
    built in this process without Ray: the seeding is the server's own logic."""
    from grail_megatron.config import compose
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.rollout.replica import RolloutMode

    from grail_megatron.workers.hf_rollout import HFRolloutServer

    cfg = compose(["model_preset=tiny", "cluster=cpu", f"actor_rollout_ref.model.path={tiny['path']}",
                   "actor_rollout_ref.rollout.dtype=float32", "actor_rollout_ref.rollout.full_determinism=true"])
    rollout, model = (omega_conf_to_dataclass(c) for c in (cfg.actor_rollout_ref.rollout, cfg.actor_rollout_ref.model))
    assert rollout.full_determinism
    return [HFRolloutServer(config=rollout, model_config=model, rollout_mode=RolloutMode.HYBRID, replica_rank=rank)
            for rank in (0, 1)]


def test_full_determinism_derives_seeds_from_step_prompt_and_occurrence(deterministic_servers, tiny):
    """Same weight version, same prompt, same occurrence -> the same tokens on another server, whatever
    ran there before and however the requests arrived together; the next occurrence, another
    step or another prompt -> other samples. Each such request runs alone (no shared batch)."""
    first, second = deterministic_servers
    tok = tiny["tok"]
    prompt, other = tok("What is 2 + 5?")["input_ids"], tok("What is 3 + 3?")["input_ids"]
    params = dict(max_tokens=12, **SAMPLING)

    async def step(server, global_steps, prompts, warm_up=0):
        await server.finish_weight_update(global_steps)  # what verl's weight sync pushes
        for i in range(warm_up):  # history that an unseeded batch counter would remember
            await server.generate(prompt_ids=other, sampling_params=dict(params, seed=i), request_id="w")
        outs = await asyncio.gather(*[server.generate(prompt_ids=p, sampling_params=params, request_id="det-0")
                                      for p in prompts])
        return [o.token_ids for o in outs]

    a = asyncio.run(step(first, 7, [prompt, prompt, prompt, other]))
    b = asyncio.run(step(second, 7, [prompt, other, prompt, prompt], warm_up=3))
    assert first.stats()["largest_batch"] == 1 and second.stats()["largest_batch"] == 1
    assert sorted(map(tuple, a[:3])) == sorted(map(tuple, [b[0], b[2], b[3]]))  # same group of samples
    assert a[0] == b[0] and a[3] == b[1]  # first occurrence of each prompt: identical
    assert len({tuple(t) for t in a[:3]}) == 3  # occurrences 0, 1, 2 of one prompt differ
    c = asyncio.run(step(second, 8, [prompt]))
    assert c[0] != a[0]  # a new weight version restarts occurrences with other seeds
    d = asyncio.run(step(first, 7, [prompt]))  # a new sync (as on a resume) counts occurrences from 0
    assert d[0] == a[0]
