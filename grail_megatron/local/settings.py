"""Typed view of the verl config keys the local loop reads.

The local loop takes the SAME composed config as the verl path (`grail_megatron.config.compose`)
and reads only the keys listed here, so a run can move between `train --local` and the GPU
cluster without renaming anything. Reading happens once, in `LocalSettings.from_config`; a
missing or wrong key fails there with the key's dotted name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ADV_ESTIMATORS = ("grpo",)
SUPPORTED_LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


class ConfigError(ValueError):
    """A config key the local loop needs is missing or has a value it cannot use."""


def _get(cfg: Any, dotted: str, default: Any = ...) -> Any:
    """Read `a.b.c` from a DictConfig/dict; without a default a missing key is an error."""
    node = cfg
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError) as exc:
            if default is not ...:
                return default
            raise ConfigError(f"config key {dotted!r} is missing") from exc
        if node is None and default is not ...:
            return default
    return node


def _files(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    files = tuple(os.path.expanduser(str(item)) for item in items)
    if not all(files):
        raise ConfigError(f"config key {key!r} has an empty file name: {items!r}")
    return files


def _positive(value: Any, key: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key {key!r} must be an integer, got {value!r}") from exc
    if number <= 0:
        raise ConfigError(f"config key {key!r} must be > 0, got {number}")
    return number


@dataclass(frozen=True)
class DataSettings:
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    train_batch_size: int  # prompts per step, as in verl
    max_prompt_length: int
    prompt_key: str = "prompt"
    shuffle: bool = True
    seed: int | None = None  # None: verl's sampler generator keeps torch's default seed
    val_max_samples: int = -1


@dataclass(frozen=True)
class SamplingSettings:
    n: int
    temperature: float
    top_p: float
    top_k: int  # verl's -1 means "no top-k"
    response_length: int
    do_sample: bool = True


@dataclass(frozen=True)
class ValidationSettings:
    """`actor_rollout_ref.rollout.val_kwargs` (verl's default: greedy, n=1)."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    do_sample: bool = False


@dataclass(frozen=True)
class ActorSettings:
    lr: float
    clip_ratio_low: float
    clip_ratio_high: float
    clip_ratio_c: float
    loss_agg_mode: str
    use_kl_loss: bool
    kl_loss_coef: float
    kl_loss_type: str
    ppo_mini_batch_size: int  # prompts per optimiser step, as in verl
    ppo_epochs: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    seed: int


@dataclass(frozen=True)
class TrainerSettings:
    total_training_steps: int
    save_freq: int
    test_freq: int
    default_local_dir: str
    logger: tuple[str, ...]
    project_name: str
    experiment_name: str
    val_before_train: bool
    resume_mode: str


@dataclass(frozen=True)
class LocalSettings:
    model_path: str
    data: DataSettings
    sampling: SamplingSettings
    actor: ActorSettings
    trainer: TrainerSettings
    norm_adv_by_std_in_grpo: bool
    validation: ValidationSettings = ValidationSettings()
    reward_fn_path: str | None = None
    reward_fn_name: str = "compute_score"
    reward_kwargs: dict = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.actor.tensor_model_parallel_size * self.actor.pipeline_model_parallel_size

    @classmethod
    def from_config(cls, cfg: Any) -> "LocalSettings":
        arr = "actor_rollout_ref"
        adv = str(_get(cfg, "algorithm.adv_estimator"))
        if adv not in SUPPORTED_ADV_ESTIMATORS:
            raise ConfigError(f"config key 'algorithm.adv_estimator' = {adv!r}: the local loop runs {SUPPORTED_ADV_ESTIMATORS}")
        agg = str(_get(cfg, f"{arr}.actor.loss_agg_mode"))
        if agg not in SUPPORTED_LOSS_AGG_MODES:
            raise ConfigError(f"config key '{arr}.actor.loss_agg_mode' = {agg!r}; choose from {SUPPORTED_LOSS_AGG_MODES}")
        train_files = _files(_get(cfg, "data.train_files"), "data.train_files")
        if not train_files:
            raise ConfigError("config key 'data.train_files' is empty")
        n = _positive(_get(cfg, f"{arr}.rollout.n"), f"{arr}.rollout.n")
        total_steps = _get(cfg, "trainer.total_training_steps", None)
        if total_steps is None:
            raise ConfigError("config key 'trainer.total_training_steps' must be set for the local loop")
        logger = _get(cfg, "trainer.logger", ["console"])
        logger = (logger,) if isinstance(logger, str) else tuple(str(x) for x in logger)
        clip = float(_get(cfg, f"{arr}.actor.clip_ratio", 0.2))
        return cls(
            model_path=os.path.expanduser(str(_get(cfg, f"{arr}.model.path"))),
            data=DataSettings(
                train_files=train_files,
                val_files=_files(_get(cfg, "data.val_files", None), "data.val_files"),
                train_batch_size=_positive(_get(cfg, "data.train_batch_size"), "data.train_batch_size"),
                max_prompt_length=_positive(_get(cfg, "data.max_prompt_length"), "data.max_prompt_length"),
                prompt_key=str(_get(cfg, "data.prompt_key", "prompt")),
                shuffle=bool(_get(cfg, "data.shuffle", True)),
                seed=None if _get(cfg, "data.seed", None) is None else int(_get(cfg, "data.seed")),
                val_max_samples=int(_get(cfg, "data.val_max_samples", -1)),
            ),
            sampling=SamplingSettings(
                n=n,
                temperature=float(_get(cfg, f"{arr}.rollout.temperature")),
                top_p=float(_get(cfg, f"{arr}.rollout.top_p")),
                top_k=int(_get(cfg, f"{arr}.rollout.top_k")),
                response_length=_positive(_get(cfg, f"{arr}.rollout.response_length"), f"{arr}.rollout.response_length"),
                do_sample=bool(_get(cfg, f"{arr}.rollout.do_sample", True)),
            ),
            actor=ActorSettings(
                lr=float(_get(cfg, f"{arr}.actor.optim.lr")),
                clip_ratio_low=float(_get(cfg, f"{arr}.actor.clip_ratio_low", clip)),
                clip_ratio_high=float(_get(cfg, f"{arr}.actor.clip_ratio_high", clip)),
                clip_ratio_c=float(_get(cfg, f"{arr}.actor.clip_ratio_c", 3.0)),
                loss_agg_mode=agg,
                use_kl_loss=bool(_get(cfg, f"{arr}.actor.use_kl_loss")),
                kl_loss_coef=float(_get(cfg, f"{arr}.actor.kl_loss_coef", 0.001)),
                kl_loss_type=str(_get(cfg, f"{arr}.actor.kl_loss_type", "low_var_kl")),
                ppo_mini_batch_size=_positive(
                    _get(cfg, f"{arr}.actor.ppo_mini_batch_size"), f"{arr}.actor.ppo_mini_batch_size"
                ),
                ppo_epochs=_positive(_get(cfg, f"{arr}.actor.ppo_epochs", 1), f"{arr}.actor.ppo_epochs"),
                tensor_model_parallel_size=_positive(
                    _get(cfg, f"{arr}.actor.megatron.tensor_model_parallel_size", 1),
                    f"{arr}.actor.megatron.tensor_model_parallel_size",
                ),
                pipeline_model_parallel_size=_positive(
                    _get(cfg, f"{arr}.actor.megatron.pipeline_model_parallel_size", 1),
                    f"{arr}.actor.megatron.pipeline_model_parallel_size",
                ),
                seed=int(_get(cfg, f"{arr}.actor.megatron.seed", 42)),
            ),
            trainer=TrainerSettings(
                total_training_steps=_positive(total_steps, "trainer.total_training_steps"),
                save_freq=int(_get(cfg, "trainer.save_freq", -1)),
                test_freq=int(_get(cfg, "trainer.test_freq", -1)),
                default_local_dir=os.path.expanduser(str(_get(cfg, "trainer.default_local_dir"))),
                logger=logger,
                project_name=str(_get(cfg, "trainer.project_name", "grail_megatron")),
                experiment_name=str(_get(cfg, "trainer.experiment_name", "local")),
                val_before_train=bool(_get(cfg, "trainer.val_before_train", False)),
                resume_mode=str(_get(cfg, "trainer.resume_mode", "auto")),
            ),
            validation=ValidationSettings(
                n=_positive(_get(cfg, f"{arr}.rollout.val_kwargs.n", 1), f"{arr}.rollout.val_kwargs.n"),
                temperature=float(_get(cfg, f"{arr}.rollout.val_kwargs.temperature", 0.0)),
                top_p=float(_get(cfg, f"{arr}.rollout.val_kwargs.top_p", 1.0)),
                top_k=int(_get(cfg, f"{arr}.rollout.val_kwargs.top_k", -1)),
                do_sample=bool(_get(cfg, f"{arr}.rollout.val_kwargs.do_sample", False)),
            ),
            norm_adv_by_std_in_grpo=bool(_get(cfg, "algorithm.norm_adv_by_std_in_grpo", True)),
            reward_fn_path=_get(cfg, "reward.custom_reward_function.path", None),
            reward_fn_name=str(_get(cfg, "reward.custom_reward_function.name", "compute_score")),
            reward_kwargs=dict(_get(cfg, "reward.custom_reward_function.reward_kwargs", {}) or {}),
        )
