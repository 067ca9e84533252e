"""Rewards and GRPO advantages for one rollout batch, with verl's functions.

Scores come from the same reward entry point verl's trainer calls
(`reward.custom_reward_function`, default `grail_megatron.rewards`); our own module is called
through `compute_score_batch` (process pool for CPU-heavy scoring). Advantages are verl's
`core_algos.compute_grpo_outcome_advantage` on the outcome reward placed on each response's
last token, exactly as verl's reward manager places it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

OUR_REWARD_MODULES = (None, "", "pkg://grail_megatron.rewards", "grail_megatron.rewards")


@dataclass
class Scored:
    scores: torch.Tensor  # [N] sequence scores
    components: dict[str, list[float]]  # every non-"score" key the reward returned, per sample


def load_reward_fn(path: str | None, name: str):
    """None for our batch scorer, else verl's loader for a user-supplied reward function."""
    if path in OUR_REWARD_MODULES and name == "compute_score":
        return None
    from verl.utils.import_utils import load_extern_object

    return load_extern_object(module_path=path, object_name=name)


def score(texts: list[str], data_sources: list[str], ground_truths: list, extra_infos: list[dict],
          reward_fn=None, reward_kwargs: dict | None = None) -> Scored:
    items = [
        dict(data_source=ds, solution_str=text, ground_truth=gt, extra_info=extra, **(reward_kwargs or {}))
        for text, ds, gt, extra in zip(texts, data_sources, ground_truths, extra_infos)
    ]
    if reward_fn is None:
        from grail_megatron.rewards import compute_score_batch

        results = compute_score_batch(items)
    else:
        results = [reward_fn(**item) for item in items]
    scores, components = [], defaultdict(list)
    for result in results:
        if isinstance(result, dict):
            scores.append(float(result["score"]))
            for key, value in result.items():
                if key != "score" and isinstance(value, (int, float, bool)):
                    components[key].append(float(value))
        else:
            scores.append(float(result))
    return Scored(torch.tensor(scores, dtype=torch.float32), dict(components))


def token_level_rewards(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """The sequence score on the last valid response token (verl's naive reward manager)."""
    rewards = torch.zeros(response_mask.shape, dtype=torch.float32)
    last = (response_mask.sum(-1) - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] = scores
    return rewards


def grpo_advantages(rewards: torch.Tensor, response_mask: torch.Tensor, group_ids: np.ndarray,
                    norm_adv_by_std_in_grpo: bool = True) -> torch.Tensor:
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    advantages, _ = compute_grpo_outcome_advantage(
        token_level_rewards=rewards,
        response_mask=response_mask,
        index=group_ids,
        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
    )
    return advantages
