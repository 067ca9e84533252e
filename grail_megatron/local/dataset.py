"""verl's parquet prompt files, read the way verl's RLHFDataset reads them.

Each row has `prompt` (chat messages), `data_source`, `reward_model.ground_truth` and an
optional `extra_info`. Prompts are rendered with the tokenizer's chat template
(`add_generation_prompt=True`), as verl does. Batches are a pure function of (seed, step):
the loop can resume at any step without saving a sampler state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REQUIRED_COLUMNS = ("data_source", "reward_model")


class DataError(ValueError):
    """A prompt file is missing, malformed, or has a prompt longer than allowed."""


@dataclass(frozen=True)
class PromptRecord:
    prompt_ids: list[int]
    data_source: str
    ground_truth: Any
    extra_info: dict


def _to_python(value: Any) -> Any:
    """Parquet gives numpy arrays for lists; the chat template and the rewards want lists/dicts."""
    if isinstance(value, np.ndarray):
        return [_to_python(v) for v in value.tolist()]
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_python(v) for v in value]
    return value


def _read_table(path: str):
    import pandas as pd

    if not Path(path).is_file():
        raise DataError(f"prompt file {path} does not exist")
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"prompt file {path} is not a readable parquet file: {exc}") from exc


def load_prompts(files: tuple[str, ...], tokenizer, max_prompt_length: int, prompt_key: str = "prompt",
                 max_samples: int = -1) -> list[PromptRecord]:
    """Tokenise every row of `files`; a bad row fails with its file and row number."""
    records: list[PromptRecord] = []
    for path in files:
        table = _read_table(path)
        missing = [c for c in (prompt_key, *REQUIRED_COLUMNS) if c not in table.columns]
        if missing:
            raise DataError(f"prompt file {path} lacks column(s) {missing}; verl's format needs "
                            f"{[prompt_key, *REQUIRED_COLUMNS]} (see `grail-megatron prepare-data`)")
        for row_number, row in enumerate(table.to_dict("records")):
            records.append(_record(row, path, row_number, tokenizer, max_prompt_length, prompt_key))
            if 0 < max_samples <= len(records):
                return records
    if not records:
        raise DataError(f"prompt files {list(files)} contain no rows")
    return records


def _record(row: dict, path: str, row_number: int, tokenizer, max_prompt_length: int, prompt_key: str) -> PromptRecord:
    where = f"{path} row {row_number}"
    messages = _to_python(row[prompt_key])
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "content" in m for m in messages):
        raise DataError(f"{where}: column {prompt_key!r} must be a list of chat messages, got {messages!r:.200}")
    reward_model = _to_python(row["reward_model"])
    if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
        raise DataError(f"{where}: column 'reward_model' must be a dict with 'ground_truth'")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    ids = list(ids)
    if len(ids) > max_prompt_length:
        raise DataError(f"{where}: prompt has {len(ids)} tokens > data.max_prompt_length={max_prompt_length}")
    extra = _to_python(row.get("extra_info")) or {}
    return PromptRecord(ids, str(row["data_source"]), reward_model["ground_truth"], dict(extra))


class PromptSampler:
    """verl's training order: the sampler verl's trainer builds (`create_rl_sampler`: a seeded
    RandomSampler, or sequential without shuffle), cut into drop-last batches epoch after epoch,
    as verl's StatefulDataLoader does; step k's batch is found by replaying the epochs before it,
    so it depends on (seed, step) alone and both paths see the same prompts at the same step."""

    def __init__(self, num_records: int, batch_size: int, seed: int | None, shuffle: bool = True):
        if batch_size > num_records:
            raise DataError(f"data.train_batch_size={batch_size} exceeds the {num_records} training prompts")
        self.num_records, self.batch_size, self.seed, self.shuffle = num_records, batch_size, seed, shuffle
        self.batches_per_epoch = num_records // batch_size  # drop_last, as verl's dataloader
        self._epochs: list[list[int]] = []
        self._sampler = None

    def _verl_sampler(self):
        from omegaconf import OmegaConf
        from verl.trainer.ppo.utils import create_rl_sampler

        return create_rl_sampler(OmegaConf.create({"shuffle": self.shuffle, "seed": self.seed}), range(self.num_records))

    def _order(self, epoch: int) -> list[int]:
        if self._sampler is None:
            self._sampler = self._verl_sampler()
        while len(self._epochs) <= epoch:  # each pass over the sampler is one epoch, as in verl
            self._epochs.append([int(i) for i in self._sampler])
        return self._epochs[epoch]

    def indices(self, step: int) -> list[int]:
        """Record indices of 1-based training `step`."""
        epoch, within = divmod(step - 1, self.batches_per_epoch)
        start = within * self.batch_size
        return self._order(epoch)[start:start + self.batch_size]

    def dataloader_state(self, step: int) -> dict:
        """The state_dict verl's StatefulDataLoader has after `step` training batches (verl's
        trainer saves it as data.pt and restores it on resume): the verl path resumes a local
        checkpoint at the next batch of the same order."""
        from torchdata.stateful_dataloader import StatefulDataLoader

        loader = StatefulDataLoader(range(self.num_records), batch_size=self.batch_size, drop_last=True,
                                    sampler=self._verl_sampler(), collate_fn=list)
        taken = 0
        while taken < step:
            for _ in loader:
                taken += 1
                if taken == step:
                    break
        return loader.state_dict()
