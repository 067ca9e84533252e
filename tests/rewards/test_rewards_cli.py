"""`grail-megatron score`: scores a JSONL, prints the per-source table, writes --out."""
from __future__ import annotations

import json

from grail_megatron.cli import main as grail_main
from grail_megatron.rewards.cli import main as score_main
from rewards_cases import BUNDLED_FILE, load_parity_cases


def _pick_cases() -> list[dict]:
    cases = load_parity_cases(BUNDLED_FILE)
    by_id = {case["id"]: case for case in cases}
    return [by_id[i] for i in ("gsm8k-0003", "gsm8k-0002", "math-0002", "math-0006", "mbpp-0008", "mbpp-0014")]


def test_score_command_writes_results_and_prints_the_summary(tmp_path, capsys):
    cases = _pick_cases()
    source = tmp_path / "completions.jsonl"
    lines = []
    for i, case in enumerate(cases):
        row = {"data_source": case["data_source"], "ground_truth": case["ground_truth"], "extra_info": {"i": i}}
        row["completion" if i % 2 else "solution_str"] = case["solution_str"]  # both field names
        lines.append(json.dumps(row))
    source.write_text("\n".join(lines) + "\n\n")
    out = tmp_path / "nested" / "scores.jsonl"

    assert grail_main(["score", str(source), "--out", str(out), "--workers", "2"]) == 0

    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["score"] for r in results] == [c["expected_score"] for c in cases]
    assert [p.name for p in out.parent.iterdir()] == ["scores.jsonl"]  # no temp file left
    table = capsys.readouterr().out
    for needle in ("grail_gsm8k", "grail_math", "grail_mbpp", "score", "pass_rate", "strict"):
        assert needle in table
    # mean score of the two GSM8K rows: (1.0 + 0.39999999999999997) / 2
    score_row = next(line for line in table.splitlines() if " score " in line)
    assert "0.7000" in score_row and "0.6500" in score_row


def test_bad_json_is_reported_with_file_and_line(tmp_path, capsys):
    source = tmp_path / "bad.jsonl"
    good = json.dumps({"data_source": "grail_gsm8k", "solution_str": "x", "ground_truth": "#### 1"})
    source.write_text(f"{good}\n{good}\n{{not json\n")
    assert score_main([str(source)]) == 2
    assert f"{source}:3: invalid JSON" in capsys.readouterr().err


def test_missing_keys_and_missing_file_are_reported(tmp_path, capsys):
    source = tmp_path / "rows.jsonl"
    source.write_text(json.dumps({"data_source": "grail_math"}) + "\n")
    assert score_main([str(source)]) == 2
    assert f"{source}:1: missing key(s): ground_truth, solution_str (or completion)" in capsys.readouterr().err
    assert score_main([str(tmp_path / "absent.jsonl")]) == 2
    assert "absent.jsonl: no such file" in capsys.readouterr().err
