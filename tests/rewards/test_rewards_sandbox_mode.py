"""Choosing the sandbox backend, what the unprivileged one hides, and the loud failure."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from grail_megatron.rewards import SandboxPool, SandboxUnavailable
from grail_megatron.rewards.cli import main as score_main
from grail_megatron.rewards.sandbox_child import hiding_plan
from grail_megatron.rewards.sandbox_mode import format_only_allowed, hidden_dirs, resolve_mode
from rewards_cases import load_parity_cases


def test_auto_mode_is_root_here_and_forced_modes_are_validated(monkeypatch):
    assert os.geteuid() == 0  # this machine and CI; the non-root path: test_rewards_sandbox_unprivileged
    monkeypatch.delenv("GRAIL_SANDBOX_MODE", raising=False)
    assert resolve_mode() == "root" and resolve_mode("userns") == "userns"
    monkeypatch.setenv("GRAIL_SANDBOX_MODE", "chroot")
    with pytest.raises(SandboxUnavailable, match=r"GRAIL_SANDBOX_MODE='chroot': expected one of auto, root, userns"):
        SandboxPool(workers=1)
    monkeypatch.setenv("GRAIL_SANDBOX_MODE", "userns")
    with pytest.raises(SandboxUnavailable, match=r"userns is for non-root processes"):
        SandboxPool(workers=1)


def test_hidden_dirs_cover_home_defaults_and_configured_ones(monkeypatch, tmp_path):
    home, extra = tmp_path / "home", tmp_path / "scratch"
    home.mkdir()
    extra.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GRAIL_SANDBOX_HIDE", f"{extra}:/does/not/exist:/")
    found = hidden_dirs((str(home),))
    assert str(home) in found and str(extra) in found and "/root" in found and "/run" in found
    assert "/" not in found and "/does/not/exist" not in found and len(found) == len(set(found))


def test_hiding_plan_keeps_only_the_import_dirs_inside_the_outermost_hidden_dirs(tmp_path):
    home = tmp_path / "home"
    venv_lib = home / "venv" / "lib" / "python3.12"
    stdlib = home / ".pyenv" / "lib" / "python3.12"
    for path in (venv_lib / "site-packages", stdlib, home / "sub"):
        path.mkdir(parents=True)
    plan = hiding_plan((str(home), str(home / "sub")), [str(venv_lib), str(venv_lib / "site-packages"),
                                                          str(stdlib), "/usr/lib", ""])
    assert plan == {str(home): sorted([str(stdlib), str(venv_lib)])}


def test_format_only_needs_an_explicit_opt_in(monkeypatch):
    monkeypatch.delenv("GRAIL_ALLOW_FORMAT_ONLY_MBPP", raising=False)
    assert format_only_allowed() is False and format_only_allowed(True) is True
    monkeypatch.setenv("GRAIL_ALLOW_FORMAT_ONLY_MBPP", "1")
    assert format_only_allowed() is True and format_only_allowed(False) is False


def test_score_command_stops_without_a_sandbox_unless_format_only_is_accepted(tmp_path, monkeypatch, capsys):
    # A forced backend that cannot run for uid 0 stands in for a node without one.
    monkeypatch.setenv("GRAIL_SANDBOX_MODE", "userns")
    case = next(c for c in load_parity_cases() if c["components"].get("exec_status") == "all_passed")
    source = tmp_path / "rows.jsonl"
    source.write_text(json.dumps({k: case[k] for k in ("data_source", "solution_str", "ground_truth")}) + "\n")
    out = tmp_path / "scores.jsonl"
    assert score_main([str(source), "--out", str(out)]) == 3
    assert "grail-megatron score: MBPP sandbox unavailable: GRAIL_SANDBOX_MODE=userns" in capsys.readouterr().err
    assert not out.exists()
    assert score_main([str(source), "--out", str(out), "--allow-format-only-mbpp"]) == 0
    [result] = [json.loads(line) for line in out.read_text().splitlines()]
    assert result["passed"] == 0 and result["reason"].startswith("MBPP sandbox unavailable")
    assert result["score"] == pytest.approx(case["expected_score"] - 0.7)


def test_root_without_cap_sys_admin_fails_loudly_at_pool_start():
    # A root container without CAP_SYS_ADMIN (Docker's default): the capability is really
    # removed from the bounding set, so the zygote's unshare fails as it would there.
    probe = ("from grail_megatron.rewards import SandboxPool, SandboxUnavailable\n"
             "try:\n    SandboxPool(workers=1)\nexcept SandboxUnavailable as exc:\n    print(exc)\n")
    done = subprocess.run(["setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin",
                           sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    message = done.stdout.strip()
    assert message.startswith("MBPP sandbox unavailable: the root backend needs uid 0 with CAP_SYS_ADMIN")
    assert "[Errno 1] Operation not permitted; no CAP_SYS_ADMIN" in message
    assert "--cap-add SYS_ADMIN" in message and "GRAIL_ALLOW_FORMAT_ONLY_MBPP=1" in message
