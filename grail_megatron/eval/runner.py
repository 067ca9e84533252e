"""Standalone evaluation: checks, resumable sampling + scoring, summary.

Output folder: `samples.jsonl` (one line per task: rewards, successes, completions; appended
and flushed task by task), `run.json` (the settings the samples depend on; a rerun with other
settings is refused instead of mixing samples) and `summary.json` (metrics). A rerun with the
same settings skips every task already in `samples.jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from grail_megatron.eval.generation import SamplingSettings, task_seed
from grail_megatron.eval.metrics import SUCCESS_THRESHOLDS, summarize
from grail_megatron.eval.validation import TaskResult, score_tasks, task_key

SPLITS = ("val", "test")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class EvalError(ValueError):
    """A problem found before any generation (bad model folder, split, k, output folder)."""


@dataclass(frozen=True)
class EvalJob:
    model_dir: Path
    dataset: str
    out_dir: Path
    split: str = "val"
    data_dir: Path | None = None  # prepared parquet folder; None: prepare from `source`
    source: str = "hf"
    samples: int = 5
    ks: tuple[int, ...] = (1, 5)
    seed: int = 0
    limit: int | None = None  # evaluate only the first N tasks
    backend: str = "auto"
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    overwrite: bool = False
    progress: bool = True


@dataclass
class EvalOutcome:
    metrics: dict[str, float]
    tasks_total: int
    tasks_generated: int  # in this run (the rest were resumed from samples.jsonl)
    summary_path: Path
    samples_path: Path


def check_job(job: EvalJob) -> None:
    """Everything that can be wrong before loading a model or generating a token."""
    if job.dataset not in SUCCESS_THRESHOLDS:
        raise EvalError(f"unknown dataset {job.dataset!r}; choose from {', '.join(SUCCESS_THRESHOLDS)}")
    if job.split not in SPLITS:
        raise EvalError(f"unknown split {job.split!r}; choose from {', '.join(SPLITS)}")
    if job.samples < 1:
        raise EvalError(f"--samples must be >= 1, got {job.samples}")
    too_big = [k for k in job.ks if k > job.samples]
    if too_big or not job.ks or min(job.ks) < 1:
        raise EvalError(f"every k must be in 1..samples={job.samples}, got k={list(job.ks)}")
    if not job.model_dir.is_dir():
        raise EvalError(f"{job.model_dir}: model folder does not exist")
    if not (job.model_dir / "config.json").is_file():
        raise EvalError(f"{job.model_dir}: no config.json (not a Hugging Face model folder)")
    if not any((job.model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise EvalError(f"{job.model_dir}: no tokenizer (looked for {', '.join(TOKENIZER_FILES)})")


def load_rows(job: EvalJob) -> tuple[list[dict], str]:
    """The verl records of the chosen split and the sha256 of its file.

    Without --data the split is prepared from `job.source` into a temporary folder (removed
    afterwards; preparation is byte-identical, so the hash is stable across runs).
    """
    if job.data_dir is not None:
        return _read_split(job, job.data_dir)
    from grail_megatron.data import prepare_dataset

    with tempfile.TemporaryDirectory(prefix=f"grail-eval-{job.dataset}-") as tmp:
        prepare_dataset(job.dataset, tmp, job.source)
        return _read_split(job, Path(tmp))


def _read_split(job: EvalJob, data_dir: Path) -> tuple[list[dict], str]:
    import pyarrow.parquet as pq

    path = data_dir / f"{job.split}.parquet"
    if not path.is_file():
        present = sorted(p.stem for p in data_dir.glob("*.parquet"))
        raise EvalError(f"{path}: no {job.split!r} split here (found: {', '.join(present) or 'none'})")
    rows = pq.read_table(path).to_pylist()
    wrong = {r["data_source"] for r in rows if job.dataset not in r["data_source"].lower()}
    if wrong:
        raise EvalError(f"{path}: rows have data_source {sorted(wrong)}, not {job.dataset}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return (rows[: job.limit] if job.limit is not None else rows), digest


def run_settings(job: EvalJob, data_sha256: str, backend: str) -> dict[str, Any]:
    """What the samples depend on; stored in run.json and compared on resume."""
    return {
        "model": str(job.model_dir.resolve()),
        "dataset": job.dataset,
        "split": job.split,
        "data_sha256": data_sha256,
        "samples": job.samples,
        "seed": job.seed,
        "backend": backend,
        "sampling": asdict(job.sampling),
    }


def prepare_output(job: EvalJob, settings: dict[str, Any]) -> dict[str, TaskResult]:
    """Create or reuse the output folder; returns the tasks already done."""
    job.out_dir.mkdir(parents=True, exist_ok=True)
    run_path, samples_path = job.out_dir / "run.json", job.out_dir / "samples.jsonl"
    if job.overwrite:
        samples_path.unlink(missing_ok=True)
    elif run_path.exists():
        previous = json.loads(run_path.read_text())
        if previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise EvalError(
                f"{job.out_dir}: holds samples of a different run (changed: {', '.join(changed)}); "
                "use another --out or --overwrite"
            )
    _write_atomically(run_path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return read_done(samples_path)


def read_done(samples_path: Path) -> dict[str, TaskResult]:
    """Tasks already in samples.jsonl. A torn last line (killed mid-write) is cut off."""
    if not samples_path.exists():
        return {}
    done: dict[str, TaskResult] = {}
    lines = samples_path.read_text().split("\n")
    good_bytes = 0
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # the unterminated last line: drop it and redo that task
                with open(samples_path, "r+b") as f:
                    f.truncate(good_bytes)
                break
            raise EvalError(f"{samples_path}, line {number}: invalid JSON ({exc.msg})") from exc
        done[record["task"]] = TaskResult(
            record["task"], record["data_source"], record["completions"], record["rewards"], record["successes"]
        )
        good_bytes += len(line.encode()) + 1
    return done


def run(job: EvalJob, generator_factory=None) -> EvalOutcome:
    """Check, load, resume, generate what is missing, score, summarize."""
    from grail_megatron.eval.generation import cuda_available, make_generator

    check_job(job)
    rows, data_sha256 = load_rows(job)
    backend = job.backend if job.backend != "auto" else ("vllm" if cuda_available() else "hf")
    settings = run_settings(job, data_sha256, backend)
    done = prepare_output(job, settings)
    keys = [task_key(row, i) for i, row in enumerate(rows)]
    todo = [(row, key) for row, key in zip(rows, keys, strict=True) if key not in done]

    samples_path = job.out_dir / "samples.jsonl"
    if todo:
        factory = generator_factory or (lambda: make_generator(backend, job.model_dir, job.sampling, job.seed))
        generator = factory()
        with open(samples_path, "a") as out, _progress(len(rows), len(rows) - len(todo), job) as bar:
            for row, key in todo:
                texts = generator.generate(list(row["prompt"]), job.samples, task_seed(job.seed, key))
                (result,) = score_tasks([row], [key], [texts])
                out.write(json.dumps(result.to_json()) + "\n")
                out.flush()
                os.fsync(out.fileno())
                done[key] = result
                bar.update(1)

    results = [done[key] for key in keys]
    metrics = summarize({r.task: r.rewards for r in results}, SUCCESS_THRESHOLDS[job.dataset], job.ks)
    summary = {**settings, "ks": list(job.ks), "metrics": metrics}
    summary_path = job.out_dir / "summary.json"
    _write_atomically(summary_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return EvalOutcome(metrics, len(rows), len(todo), summary_path, samples_path)


def _progress(total: int, initial: int, job: EvalJob):
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, desc=f"eval {job.dataset}/{job.split}", unit="task", disable=not job.progress
    )


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
