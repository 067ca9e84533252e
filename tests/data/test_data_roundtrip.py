"""Round trip: every prepared fixture row, answered with its own gold inside GRAIL's tags,
gets the full reward from `grail_megatron.rewards.compute_score_batch`."""

import json
import re

import pyarrow.parquet as pq
import pytest

from grail_megatron.data import prepare_dataset
from grail_megatron.data.sources import FIXTURES_DIR
from grail_megatron.prompts import REASONING_END, REASONING_START, SOLUTION_END, SOLUTION_START
from grail_megatron.rewards import compute_score_batch


def _mbpp_reference_code():
    code = {}
    for split in ("train", "validation", "test"):
        for line in (FIXTURES_DIR / "mbpp" / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            code[row["task_id"]] = row["code"]
    return code


def _gold_answer(row, reference_code):
    gold = row["reward_model"]["ground_truth"]
    if row["extra_info"]["dataset"] == "gsm8k":
        return re.findall(r"####\s*(.+)", gold)[-1].strip()
    if row["extra_info"]["dataset"] == "mbpp":
        return reference_code[row["extra_info"]["task_id"]]
    return gold


@pytest.mark.parametrize("dataset", ["gsm8k", "math", "mbpp"])
def test_each_fixture_gold_scores_full_marks(dataset, tmp_path):
    result = prepare_dataset(dataset, tmp_path, "fixtures")
    reference_code = _mbpp_reference_code()
    items = []
    for path in result.files.values():
        for row in pq.read_table(path).to_pylist():
            answer = _gold_answer(row, reference_code)
            completion = f"{REASONING_START}\nWorking it out.\n{REASONING_END}\n{SOLUTION_START}{answer}{SOLUTION_END}"
            items.append(
                {
                    "data_source": row["data_source"],
                    "solution_str": completion,
                    "ground_truth": row["reward_model"]["ground_truth"],
                    "extra_info": row["extra_info"],
                }
            )
    scores = compute_score_batch(items)
    failed = [
        (i["extra_info"]["split"], i["extra_info"]["index"], s)
        for i, s in zip(items, scores, strict=True)
        if s["score"] != pytest.approx(1.0)
    ]
    assert not failed
    assert len(items) == sum(s.rows for s in result.splits)
