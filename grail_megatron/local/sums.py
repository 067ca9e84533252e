"""The synthetic "What is a + b?" task a tiny random-init model can learn on CPU (DESIGN.md s.8).

Rows are written in verl's parquet format and scored through the real GSM8K reward path
(`data_source` "grail_gsm8k", ground truth "#### s"), so the learning-signal check exercises
exactly the production reward. One-digit operands keep the reward spread inside each group
non-zero (two-digit sums only teach the format).
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

from grail_megatron.prompts import (
    DATA_SOURCES,
    REASONING_END,
    REASONING_START,
    SOLUTION_END,
    SOLUTION_START,
)

DATA_SOURCE = DATA_SOURCES["gsm8k"]


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def completion(a: int, b: int) -> str:
    """The target answer in GRAIL's tags (what the warm start teaches)."""
    s = a + b
    return f"{REASONING_START}{a} + {b} = {s}{REASONING_END}{SOLUTION_START}{s}{SOLUTION_END}"


def messages(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": question(a, b)}]


def row(a: int, b: int, split: str, index: int) -> dict:
    """One prompt in verl's schema."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": messages(a, b),
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": f"#### {a + b}"},
        "extra_info": {"split": split, "index": index, "question": question(a, b), "answer": f"#### {a + b}"},
    }


def pairs(count: int, seed: int, max_operand: int = 9) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(0, max_operand), rng.randint(0, max_operand)) for _ in range(count)]


def write_parquet(rows: list[dict], path: Path) -> Path:
    """Atomic parquet write (temp file in the same folder, then rename)."""
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    pd.DataFrame(rows).to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def write_dataset(out_dir: str | os.PathLike, train_size: int = 512, val_size: int = 64, seed: int = 0) -> dict[str, Path]:
    """Write `train.parquet` and `val.parquet` of random one-digit sums."""
    out = Path(out_dir)
    train = [row(a, b, "train", i) for i, (a, b) in enumerate(pairs(train_size, seed))]
    val = [row(a, b, "test", i) for i, (a, b) in enumerate(pairs(val_size, seed + 1))]
    return {"train": write_parquet(train, out / "train.parquet"), "val": write_parquet(val, out / "val.parquet")}


def tokenizer_texts() -> list[str]:
    """Every question and answer of the task: the corpus the local BPE is trained on."""
    texts = []
    for a in range(10):
        for b in range(10):
            texts += [question(a, b), completion(a, b)]
    return texts
