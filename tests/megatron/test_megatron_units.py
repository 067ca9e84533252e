"""Single-process pieces of the Megatron layer: input errors."""

import pytest
import torch


def test_bridge_rejects_non_hf_folder(tmp_path):
    from grail_megatron.megatron.bridge import Bridge

    with pytest.raises(FileNotFoundError, match="config.json not found"):
        Bridge.from_pretrained(tmp_path)


def test_parallel_initialize_needs_torchrun_env(monkeypatch):
    from grail_megatron.megatron import parallel

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="tp and pp must be >= 1"):
        parallel.ParallelConfig(tp=0)
    with pytest.raises(ValueError, match="vpp=2 needs pp >= 2"):
        parallel.ParallelConfig(pp=1, vpp=2)
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="RANK is not set: start this program with torchrun"):
            parallel._require_env("RANK")
