"""GRAIL's splits on synthetic sources with the real row counts (nothing is downloaded)."""

import hashlib
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grail_megatron.data import prepare_dataset
from grail_megatron.data.splits import MATH_SUBJECTS, math_val_counts

MATH_TRAIN = dict(zip(MATH_SUBJECTS, (1744, 771, 870, 1295, 869, 1205, 746), strict=True))
MATH_TEST = dict(zip(MATH_SUBJECTS, (1187, 474, 479, 903, 540, 871, 546), strict=True))


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rows(path):
    return pq.read_table(path).to_pylist()


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.parquet"))}


@pytest.fixture(scope="module")
def gsm8k_source(tmp_path_factory):
    """An HF-snapshot layout: main/<split>-00000-of-00001.parquet."""
    root = tmp_path_factory.mktemp("gsm8k_src")
    (root / "main").mkdir()
    for split, n in (("train", 7473), ("test", 1319)):
        rows = [{"question": f"{split} question {i}?", "answer": f"Work {i}.\n#### {i}"} for i in range(n)]
        pq.write_table(pa.Table.from_pylist(rows), root / "main" / f"{split}-00000-of-00001.parquet")
    return root


@pytest.fixture(scope="module")
def math_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("math_src")
    for subject in MATH_SUBJECTS:
        for split, sizes in (("train", MATH_TRAIN), ("test", MATH_TEST)):
            rows = [
                {
                    "problem": f"{subject} {split} {i}",
                    "level": f"Level {i % 5 + 1}",
                    "type": subject,
                    "solution": f"Hence $\\boxed{{\\frac{{{i}}}{{7}}}}$.",
                }
                for i in range(sizes[subject])
            ]
            _jsonl(root / subject / f"{split}.jsonl", rows)
    return root


@pytest.fixture(scope="module")
def mbpp_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("mbpp_src")
    for split, n, first_id in (("train", 374, 601), ("validation", 90, 511), ("test", 500, 11)):
        rows = [
            {
                "task_id": first_id + i,
                "text": f"Write f{first_id + i}.",
                "code": f"def f{first_id + i}(x):\r\n  return x",
                "test_list": [f"assert f{first_id + i}(1) == 1"],
                "test_setup_code": "",
                "challenge_test_list": [],
            }
            for i in range(n)
        ]
        _jsonl(root / f"{split}.jsonl", rows)
    return root


def test_gsm8k_train_7473_and_val_equals_test_1319(gsm8k_source, tmp_path):
    result = prepare_dataset("gsm8k", tmp_path, gsm8k_source)
    assert {s.name: s.rows for s in result.splits} == {"train": 7473, "val": 1319, "test": 1319}
    train, val, test = (_rows(tmp_path / f"{s}.parquet") for s in ("train", "val", "test"))
    assert [r["prompt"][1]["content"] for r in train] == [f"train question {i}?" for i in range(7473)]
    assert [r["reward_model"]["ground_truth"] for r in val] == [f"Work {i}.\n#### {i}" for i in range(1319)]
    assert [r["prompt"] for r in val] == [r["prompt"] for r in test]
    assert {r["extra_info"]["split"] for r in val} == {"val"} and {r["extra_info"]["split"] for r in test} == {"test"}


def test_math_stratified_7000_500_with_grails_membership(math_source, tmp_path):
    result = prepare_dataset("math", tmp_path, math_source)
    assert {s.name: s.rows for s in result.splits} == {"train": 7000, "val": 500, "test": 5000}
    val = _rows(tmp_path / "val.parquet")
    train = _rows(tmp_path / "train.parquet")
    per_subject = [sum(r["extra_info"]["subject"] == s for r in val) for s in MATH_SUBJECTS]
    assert per_subject == [116, 51, 58, 86, 58, 80, 51]

    # the rule as DESIGN.md states it: one Random(42) shuffles each subject's indices in turn
    rng = random.Random(42)
    expected = set()
    for subject, k in zip(MATH_SUBJECTS, per_subject, strict=True):
        order = list(range(MATH_TRAIN[subject]))
        rng.shuffle(order)
        expected |= {(subject, i) for i in order[:k]}
    got_val = {(r["extra_info"]["subject"], r["extra_info"]["source_index"]) for r in val}
    got_train = {(r["extra_info"]["subject"], r["extra_info"]["source_index"]) for r in train}
    assert got_val == expected
    assert not got_val & got_train and len(got_val | got_train) == 7500
    # subjects stay in order and problems in source order inside each split
    keys = [
        (MATH_SUBJECTS.index(s), i)
        for s, i in ((r["extra_info"]["subject"], r["extra_info"]["source_index"]) for r in train)
    ]
    assert keys == sorted(keys)
    assert [r["extra_info"]["index"] for r in val] == list(range(500))
    assert val[0]["reward_model"]["ground_truth"].startswith("\\frac{")
    test = _rows(tmp_path / "test.parquet")
    assert [sum(r["extra_info"]["subject"] == s for r in test) for s in MATH_SUBJECTS] == list(MATH_TEST.values())


def test_math_val_counts_round_like_grail():
    assert math_val_counts(list(MATH_TRAIN.values()), 500) == [116, 51, 58, 86, 58, 80, 51]
    assert math_val_counts([10, 10, 10], 4) == [1, 1, 2]  # round(4/3)=1 twice, the remainder last
    with pytest.raises(ValueError, match="exceeds"):
        math_val_counts([1, 1], 3)


def test_mbpp_hf_scheme_374_90_500(mbpp_source, tmp_path):
    result = prepare_dataset("mbpp", tmp_path, mbpp_source)
    assert {s.name: s.rows for s in result.splits} == {"train": 374, "val": 90, "test": 500}
    assert [r["extra_info"]["task_id"] for r in _rows(tmp_path / "val.parquet")] == list(range(511, 601))


def test_mbpp_grail_scheme_774_190_redistributes_the_test_set(mbpp_source, tmp_path):
    result = prepare_dataset("mbpp", tmp_path, mbpp_source, mbpp_scheme="grail")
    assert {s.name: s.rows for s in result.splits} == {"train": 774, "val": 190}
    assert not (tmp_path / "test.parquet").exists()
    order = list(range(500))
    random.Random(42).shuffle(order)
    train_ids = [r["extra_info"]["task_id"] for r in _rows(tmp_path / "train.parquet")]
    val_ids = [r["extra_info"]["task_id"] for r in _rows(tmp_path / "val.parquet")]
    assert train_ids == list(range(601, 975)) + [11 + i for i in order[:400]]
    assert val_ids == list(range(511, 601)) + [11 + i for i in order[400:]]


def test_reruns_are_byte_identical(math_source, mbpp_source, tmp_path):
    for dataset, source in (("math", math_source), ("mbpp", mbpp_source)):
        first, second = tmp_path / f"{dataset}1", tmp_path / f"{dataset}2"
        prepare_dataset(dataset, first, source)
        prepare_dataset(dataset, second, source)
        assert _digest(first) == _digest(second)
        assert len(_digest(first)) == 3
        prepare_dataset(dataset, first, source)  # overwriting in place gives the same bytes too
        assert _digest(first) == _digest(second)
        assert not [p for p in first.iterdir() if p.name.startswith(".")]  # no temp files left
