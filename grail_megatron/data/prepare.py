"""`prepare_dataset`: raw rows -> GRAIL splits -> verl records -> parquet files."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grail_megatron.data.catalog import DATASETS, Converted, DatasetSpec, Item, SplitOptions
from grail_megatron.data.errors import DataError, SkippedRow
from grail_megatron.data.sources import resolve_source
from grail_megatron.data.writer import verl_schema, write_tables_atomically
from grail_megatron.prompts import DATA_SOURCES, SYSTEM_PROMPT


@dataclass
class SplitReport:
    """What went into one output file."""

    name: str
    path: Path
    rows: int  # rows written
    candidates: int  # rows the split drew from the source
    skipped: Counter = field(default_factory=Counter)  # reason -> count (unscorable rows)
    too_long: int = 0  # dropped by --max-prompt-length

    @property
    def dropped(self) -> int:
        return sum(self.skipped.values()) + self.too_long


@dataclass
class PrepareResult:
    dataset: str
    out_dir: Path
    source: str
    splits: list[SplitReport]
    removed_stale: list[Path] = field(default_factory=list)

    @property
    def files(self) -> dict[str, Path]:
        return {s.name: s.path for s in self.splits}


def prepare_dataset(
    dataset: str,
    out_dir: str | Path,
    source: str | Path = "fixtures",
    *,
    system_prompt: str = SYSTEM_PROMPT,
    mbpp_scheme: str = "hf",
    mbpp_signature: bool = True,
    math_val_size: int | None = None,
    tokenizer: str | Path | Any | None = None,
    max_prompt_length: int | None = None,
    strict: bool = False,
    progress: bool = False,
) -> PrepareResult:
    """Write `train.parquet`, `val.parquet` (and `test.parquet` where there is one) to `out_dir`.

    `source`: "hf" (the hub through `datasets`), "fixtures" (the small files in this package)
    or a folder of JSONL/parquet files in the HF schemas. Unscorable rows (no `####`, no
    `\\boxed{}`, no tests) are skipped and counted per reason, or raise `DataError` when
    `strict`. With `tokenizer` (a path or a loaded tokenizer) and `max_prompt_length`, prompts
    longer than that many tokens after the chat template are dropped and counted.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if (tokenizer is None) != (max_prompt_length is None):
        raise ValueError("tokenizer and max_prompt_length go together: give both or neither")
    spec = DATASETS[dataset]
    options = SplitOptions(mbpp_scheme=mbpp_scheme, mbpp_signature=mbpp_signature, math_val_size=math_val_size)
    resolved = resolve_source(source, dataset)
    plan = spec.plan(resolved, options)

    out_dir = Path(out_dir)
    counter = _length_counter(tokenizer) if tokenizer is not None else None
    reports, tables = [], {}
    with _progress_bar(sum(map(len, plan.values())), f"{dataset}: preparing", progress) as bar:
        for split, items in plan.items():
            report = SplitReport(split, out_dir / f"{split}.parquet", rows=0, candidates=len(items))
            records = []
            for item in items:
                record = _record(spec, item, split, options, system_prompt, report, strict)
                bar.update(1)
                if record is None:
                    continue
                if counter is not None and counter(record["prompt"]) > max_prompt_length:
                    report.too_long += 1
                    continue
                records.append(record)
            report.rows = len(records)
            tables[report.path] = _table(spec, records)
            reports.append(report)

    out_dir.mkdir(parents=True, exist_ok=True)
    write_tables_atomically(tables)
    stale = [out_dir / f"{s}.parquet" for s in ("train", "val", "test") if s not in plan]
    removed = [p for p in stale if p.exists()]
    for path in removed:  # e.g. a test.parquet left by an earlier --mbpp-scheme hf run
        path.unlink()
    return PrepareResult(dataset, out_dir, resolved.description, reports, removed)


def _record(
    spec: DatasetSpec,
    item: Item,
    split: str,
    options: SplitOptions,
    system_prompt: str,
    report: SplitReport,
    strict: bool,
) -> dict | None:
    try:
        converted: Converted = spec.convert(item, options)
    except SkippedRow as skip:
        if strict:
            path, number = item.raw.where(item.row)
            raise DataError(path, skip.reason, row=number, field=skip.field) from None
        report.skipped[skip.reason] += 1
        return None
    extra = {
        "split": split,
        "index": item.index,
        "dataset": spec.name,
        "source_split": item.raw.split,
        "source_index": item.row,
        **converted.extra,
    }
    return {
        "data_source": DATA_SOURCES[spec.name],
        "prompt": [{"role": "system", "content": system_prompt}, {"role": "user", "content": converted.user}],
        "ability": spec.ability,
        "reward_model": {"style": "rule", "ground_truth": converted.ground_truth},
        "extra_info": extra,
    }


def _table(spec: DatasetSpec, records: list[dict]):
    import pyarrow as pa

    return pa.Table.from_pylist(records, schema=verl_schema(spec.extra_fields))


def _length_counter(tokenizer: str | Path | Any):
    """Prompt length in tokens after the chat template, as verl's RLHFDataset filters it."""
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        path = Path(tokenizer)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:
            raise DataError(str(path), f"cannot load tokenizer: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(str(getattr(tokenizer, "name_or_path", tokenizer)), "tokenizer has no chat template")

    def count(messages: list[dict]) -> int:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return len(ids)

    return count


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="row", disable=not enabled, leave=False)
