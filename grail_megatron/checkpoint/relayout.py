"""The two conversions that produce a dist checkpoint: from an HF folder, and to another TP/PP.

Both are collective functions for TP*PP ranks (the CLI starts them with torchrun): each rank
builds its model chunks at the target layout through the Bridge, fills them (from HF
safetensors, or from the source dist checkpoint, which dist_checkpointing reshards), and the
ranks save together with `save_checkpoint` (weights, RNG, trainer state; no optimizer state).
Memory: the model once, spread over the ranks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError
from .layout import DATALOADER_FILE, TRAINER_STATE_FILE, ActorPaths, resolve_actor_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelayoutJob:
    """What `run_job` does on every rank (serialised to JSON for torchrun)."""

    kind: str  # "from-hf" | "reshard"
    source: str
    out_root: str
    tp: int
    pp: int
    step: int | None = None  # from-hf: step number to write (default 0); reshard: the source's

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> "RelayoutJob":
        return cls(**json.loads(text))


def _dtype_of(hf_config):
    import torch

    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _build(hf_config, tp: int, pp: int):
    from grail_megatron.megatron import parallel
    from grail_megatron.megatron.bridge import Bridge, BridgeConfig

    from .to_hf import check_supported

    check_supported(hf_config)
    parallel.initialize(tp=tp, pp=pp, seed=0)
    bridge = Bridge(hf_config, BridgeConfig(dtype=_dtype_of(hf_config)))
    return bridge, bridge.build_models()


def from_hf(job: RelayoutJob) -> Path:
    """Collective: HF folder -> `<out_root>/global_step_<step>/actor` at TP/PP (no optimizer state)."""
    from transformers import AutoConfig

    from .store import save_checkpoint

    hf_dir = Path(job.source)
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir}: not an HF model folder (no config.json)")
    hf_config = AutoConfig.from_pretrained(str(hf_dir))
    with _stages("from-hf", ("build model", "load HF weights", "save dist checkpoint")) as stage:
        bridge, models = _build(hf_config, job.tp, job.pp)
        stage()
        bridge.load_hf_weights(models, hf_dir)
        stage()
        step = 0 if job.step is None else job.step
        out = save_checkpoint(job.out_root, step, models, hf_config=hf_config, hf_assets_dir=hf_dir,
                              extra_state={"source": {"hf_model": str(hf_dir)}})
        stage()
    return out


def reshard(job: RelayoutJob) -> Path:
    """Collective: dist checkpoint (any layout) -> same step at TP/PP, model weights + trainer state.

    The optimizer state is not carried over (`save_checkpoint` writes none, its layout depends on
    the optimizer class): verl's trainer starts from the output with a fresh optimizer.
    """
    from transformers import AutoConfig

    from .manifest import verify_step
    from .store import load_model_weights, save_checkpoint

    actor = ActorPaths.detect(resolve_actor_dir(job.source))
    step_dir = actor.actor.parent
    if (step_dir / "grail_checkpoint.json").exists() or (actor.actor / "ckpt_contents.json").exists():
        verify_step(step_dir)
    if not (actor.huggingface / "config.json").is_file():
        raise CheckpointError(f"{actor.huggingface}: no config.json; cannot rebuild the model to reshard")
    hf_config = AutoConfig.from_pretrained(str(actor.huggingface))
    with _stages("reshard", ("build model", "load dist checkpoint")) as stage:
        bridge, models = _build(hf_config, job.tp, job.pp)
        stage()
        load_model_weights(models, actor.model_dist)
        stage()
    state_file = step_dir / TRAINER_STATE_FILE
    extra = json.loads(state_file.read_text()).get("state", {}) if state_file.is_file() else {}
    dataloader_state = None
    if (step_dir / DATALOADER_FILE).is_file():
        import torch

        dataloader_state = torch.load(step_dir / DATALOADER_FILE, weights_only=False)
    step = job.step if job.step is not None else _step_of(step_dir)
    with _stages("reshard", ("save dist checkpoint",)) as stage:
        out = save_checkpoint(job.out_root, step, models, hf_config=hf_config, hf_assets_dir=actor.huggingface,
                              extra_state=extra, dataloader_state=dataloader_state)
        stage()
    return out


@contextlib.contextmanager
def _stages(desc: str, names: tuple[str, ...]):
    """A progress bar over the stages of a conversion, on rank 0 only; yields `advance()`."""
    from tqdm import tqdm

    disabled = int(os.environ.get("RANK", "0")) != 0 or os.environ.get("GRAIL_NO_PROGRESS", "0") not in ("", "0")
    bar = tqdm(total=len(names), desc=f"{desc}: {names[0]}", unit="stage", disable=disabled, file=sys.stderr)
    done = [0]

    def advance() -> None:
        done[0] += 1
        bar.update(1)
        if done[0] < len(names):
            bar.set_description(f"{desc}: {names[done[0]]}")

    try:
        yield advance
    finally:
        bar.close()


def _step_of(step_dir: Path) -> int:
    name = step_dir.name
    if name.startswith("global_step_") and name.removeprefix("global_step_").isdigit():
        return int(name.removeprefix("global_step_"))
    return 0


def run_job(job: RelayoutJob) -> Path:
    return {"from-hf": from_hf, "reshard": reshard}[job.kind](job)


def main() -> None:
    """torchrun entry point: `python -m grail_megatron.checkpoint.relayout '<job json>'`."""
    from grail_megatron.quiet import quiet_third_party

    quiet_third_party()
    from grail_megatron.megatron import parallel

    job = RelayoutJob.from_json(sys.argv[1])
    try:
        out = run_job(job)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"wrote {out}")
    finally:
        parallel.destroy()


if __name__ == "__main__":
    main()
