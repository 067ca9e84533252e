"""GPU self-test helper: a tiny random-init Qwen2 with a tokenizer trained on the fixture texts.

The sizes are those of `configs/model_preset/tiny.yaml` (DESIGN.md section 8), so the
`model_preset=tiny` run of the self-test describes this model exactly. Runs on CPU too.

    python docker/selftest/make_tiny_model.py OUT_DIR
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grail_megatron.data.sources import FIXTURES_DIR
from grail_megatron.models.tiny import describe, make_tiny_model, train_tokenizer
from grail_megatron.prompts import SYSTEM_PROMPT

# configs/model_preset/tiny.yaml -> grail.model (tests/container checks they agree)
TINY = dict(arch="qwen2", tie_word_embeddings=True, hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2)
VOCAB_SIZE = 320


def fixture_texts() -> list[str]:
    """Every fixture row (all three datasets) as JSON text, plus GRAIL's system prompt."""
    rows = [line for path in sorted(FIXTURES_DIR.rglob("*.jsonl")) for line in path.read_text().splitlines()]
    return rows + [SYSTEM_PROMPT]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tokenizer_dir = args.out_dir.parent / f"{args.out_dir.name}-tokenizer"
    tokenizer = train_tokenizer(fixture_texts(), tokenizer_dir, vocab_size=VOCAB_SIZE)
    make_tiny_model(args.out_dir, tokenizer_dir=tokenizer_dir, seed=args.seed, **TINY)
    summary = describe(args.out_dir)
    print(f"PASS tiny_model: {json.dumps(summary)} (tokenizer {len(tokenizer)} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
