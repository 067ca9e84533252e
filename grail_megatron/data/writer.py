"""verl's parquet format, written deterministically and atomically.

Columns (what verl's RLHFDataset and reward loop read): `data_source`, `prompt` (chat
messages), `ability`, `reward_model` {style, ground_truth}, `extra_info` {split, index,
dataset, source_split, source_index, + dataset fields}. The arrow schema is fixed, so the
same records always give the same bytes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_BASE_EXTRA = (
    ("split", "string"),
    ("index", "int64"),
    ("dataset", "string"),
    ("source_split", "string"),
    ("source_index", "int64"),
)


def verl_schema(extra_fields: dict[str, str]):
    import pyarrow as pa

    types = {"string": pa.string(), "int64": pa.int64()}
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    extra = pa.struct([(name, types[kind]) for name, kind in (*_BASE_EXTRA, *extra_fields.items())])
    return pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", pa.list_(message)),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
            ("extra_info", extra),
        ]
    )


def write_tables_atomically(tables: dict[Path, object]) -> None:
    """Write every table to a temp name next to its target, then rename them all.

    Nothing is renamed until every file is fully written, so a failure leaves the old
    outputs (or none) instead of a mix.
    """
    import pyarrow.parquet as pq

    temps: list[tuple[Path, Path]] = []
    try:
        for path, table in tables.items():
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            temps.append((tmp, path))
            # no statistics timestamps exist in parquet; fixed options keep reruns byte-identical
            pq.write_table(table, tmp, compression="zstd", compression_level=3, write_statistics=False)
        for tmp, path in temps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
