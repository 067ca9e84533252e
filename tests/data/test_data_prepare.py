"""Prepared files: verl's format (loaded by verl's own RLHFDataset), the prompt-length filter,
the CLI, and bad inputs (errors naming file/row/field, skip counts, no half-written output)."""

import json

import pyarrow.parquet as pq
import pytest

from grail_megatron.data import DataError, prepare_dataset
from grail_megatron.cli.prepare_data import main as cli_main
from grail_megatron.data.sources import FIXTURES_DIR
from grail_megatron.prompts import DATA_SOURCES, SYSTEM_PROMPT

FIXTURE_COUNTS = {
    "gsm8k": {"train": 24, "val": 12, "test": 12},
    "math": {"train": 39, "val": 3, "test": 14},
    "mbpp": {"train": 16, "val": 8, "test": 16},
}


def _rows(path):
    return pq.read_table(path).to_pylist()


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("dataset", ["gsm8k", "math", "mbpp"])
def test_fixtures_give_verl_records(dataset, tmp_path):
    result = prepare_dataset(dataset, tmp_path, "fixtures")
    assert {s.name: s.rows for s in result.splits} == FIXTURE_COUNTS[dataset]
    for split in FIXTURE_COUNTS[dataset]:
        rows = _rows(tmp_path / f"{split}.parquet")
        for i, row in enumerate(rows):
            assert row["data_source"] == DATA_SOURCES[dataset]
            assert row["ability"] == ("code" if dataset == "mbpp" else "math")
            assert [m["role"] for m in row["prompt"]] == ["system", "user"]
            assert row["prompt"][0]["content"] == SYSTEM_PROMPT
            assert row["prompt"][1]["content"].strip()
            assert row["reward_model"]["style"] == "rule" and row["reward_model"]["ground_truth"]
            assert row["extra_info"]["split"] == split and row["extra_info"]["index"] == i
            assert row["extra_info"]["dataset"] == dataset
    if dataset == "mbpp":
        first = _rows(tmp_path / "train.parquet")[0]
        assert first["extra_info"]["task_id"] == 601
        assert first["prompt"][1]["content"].endswith("\n\ndef second_largest(nums):\n    pass")
        assert json.loads(first["reward_model"]["ground_truth"])["test_imports"] == []


def test_math_fbox_fixture_row_gets_its_fbox_answer(tmp_path):
    prepare_dataset("math", tmp_path, "fixtures", math_val_size=0)
    golds = {r["prompt"][1]["content"]: r["reward_model"]["ground_truth"] for r in _rows(tmp_path / "train.parquet")}
    assert golds["Solve $\\log_2 x = 5$."] == "32"


def _tokenizer(tmp_path):
    from grail_megatron.models.tiny import train_tokenizer

    texts = [json.dumps(r) for p in sorted(FIXTURES_DIR.rglob("*.jsonl")) for r in p.read_text().splitlines()]
    return train_tokenizer(texts + [SYSTEM_PROMPT], tmp_path / "tok", vocab_size=400)


def test_verl_rlhf_dataset_loads_prepared_files_and_agrees_on_prompt_length(tmp_path):
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    tokenizer = _tokenizer(tmp_path)
    full = prepare_dataset("gsm8k", tmp_path / "full", "fixtures")
    lengths = sorted(
        len(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True)["input_ids"])
        for r in _rows(full.files["train"])
    )
    limit = lengths[len(lengths) // 2]  # about half the prompts are longer than this
    expected_kept = sum(n <= limit for n in lengths)
    assert 0 < expected_kept < len(lengths)

    cut = prepare_dataset("gsm8k", tmp_path / "cut", "fixtures", tokenizer=tokenizer, max_prompt_length=limit)
    train = {s.name: s for s in cut.splits}["train"]
    assert (train.rows, train.too_long) == (expected_kept, len(lengths) - expected_kept)

    config = OmegaConf.create(
        {
            "max_prompt_length": limit,
            "filter_overlong_prompts": True,
            "filter_overlong_prompts_workers": None,
            "cache_dir": str(tmp_path / "verl_cache"),
        }
    )
    verl_full = RLHFDataset(str(full.files["train"]), tokenizer, config)
    verl_cut = RLHFDataset(str(cut.files["train"]), tokenizer, config)
    assert len(verl_full) == len(verl_cut) == expected_kept  # verl drops exactly what we dropped
    item = verl_cut[0]
    assert item["data_source"] == "grail_gsm8k"
    assert item["raw_prompt"][0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert item["reward_model"]["ground_truth"].endswith("#### 14")
    assert item["index"] == 0 and item["extra_info"]["dataset"] == "gsm8k"


def test_cli_writes_files_and_prints_the_summary(tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Answer briefly.\n")
    code = cli_main(
        [
            "--dataset",
            "mbpp",
            "--source",
            "fixtures",
            "--out",
            str(tmp_path / "o"),
            "--mbpp-scheme",
            "grail",
            "--system-prompt-file",
            str(prompt),
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "mbpp from fixtures" in out and "train" in out and "28" in out and "12" in out
    rows = _rows(tmp_path / "o" / "val.parquet")
    assert len(rows) == 12 and rows[0]["prompt"][0]["content"] == "Answer briefly."


def test_cli_rejects_inconsistent_options_and_reports_data_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--dataset", "gsm8k", "--out", str(tmp_path), "--source", "fixtures", "--tokenizer", "x"])
    assert exit_info.value.code == 2
    assert "--max-prompt-length" in capsys.readouterr().err
    assert cli_main(["--dataset", "gsm8k", "--out", str(tmp_path / "o"), "--source", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: source folder does not exist" in capsys.readouterr().err


def _gsm8k_source(root, train_rows):
    _jsonl(root / "train.jsonl", train_rows)
    _jsonl(root / "test.jsonl", [{"question": "q?", "answer": "#### 1"}])
    return root


def test_missing_field_names_file_row_and_field(tmp_path):
    src = _gsm8k_source(tmp_path / "src", [{"question": "a?", "answer": "#### 1"}, {"question": "b?"}])
    with pytest.raises(DataError) as info:
        prepare_dataset("gsm8k", tmp_path / "out", src)
    assert str(info.value) == f"{src / 'train.jsonl'}, row 2, field 'answer': missing required field"
    assert not (tmp_path / "out").exists()


def test_wrong_type_and_invalid_json_name_the_row(tmp_path):
    src = _gsm8k_source(tmp_path / "src", [{"question": 7, "answer": "#### 1"}])
    with pytest.raises(DataError, match=r"train.jsonl, row 1, field 'question': expected str, got int"):
        prepare_dataset("gsm8k", tmp_path / "out", src)
    (src / "train.jsonl").write_text('{"question": "a?", "answer": "#### 1"}\n{"question": \n')
    with pytest.raises(DataError, match=r"train.jsonl, row 2: invalid JSON"):
        prepare_dataset("gsm8k", tmp_path / "out", src)


def test_unscorable_rows_are_counted_or_fatal_in_strict_mode(tmp_path):
    src = _gsm8k_source(
        tmp_path / "src",
        [
            {"question": "a?", "answer": "#### 1"},
            {"question": "b?", "answer": "It is 2."},
            {"question": "c?", "answer": "#### 3"},
        ],
    )
    result = prepare_dataset("gsm8k", tmp_path / "out", src)
    train = {s.name: s for s in result.splits}["train"]
    assert (train.rows, dict(train.skipped)) == (2, {"gsm8k answer has no '#### <final answer>' line": 1})
    # indices stay those of the source split, so a skipped row leaves a gap
    assert [r["extra_info"]["index"] for r in _rows(tmp_path / "out" / "train.parquet")] == [0, 2]
    with pytest.raises(DataError, match=r"train.jsonl, row 2, field 'answer': gsm8k answer has no '####"):
        prepare_dataset("gsm8k", tmp_path / "strict", src, strict=True)


def test_math_solution_without_box_is_skipped_after_the_split(tmp_path):
    from grail_megatron.data.splits import MATH_SUBJECTS

    for subject in MATH_SUBJECTS:
        rows = [
            {"problem": f"{subject} {i}", "level": "Level 1", "type": "x", "solution": f"$\\boxed{{{i}}}$"}
            for i in range(15)
        ]
        if subject == "geometry":
            rows[3]["solution"] = "The answer is 3."
        _jsonl(tmp_path / "src" / subject / "train.jsonl", rows)
        _jsonl(tmp_path / "src" / subject / "test.jsonl", rows[:2])
    result = prepare_dataset("math", tmp_path / "out", tmp_path / "src")
    counts = {s.name: (s.rows, s.candidates, sum(s.skipped.values())) for s in result.splits}
    assert counts["val"][0] + counts["train"][0] == 104 and counts["val"][1] == 7  # 105 rows, 1/15 to val
    assert sum(c[2] for c in counts.values()) == 1


def test_unreadable_parquet_and_missing_split_file(tmp_path):
    src = tmp_path / "src"
    _jsonl(src / "test.jsonl", [{"question": "q?", "answer": "#### 1"}])
    (src / "train.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"train.parquet: cannot read parquet"):
        prepare_dataset("gsm8k", tmp_path / "out", src)
    (src / "train.parquet").unlink()
    with pytest.raises(DataError, match=r"no 'train' file for config 'main'"):
        prepare_dataset("gsm8k", tmp_path / "out", src)


def test_a_failed_run_leaves_earlier_outputs_untouched(tmp_path):
    out = tmp_path / "out"
    prepare_dataset("gsm8k", out, "fixtures")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    src = _gsm8k_source(tmp_path / "src", [{"question": "a?", "answer": "#### 1"}, {"answer": "#### 2"}])
    with pytest.raises(DataError):
        prepare_dataset("gsm8k", out, src)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_hub_source_offline_names_the_dataset(tmp_path):
    # tests/conftest.py sets HF_DATASETS_OFFLINE=1 and the build machines have no HF cache
    with pytest.raises(DataError, match=r"hf:openai/gsm8k/main/train: cannot load from the Hugging Face hub"):
        prepare_dataset("gsm8k", tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists()
