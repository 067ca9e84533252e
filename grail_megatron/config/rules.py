"""Types, ranges and GRPO's own rules for a composed config, checked before anything else.

Each rule names the key, the bad value and the allowed values. They run before the planner
(which divides by these numbers) and before verl's validator (which asserts on them), so a
`rollout.n=0` or `tensor_model_parallel_size=two` is one line, never a traceback.

    config_problems(cfg)   -> list[str]   values of the config itself
    file_problems(cfg)     -> list[str]   model and data files a launch reads
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

AR = "actor_rollout_ref"
MISSING = object()


def _int(min_value: int, nullable: bool = False) -> tuple[Callable[[Any], bool], str, bool]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= min_value,
            f"an integer >= {min_value}" + (" (or null)" if nullable else ""), nullable)


def _float(check: Callable[[float], bool], allowed: str, nullable: bool = False):
    return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and check(float(v)),
            allowed + (" (or null)" if nullable else ""), nullable)


def _megatron(prefix: str) -> dict:
    return {
        f"{prefix}.megatron.tensor_model_parallel_size": _int(1),
        f"{prefix}.megatron.pipeline_model_parallel_size": _int(1),
        f"{prefix}.megatron.virtual_pipeline_model_parallel_size": _int(1, nullable=True),
        f"{prefix}.megatron.context_parallel_size": _int(1),
    }


# key -> (accepts(value), allowed values in words, null allowed)
RULES: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    "trainer.nnodes": _int(1),
    "trainer.n_gpus_per_node": _int(1),
    "trainer.total_epochs": _int(1),
    "trainer.total_training_steps": _int(1, nullable=True),
    "data.train_batch_size": _int(1),
    "data.max_prompt_length": _int(1),
    "data.max_response_length": _int(1),
    f"{AR}.rollout.n": _int(1),
    f"{AR}.actor.ppo_mini_batch_size": _int(1),
    f"{AR}.actor.ppo_micro_batch_size_per_gpu": _int(1, nullable=True),
    f"{AR}.actor.ppo_max_token_len_per_gpu": _int(1),
    f"{AR}.rollout.log_prob_micro_batch_size_per_gpu": _int(1, nullable=True),
    f"{AR}.ref.log_prob_micro_batch_size_per_gpu": _int(1, nullable=True),
    f"{AR}.actor.optim.lr": _float(lambda v: v > 0, "a number > 0"),
    f"{AR}.actor.optim.lr_warmup_steps": _int(-1),
    f"{AR}.actor.clip_ratio_low": _float(lambda v: v >= 0, "a number >= 0"),
    f"{AR}.actor.clip_ratio_high": _float(lambda v: v >= 0, "a number >= 0"),
    f"{AR}.rollout.tensor_model_parallel_size": _int(1),
    f"{AR}.rollout.gpu_memory_utilization": _float(lambda v: 0 < v <= 1, "a number in (0, 1]"),
    f"{AR}.rollout.temperature": _float(lambda v: v >= 0, "a number >= 0"),
    f"{AR}.rollout.top_p": _float(lambda v: 0 < v <= 1, "a number in (0, 1]"),
    f"{AR}.rollout.top_k": _int(-1),
    "grail.cluster.gpu_memory_gb": _float(lambda v: v >= 0, "a number >= 0"),
    **{f"grail.model.{k}": _int(1) for k in ("num_layers", "hidden_size", "num_attention_heads",
                                             "num_key_value_heads", "vocab_size", "intermediate_size")},
    **_megatron(f"{AR}.actor"),
    **_megatron(f"{AR}.ref"),
}


def value_at(cfg: Any, key: str) -> Any:
    """The resolved value at `key`, MISSING when the key is absent; raises ValueError when it
    cannot be resolved (a `${...}` that names a missing key or environment variable)."""
    try:
        return OmegaConf.select(cfg, key, default=MISSING, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise ValueError(f"{key}: cannot be resolved ({str(exc).splitlines()[0]})") from None


def config_problems(cfg: Any) -> list[str]:
    """Every type/range/GRPO rule the config breaks, one line each (empty: all good)."""
    problems: list[str] = []
    for key, (accepts, allowed, nullable) in RULES.items():
        try:
            value = value_at(cfg, key)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if value is MISSING or (value is None and nullable):
            continue
        if not accepts(value):
            problems.append(f"{key}={value!r} is not allowed: must be {allowed}")
    return problems + _grpo_problems(cfg, problems) + _device_problems(cfg)


def _grpo_problems(cfg: Any, earlier: list[str]) -> list[str]:
    if any(p.startswith(f"{AR}.rollout.n") for p in earlier):
        return []
    estimator = _safe(cfg, "algorithm.adv_estimator")
    n = _safe(cfg, f"{AR}.rollout.n")
    if str(estimator) == "grpo" and isinstance(n, int) and n < 2:
        return [f"{AR}.rollout.n={n} is not allowed with algorithm.adv_estimator=grpo: GRPO normalises rewards "
                "within a group of completions per prompt, so it needs n >= 2 (GRAIL uses 16)"]
    return []


def _device_problems(cfg: Any) -> list[str]:
    """GPU memory must be positive on a GPU cluster (0 means "no GPU", only for trainer.device=cpu)."""
    memory = _safe(cfg, "grail.cluster.gpu_memory_gb")
    if is_cpu_run(cfg) or not isinstance(memory, (int, float)) or memory > 0:
        return []
    return [f"grail.cluster.gpu_memory_gb={memory!r} is not allowed on a GPU cluster (trainer.device="
            f"{_safe(cfg, 'trainer.device')!r}): must be a number > 0 (GiB per GPU); 0 is for cluster=cpu"]


def is_cpu_run(cfg: Any) -> bool:
    return str(_safe(cfg, "trainer.device")) == "cpu"


def _safe(cfg: Any, key: str) -> Any:
    try:
        return value_at(cfg, key)
    except ValueError:
        return None


# ------------------------------------------------------------------------------ files
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def file_problems(cfg: Any) -> list[str]:
    """The model folder and data files a launch reads (remote URLs and hub ids are not checked)."""
    problems = _model_path_problems(cfg)
    for key in ("data.train_files", "data.val_files"):
        problems += _data_file_problems(cfg, key)
    return problems


def _model_path_problems(cfg: Any) -> list[str]:
    key = f"{AR}.model.path"
    try:
        path = value_at(cfg, key)
    except ValueError as exc:
        return [str(exc)]
    if path is MISSING or path is None:
        return [f"{key} is not set: point it at an HF model folder"]
    text = str(path)
    if Path(text).expanduser().exists() or _remote(text):
        return []
    if _hub_id(cfg, text):
        return []  # verl downloads it
    offline = " (HF_HUB_OFFLINE is set and it is not in the HF cache)" if HUB_ID.match(text) else ""
    return [f"{key}={text} does not exist{offline}: point it at an HF model folder (config.json, weights, "
            "tokenizer)"]


def _hub_id(cfg: Any, text: str) -> bool:
    """A hub id of a model that has one (the tiny preset has none), not a local path, hub reachable."""
    if not HUB_ID.match(text) or _safe(cfg, "grail.model.hf_id") is None:
        return False
    if Path(text.split("/")[0]).exists():
        return False  # a folder of ours that lacks the model
    if os.environ.get("HF_HUB_OFFLINE", "0") in ("", "0"):
        return True
    return _hub_cache_dir(text).is_dir()  # offline: only a model already in the HF cache


def _hub_cache_dir(repo: str) -> Path:
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    hub = Path(os.environ.get("HF_HUB_CACHE") or home / "hub")
    return hub / ("models--" + repo.replace("/", "--"))


def _data_file_problems(cfg: Any, key: str) -> list[str]:
    try:
        value = value_at(cfg, key)
    except ValueError as exc:
        return [str(exc)]
    if value is MISSING or value is None:
        return [f"{key} is not set: pick dataset=gsm8k|math|mbpp or give parquet files"]
    files = [value] if isinstance(value, str) else list(value)
    missing = [str(f) for f in files if not _remote(str(f)) and not Path(str(f)).expanduser().is_file()]
    if not missing:
        return []
    return [f"{key}: {', '.join(missing)} does not exist (write it with `grail-megatron prepare-data`, "
            "or set GRAIL_DATA_ROOT to the folder that holds <dataset>/train.parquet)"]


def _remote(text: str) -> bool:
    return "://" in text
