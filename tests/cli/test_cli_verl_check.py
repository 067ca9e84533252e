"""verl's own validator runs beside ours (a helper process) and its verdicts are cached per config."""

from __future__ import annotations

from grail_megatron.cli import main as grail_megatron


def _verdicts(cache):
    return sorted((cache / "grail-megatron" / "verl-check").glob("*.json"))


def test_verl_rejections_exit_1_and_verdicts_are_reused_when_verl_would_not_look(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("GRAIL_NO_CHECK_CACHE", raising=False)
    assert grail_megatron(["train", "--dry-run"]) == 0
    assert "verl validate_config: passed" in capsys.readouterr().out
    assert len(_verdicts(tmp_path)) == 1
    # data files, steps and loggers are not read by verl's validator: the verdict is reused
    assert grail_megatron(["train", "--dry-run", "dataset=gsm8k", "trainer.total_training_steps=7"]) == 0
    assert len(_verdicts(tmp_path)) == 1
    # only verl checks this one (sampled validation needs a positive temperature): exit 1, its message
    assert grail_megatron(["train", "--dry-run", "actor_rollout_ref.rollout.temperature=0"]) == 1
    err = capsys.readouterr().err
    assert "verl's validate_config rejected the config" in err and "temperature should be greater than 0" in err
    assert "Traceback" not in err
    assert len(_verdicts(tmp_path)) == 2
    # a cached rejection is still a rejection
    assert grail_megatron(["train", "--dry-run", "actor_rollout_ref.rollout.temperature=0", "dataset=mbpp"]) == 1
    assert "temperature should be greater than 0" in capsys.readouterr().err
