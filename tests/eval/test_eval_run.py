"""End to end on CPU: a tiny random-init Qwen2 sampled with HF generate on the fixtures,
scored with the real rewards; determinism, resume, errors before generation, and
`evaluate` (the validation entry point) with a scripted generate function."""

import json
import re

import pyarrow.parquet as pq
import pytest

from grail_megatron.data import prepare_dataset
from grail_megatron.eval import evaluate
from grail_megatron.cli.eval import main as eval_main
from grail_megatron.eval.runner import EvalError, EvalJob, run
from grail_megatron.prompts import REASONING_END, REASONING_START, SOLUTION_END, SOLUTION_START, SYSTEM_PROMPT
from grail_megatron.rewards import compute_score

ARGS = [
    "--dataset",
    "gsm8k",
    "--source",
    "fixtures",
    "--samples",
    "3",
    "--k",
    "1,3",
    "--limit",
    "4",
    "--max-new-tokens",
    "12",
    "--backend",
    "hf",
    "--seed",
    "7",
    "--no-progress",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from grail_megatron.models.tiny import make_tiny_model, train_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    data = prepare_dataset("gsm8k", root / "data", "fixtures")
    texts = [m["content"] for p in data.files.values() for r in pq.read_table(p).to_pylist() for m in r["prompt"]]
    train_tokenizer(texts + [SYSTEM_PROMPT], root / "tok")
    return make_tiny_model(
        root / "model", arch="qwen2", tokenizer_dir=root / "tok", hidden=32, layers=2, heads=2, kv_heads=1, seed=3
    )


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_run_scores_real_samples_and_is_deterministic(tiny_model, tmp_path, capsys):
    assert eval_main(["--model", str(tiny_model), "--out", str(tmp_path / "a"), *ARGS]) == 0
    table = " ".join(capsys.readouterr().out.split())  # rich wraps to the terminal width
    assert "gsm8k/val" in table and "4 tasks x 3 samples, 4 tasks generated in this run" in table
    assert "pass@3" in table and "success_rate_taskavg_all" in table

    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["metrics"]["tasks"] == 4 and summary["metrics"]["replicates"] == 12
    assert summary["sampling"] == {"temperature": 0.7, "top_p": 0.95, "top_k": 50, "max_new_tokens": 12}
    lines = _lines(tmp_path / "a" / "samples.jsonl")
    assert [line["task"] for line in lines] == ["val/0", "val/1", "val/2", "val/3"]
    gold = {
        f"val/{r['extra_info']['index']}": r["reward_model"]["ground_truth"]
        for r in pq.read_table(prepare_dataset("gsm8k", tmp_path / "d", "fixtures").files["val"]).to_pylist()
    }
    for line in lines:
        assert len(line["completions"]) == 3 and all(line["completions"])
        assert line["rewards"] == [
            compute_score("grail_gsm8k", c, gold[line["task"]])["score"] for c in line["completions"]
        ]
        assert line["successes"] == [r >= 0.6 for r in line["rewards"]]
    rewards = [r for line in lines for r in line["rewards"]]
    assert summary["metrics"]["reward_mean_all"] == pytest.approx(sum(rewards) / 12)

    assert eval_main(["--model", str(tiny_model), "--out", str(tmp_path / "b"), *ARGS]) == 0
    assert (tmp_path / "b" / "samples.jsonl").read_bytes() == (tmp_path / "a" / "samples.jsonl").read_bytes()


def test_resume_skips_written_tasks_and_matches_an_uninterrupted_run(tiny_model, tmp_path):
    full = run(_job(tiny_model, tmp_path / "full", limit=4))
    assert (full.tasks_total, full.tasks_generated) == (4, 4)
    complete = (tmp_path / "full" / "samples.jsonl").read_text().splitlines(keepends=True)

    first = run(_job(tiny_model, tmp_path / "resumed", limit=1))  # an earlier, shorter run
    assert first.tasks_generated == 1
    # then a crash while writing task 2: task 1 is complete, task 2 is a torn, unterminated line
    with open(tmp_path / "resumed" / "samples.jsonl", "a") as f:
        f.write(complete[1] + complete[2][:25])
    resumed = run(_job(tiny_model, tmp_path / "resumed", limit=4))
    assert resumed.tasks_generated == 2  # tasks 2 and 3; 0 and 1 were on disk
    assert (tmp_path / "resumed" / "samples.jsonl").read_text() == "".join(complete)
    assert resumed.metrics == full.metrics


def _job(model_dir, out_dir, **changes):
    from grail_megatron.eval.generation import SamplingSettings

    base = dict(
        model_dir=model_dir,
        dataset="gsm8k",
        out_dir=out_dir,
        source="fixtures",
        samples=3,
        ks=(1, 3),
        seed=7,
        limit=2,
        backend="hf",
        progress=False,
        sampling=SamplingSettings(max_new_tokens=12),
    )
    return EvalJob(**{**base, **changes})


def _never():
    raise AssertionError("a model was loaded although the job was invalid")


def test_bad_inputs_fail_before_any_generation(tiny_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "no_tok").mkdir()
    (tmp_path / "no_tok" / "config.json").write_text("{}")
    cases = [
        (_job(empty, tmp_path / "o"), "no config.json"),
        (_job(tmp_path / "no_tok", tmp_path / "o"), "no tokenizer"),
        (_job(tmp_path / "missing", tmp_path / "o"), "model folder does not exist"),
        (_job(tiny_model, tmp_path / "o", split="train"), "unknown split 'train'"),
        (_job(tiny_model, tmp_path / "o", ks=(1, 5)), r"every k must be in 1..samples=3, got k=\[1, 5\]"),
    ]
    for job, message in cases:
        with pytest.raises(EvalError, match=message):
            run(job, generator_factory=_never)
    data = prepare_dataset("mbpp", tmp_path / "mbpp", "fixtures", mbpp_scheme="grail")
    with pytest.raises(EvalError, match=r"no 'test' split here \(found: train, val\)"):
        run(
            _job(tiny_model, tmp_path / "o", dataset="mbpp", split="test", data_dir=data.out_dir),
            generator_factory=_never,
        )
    with pytest.raises(EvalError, match=r"data_source \['grail_mbpp'\], not gsm8k"):
        run(_job(tiny_model, tmp_path / "o", data_dir=data.out_dir), generator_factory=_never)


def test_output_of_a_different_run_is_refused(tiny_model, tmp_path):
    run(_job(tiny_model, tmp_path / "o"))
    with pytest.raises(EvalError, match=r"different run \(changed: seed\)"):
        run(_job(tiny_model, tmp_path / "o", seed=8), generator_factory=_never)
    assert run(_job(tiny_model, tmp_path / "o", seed=8, overwrite=True)).tasks_generated == 2


def test_evaluate_with_a_scripted_generator_gives_hand_computed_val_metrics(tmp_path):
    rows = pq.read_table(prepare_dataset("gsm8k", tmp_path, "fixtures").files["val"]).to_pylist()[:4]
    answers = [re.findall(r"####\s*(.+)", r["reward_model"]["ground_truth"])[-1] for r in rows]
    calls = []

    def completion(answer):
        return f"{REASONING_START}\nok\n{REASONING_END}{SOLUTION_START}{answer}{SOLUTION_END}"

    def generate_fn(prompts, n, seeds):
        calls.append((len(prompts), n, seeds))
        out = []
        for messages in prompts:
            answer = answers[[r["prompt"] for r in rows].index(messages)]
            right, wrong = completion(answer), completion(answer + "1")  # 1.0, and 0.4 (format only)
            # task i gets i correct samples out of 3
            i = answers.index(answer)
            out.append([right] * i + [wrong] * (3 - i) if i < 3 else [right] * 3)
        return out

    metrics = evaluate(generate_fn, rows, samples=3, ks=[1, 3], seed=5, batch_size=3)
    assert [c[:2] for c in calls] == [(3, 3), (1, 3)] and len(set(calls[0][2])) == 3
    # correct counts per task: 0, 1, 2, 3 of 3; rewards 1.0 (correct) or 0.4 (format only)
    assert metrics["val/grail_gsm8k/pass@1"] == pytest.approx((0 + 1 / 3 + 2 / 3 + 1) / 4)
    assert metrics["val/grail_gsm8k/pass@3"] == pytest.approx(3 / 4)
    assert metrics["val/grail_gsm8k/mean@3"] == pytest.approx(sum(c * 1.0 + (3 - c) * 0.4 for c in range(4)) / 12)
    assert metrics["val/grail_gsm8k/best@1"] == pytest.approx((0.4 + 1.0 + 1.0 + 1.0) / 4)  # first samples
    assert metrics["val/grail_gsm8k/success_rate_all"] == pytest.approx(6 / 12)
    assert metrics["val/grail_gsm8k/tasks"] == 4
    assert all(key.startswith("val/grail_gsm8k/") for key in metrics)
    with pytest.raises(ValueError, match="1..samples=3"):
        evaluate(generate_fn, rows, samples=3, ks=[4], seed=5)


def test_sampling_settings_from_a_verl_config():
    from omegaconf import OmegaConf

    from grail_megatron.eval.generation import SamplingSettings

    config = OmegaConf.create(
        {
            "actor_rollout_ref": {"rollout": {"temperature": 0.6, "top_p": 0.9, "top_k": 20}},
            "data": {"max_response_length": 2048},
        }
    )
    assert SamplingSettings.from_config(config) == SamplingSettings(0.6, 0.9, 20, 2048)


def test_wandb_offline_run_receives_the_metrics(tmp_path, monkeypatch):
    from grail_megatron.cli.eval import log_to_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_to_wandb("grail-eval-test", _job(tmp_path / "model", tmp_path / "o"), {"pass@1": 0.25, "mean@1": 0.5})
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = run_file.read_bytes()  # protobuf records: key, then the JSON value
    for key, value in ((b"eval/gsm8k/pass@1", b"0.25"), (b"eval/gsm8k/mean@1", b"0.5")):
        at = records.find(key)
        assert at >= 0 and value in records[at : at + len(key) + 8]
