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


# The sandbox gives every program a private /tmp, /var/tmp and /dev/shm and hides /root, /home
# and /run, so files a test wants a program to *see* (and fail to touch) must live elsewhere.
# The checkout itself may be under /tmp (CI clones anywhere), hence a directory under /srv.
VISIBLE_ROOT = Path(os.environ.get("GRAIL_TEST_VISIBLE_ROOT", "/srv/grail-megatron-tests"))


def visible_scratch_dir(prefix: str) -> Path:
    """A new, empty directory that sandboxed programs see (root-owned, mode 0755)."""
    import uuid

    VISIBLE_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    path = VISIBLE_ROOT / f"{prefix}-{uuid.uuid4().hex}"
    path.mkdir(mode=0o755)
    return path
