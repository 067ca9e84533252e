"""Single-machine GRPO loop (no Ray) on the Megatron model code: `grail-megatron train --local`.

`main(overrides)` composes the same config as the verl path, then runs `loop.run` on
TP x PP torchrun ranks (gloo on CPU). See docs/local.md.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(overrides: Sequence[str] = (), config_name: str = "grpo_grail", cfg=None) -> int:
    """Run local GRPO training; returns the exit code (75 after a preemption checkpoint)."""
    from grail_megatron.local.launch import main as launch

    return launch(overrides, config_name=config_name, cfg=cfg)
