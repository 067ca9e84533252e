"""One torchrun rank of the local loop: `python -m grail_megatron.local.worker --config FILE`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from grail_megatron.local.preemption import EXIT_PREEMPTED, STATUS_FILE_ENV


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a rank of the local GRPO loop (started by torchrun)")
    parser.add_argument("--config", required=True, help="composed config written by `train --local`")
    args = parser.parse_args(argv)
    # megatron-core and mbridge warn at import about missing CUDA-only extras (Transformer
    # Engine, Apex, CUDA_DEVICE_MAX_CONNECTIONS); on the CPU path these are expected.
    for module in (r"megatron\..*", r"mbridge\..*"):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
    from grail_megatron.quiet import quiet_third_party

    quiet_third_party(summary=False)  # the notices expected on this machine, as in verl's Ray workers
    os.environ.setdefault("VERL_LOGGING_LEVEL", "WARN")  # verl's per-module INFO lines (checkpoint paths)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.WARNING, format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
    # "MCore's async save is deprecated": said on every checkpoint, about a path we do not use.
    logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").setLevel(logging.ERROR)

    from omegaconf import OmegaConf

    from grail_megatron.workers import export_runtime_env

    cfg = OmegaConf.load(args.config)
    # the environment verl's Ray workers get (platform, plugins, no torch.compile on CPU), set
    # before verl is imported: this rank builds the same workers in process
    export_runtime_env(cfg)
    import verl  # noqa: F401  - first, so that verl imports our plugins before anything imports them
    from grail_megatron.local.loop import run
    from grail_megatron.local.settings import LocalSettings

    return run(LocalSettings.from_config(cfg), cfg)


if __name__ == "__main__":
    code = main()
    # Under the launcher a preemption is reported through the status file and the ranks exit 0,
    # so torchrun does not print a worker-failure report; run directly, the code is 75.
    if code == EXIT_PREEMPTED and os.environ.get(STATUS_FILE_ENV):
        code = 0
    sys.exit(code)
