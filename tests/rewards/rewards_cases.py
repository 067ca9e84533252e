"""The GRAIL parity corpus: a copy of the public cases, or GRAIL_PARITY_FILE (e.g. a
held-back set built the same way) when that variable is set."""
from __future__ import annotations

import json
import os
from pathlib import Path

BUNDLED_FILE = Path(__file__).with_name("data") / "grail_rewards_public.jsonl"
PARITY_FILE = Path(os.environ.get("GRAIL_PARITY_FILE") or BUNDLED_FILE)


def load_parity_cases(path: Path = PARITY_FILE) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
