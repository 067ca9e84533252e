"""The three datasets: which HF splits they read, how GRAIL splits them, and how one raw row
becomes the user message, the ground truth and the dataset-specific `extra_info` fields."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from grail_megatron.data import answers
from grail_megatron.data.errors import DataError
from grail_megatron.data.sources import RawSplit, Source
from grail_megatron.data.splits import MATH_SUBJECTS, default_math_val_size, math_val_indices, mbpp_redistribution


@dataclass(frozen=True)
class SplitOptions:
    """Choices that change which rows land in which split or how prompts read."""

    mbpp_scheme: str = "hf"  # "hf": 374 / 90 / 500; "grail": 774 / 190, no test split
    mbpp_signature: bool = True  # append the reference's `def ...:` stub (GRAIL's MBPP prompt)
    math_val_size: int | None = None  # None: 500 on the real data, the same 1/15 share otherwise


_REQUIRED = object()  # default of Item.value: the field must be present


@dataclass(frozen=True)
class Item:
    """One raw row scheduled for an output split; `index` is its position in that split."""

    raw: RawSplit
    row: int  # index into raw.rows
    index: int

    def value(self, name: str, kind: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
        """The row's field `name`, checked against `kind`; a missing or mistyped field is fatal."""
        record = self.raw.rows[self.row]
        path, number = self.raw.where(self.row)
        if name not in record or record[name] is None:
            if default is not _REQUIRED:
                return default
            raise DataError(path, "missing required field", row=number, field=name)
        value = record[name]
        if not isinstance(value, kind):
            raise DataError(path, f"expected {_kind_name(kind)}, got {type(value).__name__}", row=number, field=name)
        if kind is list and not all(isinstance(v, str) for v in value):
            raise DataError(path, "expected a list of strings", row=number, field=name)
        return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


@dataclass(frozen=True)
class Converted:
    user: str
    ground_truth: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    hub_repo: str
    ability: str
    # extra_info fields beyond split/index/dataset/source_split/source_index, with arrow types
    extra_fields: dict[str, str]
    plan: Callable[[Source, SplitOptions], dict[str, list[Item]]]
    convert: Callable[[Item, SplitOptions], Converted]


def _items(raw: RawSplit, rows: list[int] | None = None) -> list[Item]:
    rows = list(range(len(raw.rows))) if rows is None else rows
    return [Item(raw, row, index) for index, row in enumerate(rows)]


def _concat(parts: list[tuple[RawSplit, list[int]]]) -> list[Item]:
    items: list[Item] = []
    for raw, rows in parts:
        start = len(items)
        items.extend([Item(raw, row, start + k) for k, row in enumerate(rows)])
    return items


# --- GSM8K: openai/gsm8k "main"; validation is the test set (GRAIL's research scripts) ---


def _plan_gsm8k(source: Source, options: SplitOptions) -> dict[str, list[Item]]:
    train = source.read("openai/gsm8k", "main", "train")
    test = source.read("openai/gsm8k", "main", "test")
    return {"train": _items(train), "val": _items(test), "test": _items(test)}


def _convert_gsm8k(item: Item, options: SplitOptions) -> Converted:
    question = item.value("question", str)
    return Converted(question, answers.gsm8k_ground_truth(item.value("answer", str)))


# --- MATH: EleutherAI/hendrycks_math, 7 subject configs, stratified 7,000 / 500 ---


def _plan_math(source: Source, options: SplitOptions) -> dict[str, list[Item]]:
    trains = [source.read("EleutherAI/hendrycks_math", s, "train") for s in MATH_SUBJECTS]
    tests = [source.read("EleutherAI/hendrycks_math", s, "test") for s in MATH_SUBJECTS]
    sizes = [len(raw.rows) for raw in trains]
    val_size = options.math_val_size if options.math_val_size is not None else default_math_val_size(sum(sizes))
    try:
        chosen = math_val_indices(sizes, val_size)
    except ValueError as exc:
        raise DataError(trains[0].origin, f"cannot split MATH: {exc}") from exc
    train_parts = [
        (raw, [i for i in range(len(raw.rows)) if i not in val]) for raw, val in zip(trains, chosen, strict=True)
    ]
    val_parts = [(raw, [i for i in range(len(raw.rows)) if i in val]) for raw, val in zip(trains, chosen, strict=True)]
    test_parts = [(raw, list(range(len(raw.rows)))) for raw in tests]
    return {"train": _concat(train_parts), "val": _concat(val_parts), "test": _concat(test_parts)}


def _convert_math(item: Item, options: SplitOptions) -> Converted:
    problem = item.value("problem", str)
    gold = answers.math_ground_truth(item.value("solution", str))
    extra = {"subject": item.raw.config, "level": item.value("level", str, default="")}
    return Converted(problem, gold, extra)


# --- MBPP: the "full" config (the "sanitized" one also carries test_imports) ---


def _plan_mbpp(source: Source, options: SplitOptions) -> dict[str, list[Item]]:
    repo = "google-research-datasets/mbpp"
    train, validation, test = (source.read(repo, "full", s) for s in ("train", "validation", "test"))
    if options.mbpp_scheme == "hf":
        return {"train": _items(train), "val": _items(validation), "test": _items(test)}
    if options.mbpp_scheme == "grail":
        to_train, to_val = mbpp_redistribution(len(test.rows))
        return {
            "train": _concat([(train, list(range(len(train.rows)))), (test, to_train)]),
            "val": _concat([(validation, list(range(len(validation.rows)))), (test, to_val)]),
        }
    raise ValueError(f"mbpp_scheme must be 'hf' or 'grail', got {options.mbpp_scheme!r}")


def _convert_mbpp(item: Item, options: SplitOptions) -> Converted:
    code = item.value("code", str)
    gold = answers.mbpp_ground_truth(
        item.value("test_list", list),
        item.value("test_setup_code", str, default=""),
        item.value("test_imports", list, default=[]),
    )
    question = answers.mbpp_question(item.value("text", str), code, with_signature=options.mbpp_signature)
    return Converted(question, gold, {"task_id": int(item.value("task_id", int))})


DATASETS: dict[str, DatasetSpec] = {
    "gsm8k": DatasetSpec("gsm8k", "openai/gsm8k", "math", {}, _plan_gsm8k, _convert_gsm8k),
    "math": DatasetSpec(
        "math", "EleutherAI/hendrycks_math", "math", {"subject": "string", "level": "string"}, _plan_math, _convert_math
    ),
    "mbpp": DatasetSpec(
        "mbpp", "google-research-datasets/mbpp", "code", {"task_id": "int64"}, _plan_mbpp, _convert_mbpp
    ),
}
