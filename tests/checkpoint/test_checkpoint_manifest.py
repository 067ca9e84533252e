"""Completion marker and newest-complete-step search (pure filesystem, no torch)."""

from __future__ import annotations

import json

import pytest

from grail_megatron.checkpoint import CheckpointError, IncompleteCheckpointError, latest_complete_step, verify_step
from grail_megatron.checkpoint.fsutil import replace_dir
from grail_megatron.checkpoint.manifest import write_marker


def _fake_step(root, step, *, marker=True, checksums=False, payload=b"x" * 100):
    d = root / f"global_step_{step}"
    (d / "actor" / "model" / "dist_ckpt").mkdir(parents=True)
    (d / "actor" / "model" / "dist_ckpt" / "__0_0.distcp").write_bytes(payload)
    (d / "actor" / "model" / "dist_ckpt" / ".metadata").write_bytes(b"meta")
    if marker:
        write_marker(d, step, checksums=checksums)
    return d


def test_marker_lists_every_file_with_size(tmp_path):
    d = _fake_step(tmp_path, 3, checksums=True)
    marker = json.loads((d / "grail_checkpoint.json").read_text())
    assert marker["step"] == 3
    assert marker["files"]["actor/model/dist_ckpt/__0_0.distcp"]["size"] == 100
    assert len(marker["files"]["actor/model/dist_ckpt/.metadata"]["sha256"]) == 64
    assert verify_step(d) == "marker" and verify_step(d, deep=True) == "marker+sha256"


def test_partial_step_without_marker_is_refused(tmp_path):
    d = _fake_step(tmp_path, 5, marker=False)
    with pytest.raises(IncompleteCheckpointError, match=r"global_step_5: no completion marker grail_checkpoint.json"):
        verify_step(d)


def test_missing_and_truncated_files_are_named(tmp_path):
    d = _fake_step(tmp_path, 1)
    (d / "actor/model/dist_ckpt/__0_0.distcp").write_bytes(b"x" * 99)
    with pytest.raises(IncompleteCheckpointError, match=r"__0_0.distcp has 99 bytes, grail_checkpoint.json records 100"):
        verify_step(d)
    (d / "actor/model/dist_ckpt/__0_0.distcp").unlink()
    with pytest.raises(IncompleteCheckpointError, match=r"file actor/model/dist_ckpt/__0_0.distcp .* is missing"):
        verify_step(d)


def test_bit_flip_is_caught_only_by_deep_verification(tmp_path):
    d = _fake_step(tmp_path, 2, checksums=True)
    (d / "actor/model/dist_ckpt/__0_0.distcp").write_bytes(b"y" * 100)  # same size, other bytes
    assert verify_step(d) == "marker"
    with pytest.raises(CheckpointError, match="does not match its recorded sha256"):
        verify_step(d, deep=True)


def test_marker_of_another_step_is_refused(tmp_path):
    d = _fake_step(tmp_path, 4)
    replace_dir(d, tmp_path / "global_step_7")
    with pytest.raises(CheckpointError, match="marker says step 4 but the directory is global_step_7"):
        verify_step(tmp_path / "global_step_7")


def test_latest_complete_step_skips_bad_steps_and_temp_dirs(tmp_path, caplog):
    _fake_step(tmp_path, 1)
    _fake_step(tmp_path, 2)
    _fake_step(tmp_path, 3, marker=False)  # interrupted save renamed by hand / copied partially
    (tmp_path / ".incomplete.global_step_4").mkdir()  # in-flight save
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3")
    with caplog.at_level("WARNING"):
        assert latest_complete_step(tmp_path) == 2
    assert "skipping checkpoint step 3" in caplog.text and "using step 2 (tracker says 3)" in caplog.text
    assert latest_complete_step(tmp_path / "nothing-here") is None


def test_verl_written_step_is_accepted_on_its_manifest(tmp_path):
    d = _fake_step(tmp_path, 6, marker=False)
    manifest = {"schema_version": 2, "contents": {"model": {"path": "model/dist_ckpt", "format": "megatron_dist_checkpoint"}}}
    (d / "actor" / "ckpt_contents.json").write_text(json.dumps(manifest))
    assert verify_step(d) == "verl-manifest"
    (d / "actor/model/dist_ckpt/.metadata").unlink()
    with pytest.raises(IncompleteCheckpointError, match=r"model dist checkpoint lacks .metadata"):
        verify_step(d)


def test_replace_dir_swaps_atomically(tmp_path):
    old = tmp_path / "global_step_1"
    old.mkdir()
    (old / "a").write_text("old")
    new = tmp_path / ".incomplete.global_step_1"
    new.mkdir()
    (new / "a").write_text("new")
    replace_dir(new, old)
    assert (old / "a").read_text() == "new" and not new.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["global_step_1"]
