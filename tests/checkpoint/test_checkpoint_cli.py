"""`grail-megatron convert ...` argument handling and exit codes (in a forked single rank)."""

from __future__ import annotations

import contextlib
import io
import os

import pytest

from ckpt_testlib import free_port, run_ranks, tiny_hf_model


def _cli_session(hf, root, out):
    from grail_megatron.cli.convert import main

    def run(*argv):
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(list(argv))
        return code, stdout.getvalue(), stderr.getvalue()

    results = {"from_hf": run("from-hf", "--model", str(hf), "--out", str(root), "--tp", "1", "--pp", "1")}
    os.environ["MASTER_PORT"] = str(free_port())  # the converter starts its own single-rank group
    results["to_hf"] = run("to-hf", "--ckpt", str(root), "--out", str(out), "--verify", "--no-progress")
    results["to_hf_again"] = run("to-hf", "--ckpt", str(root), "--out", str(out), "--no-progress")
    results["from_hf_again"] = run("from-hf", "--model", str(hf), "--out", str(root))
    results["missing"] = run("to-hf", "--ckpt", str(root / "global_step_9"), "--out", str(out) + "x")
    return results


@pytest.mark.multiproc
def test_cli_from_hf_then_to_hf_with_verify(tmp_path):
    hf = tiny_hf_model(tmp_path / "hf", arch="llama", tie=False, kv_heads=1)
    [r] = run_ranks(_cli_session, 1, hf, tmp_path / "run", tmp_path / "out")
    assert r["from_hf"][0] == 0 and "vocab_size" not in r["from_hf"][2]  # vocab 325 at TP1: no verl warning
    verl_path = (tmp_path / "run").resolve() / "global_step_0" / "actor" / "model" / "dist_ckpt"
    assert f"actor_rollout_ref.actor.megatron.dist_checkpointing_path={verl_path}\n" in r["from_hf"][1]
    assert (verl_path / ".metadata").is_file()
    code, stdout, _ = r["to_hf"]
    assert code == 0, r["to_hf"]
    assert "max abs logit difference" in stdout and ": OK" in stdout
    assert "wrote " in stdout and "source layout {'tp': 1, 'pp': 1, 'dp': 1, 'vpp': 1}" in stdout
    assert (tmp_path / "out" / "config.json").is_file()
    # bad input (exit 2): an output that exists, a checkpoint that does not
    assert r["to_hf_again"][0] == 2 and "exists and is not empty (pass --overwrite" in r["to_hf_again"][2]
    assert r["from_hf_again"][0] == 2 and "global_step_0 exists (pass --overwrite" in r["from_hf_again"][2]
    assert r["missing"][0] == 2 and "global_step_9: does not exist" in r["missing"][2]
