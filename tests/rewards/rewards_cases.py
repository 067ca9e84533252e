"""The GRAIL parity corpus (a copy of ../shared/parity/grail_rewards_public.jsonl)."""
from __future__ import annotations

import json
from pathlib import Path

PARITY_FILE = Path(__file__).with_name("data") / "grail_rewards_public.jsonl"


def load_parity_cases(path: Path = PARITY_FILE) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
