"""Where raw rows come from: the HF hub, local JSONL/parquet files in the HF schemas, or the
fixtures shipped in this package. All three give the same `RawSplit` objects.

A local source is a folder laid out like a snapshot of the hub repository (what
`huggingface-cli download <repo> --repo-type dataset --local-dir DIR` produces) or a flat
folder: for a config `c` and split `s` we look in `DIR/c/` then `DIR/` for exactly one of
`s.jsonl`, `s.parquet` or the shards `s-*.parquet`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from grail_megatron.data.errors import DataError

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"


@dataclass(frozen=True)
class RawSplit:
    """The rows of one HF split of one config, with where they came from (for error messages)."""

    config: str
    split: str
    origin: str
    rows: list[dict]
    # (file, 1-based record number) of each row; the line number for JSONL files
    locations: list[tuple[str, int]]

    def where(self, index: int) -> tuple[str, int]:
        return self.locations[index]


class Source(Protocol):
    description: str

    def read(self, repo: str, config: str, split: str) -> RawSplit: ...


class HubSource:
    """`datasets.load_dataset(repo, config, split=...)`: needs network access or the HF cache."""

    description = "hf"

    def read(self, repo: str, config: str, split: str) -> RawSplit:
        import datasets

        origin = f"hf:{repo}/{config}/{split}"
        try:
            ds = datasets.load_dataset(repo, config, split=split)
        except Exception as exc:  # the hub raises many types; name the dataset either way
            raise DataError(origin, f"cannot load from the Hugging Face hub: {exc}") from exc
        rows = [dict(row) for row in ds]
        return RawSplit(config, split, origin, rows, [(origin, i + 1) for i in range(len(rows))])


class DirectorySource:
    """JSONL / parquet files in the HF schemas under one root folder."""

    def __init__(self, root: str | Path, description: str | None = None):
        self.root = Path(root)
        self.description = description or str(root)
        if not self.root.is_dir():
            raise DataError(str(self.root), "source folder does not exist")

    def read(self, repo: str, config: str, split: str) -> RawSplit:
        paths = self._find(config, split)
        rows: list[dict] = []
        locations: list[tuple[str, int]] = []
        for path in paths:
            for number, row in read_rows(path):
                rows.append(row)
                locations.append((str(path), number))
        origin = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent}/{split}-*.parquet"
        return RawSplit(config, split, origin, rows, locations)

    def _find(self, config: str, split: str) -> list[Path]:
        searched = []
        for folder in (self.root / config, self.root):
            searched.append(str(folder))
            candidates = [folder / f"{split}.jsonl", folder / f"{split}.parquet"]
            found = [p for p in candidates if p.is_file()]
            shards = sorted(folder.glob(f"{split}-*.parquet"))
            if (found and shards) or len(found) > 1:
                names = ", ".join(p.name for p in found + shards)
                raise DataError(str(folder), f"ambiguous {split!r} split: several files match ({names})")
            if found or shards:
                return found or shards
        raise DataError(
            str(self.root),
            f"no {split!r} file for config {config!r}: looked for {split}.jsonl, {split}.parquet "
            f"or {split}-*.parquet in {' and '.join(searched)}",
        )


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """All records of a JSONL or parquet file as (1-based record number, dict) pairs."""
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(str(path), "unsupported file type (use .jsonl or .parquet)")


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(str(path), f"cannot read file: {exc}") from exc
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(str(path), f"invalid JSON: {exc.msg} (column {exc.colno})", row=line_no) from exc
        if not isinstance(row, dict):
            raise DataError(str(path), f"expected a JSON object, got {type(row).__name__}", row=line_no)
        rows.append((line_no, row))
    return rows


def _read_parquet(path: Path) -> list[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DataError(str(path), f"cannot read parquet: {exc}") from exc


def resolve_source(source: str | Path, dataset: str) -> Source:
    """'hf' -> the hub, 'fixtures' -> the package's fixtures of `dataset`, else a local folder."""
    if str(source) == "hf":
        return HubSource()
    if str(source) == "fixtures":
        return DirectorySource(FIXTURES_DIR / dataset, description="fixtures")
    return DirectorySource(Path(source).expanduser())
