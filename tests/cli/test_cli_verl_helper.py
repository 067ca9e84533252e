"""When verl's validator helper starts, and that it never costs a check (issue 15: the cold dry run).

The helper imports verl (~4 s of CPU), so `train` starts it before composing the config, unless
this command line's verdict is already cached; a helper whose verdict turns out to be cached is
stopped, and one that was not started up front is started when the verdict is needed. The
helper hands its verdict back and exits at once. Timing targets live in benchmarks/startup.py.
"""

from __future__ import annotations

import pickle

import pytest
from omegaconf import OmegaConf

from grail_megatron.cli import main as grail_megatron
from grail_megatron.cli import preflight
from grail_megatron.config import verl_check


@pytest.fixture()
def events(monkeypatch, tmp_path):
    """Record helper starts (the real helper) and compositions, in order; a private verdict cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("GRAIL_NO_CHECK_CACHE", raising=False)
    log: list = []
    real_spawn, real_compose = verl_check._spawn, preflight.compose

    def spawn():
        proc = real_spawn()
        log.append(("helper", proc))
        return proc

    def compose(overrides, config_name):
        log.append(("compose", None))
        return real_compose(overrides, config_name)

    monkeypatch.setattr(verl_check, "_spawn", spawn)
    monkeypatch.setattr(preflight, "compose", compose)
    return log


def _helpers(log):
    return [proc for what, proc in log if what == "helper"]


def verl_says(answer, log):
    """A stand-in for the helper's answer (the real helper answers in the first test): records the
    question in `log` with the helper it went to, stops that helper, returns `answer`."""
    def ask(self, cfg, timeout):
        log.append(("verdict", self.proc))
        self.cancel()
        return answer
    return ask


def test_the_helper_starts_before_composing_and_only_when_the_verdict_is_not_cached(events, capsys, monkeypatch):
    # cold: the helper is the first thing started, and its verdict is the one printed
    assert grail_megatron(["train", "--dry-run"]) == 0
    assert [what for what, _ in events] == ["helper", "compose"]
    (helper,) = _helpers(events)
    assert helper.returncode == 0  # it answered and exited on its own
    assert "verl validate_config: passed" in capsys.readouterr().out

    # the same command line again: its verdict is cached, so no helper at all
    events.clear()
    assert grail_megatron(["train", "--dry-run"]) == 0
    assert [what for what, _ in events] == ["compose"]
    assert "verl validate_config: passed" in capsys.readouterr().out

    # a new command line whose verdict is cached (verl does not read data files): the helper
    # started up front is stopped once the composed config shows the verdict is known
    events.clear()
    assert grail_megatron(["train", "--dry-run", "dataset=gsm8k"]) == 0
    assert [what for what, _ in events] == ["helper", "compose"]
    (stopped,) = _helpers(events)
    assert stopped.returncode is not None and stopped.returncode < 0  # killed, and reaped
    assert "verl validate_config: passed" in capsys.readouterr().out

    # GRAIL_NO_CHECK_CACHE=1 ignores the cache: verl runs again, its helper up front
    events.clear()
    monkeypatch.setenv("GRAIL_NO_CHECK_CACHE", "1")
    monkeypatch.setattr(verl_check.VerlCheck, "_ask", verl_says(None, events))
    assert grail_megatron(["train", "--dry-run"]) == 0
    assert [what for what, _ in events] == ["helper", "compose", "verdict"]
    assert events[0][1] is events[2][1]


def test_a_remembered_command_line_whose_verdict_is_gone_still_gets_verl(events, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(verl_check.VerlCheck, "_ask", verl_says(None, events))
    assert grail_megatron(["train", "--dry-run"]) == 0
    for verdict in (tmp_path / "grail-megatron" / "verl-check").glob("*.json"):
        verdict.unlink()  # the command line is remembered, the verdict is not
    events.clear()
    monkeypatch.setattr(verl_check.VerlCheck, "_ask", verl_says("verl's validate_config rejected it: stand-in", events))
    assert grail_megatron(["train", "--dry-run"]) == 1
    assert "rejected it: stand-in" in capsys.readouterr().err  # verl's verdict, not a skipped check
    assert [what for what, _ in events] == ["helper", "compose", "verdict"]
    assert events[0][1] is events[2][1]


def test_a_late_helper_is_started_when_the_verdict_is_needed(events, monkeypatch):
    # a command line remembered with a verdict that its composition no longer matches (e.g. an
    # edited preset): no helper up front, but verl still checks the composed config
    monkeypatch.setattr(verl_check, "verdict_known", lambda hint: True)
    monkeypatch.setattr(verl_check.VerlCheck, "_ask", verl_says(None, events))
    assert grail_megatron(["train", "--dry-run", "actor_rollout_ref.rollout.temperature=0.9"]) == 0
    assert [what for what, _ in events] == ["compose", "helper", "verdict"]
    assert events[1][1] is events[2][1]


def test_bad_input_stops_the_helper(events, capsys):
    assert grail_megatron(["train", "--dry-run", "actor_rollout_ref.actor.clip_ratio_hgh=0.3"]) == 2
    assert "clip_ratio_high" in capsys.readouterr().err
    (helper,) = _helpers(events)
    assert helper.returncode is not None  # not left running


def test_the_helper_is_sent_the_copy_verl_problem_validates():
    cfg = preflight.compose([], "grpo_grail")
    copy = verl_check.validation_copy(cfg)
    sent = pickle.loads(pickle.dumps(copy))  # what travels to the helper
    assert sent == copy == cfg and not OmegaConf.is_struct(sent)
    assert OmegaConf.to_container(sent) == OmegaConf.to_container(cfg)  # interpolations kept, unresolved


def test_the_dry_run_report_is_made_while_verl_works_and_shown_only_once_verl_agreed(events, capsys, monkeypatch):
    from grail_megatron.cli import train

    real_report = train.dry_run_report
    monkeypatch.setattr(train, "dry_run_report", lambda *a: events.append(("report", None)) or real_report(*a))

    monkeypatch.setattr(verl_check.VerlCheck, "_ask", verl_says("verl's validate_config rejected it: no", events))
    assert grail_megatron(["train", "--dry-run"]) == 1
    assert [what for what, _ in events] == ["helper", "compose", "report", "verdict"]
    out, err = capsys.readouterr()
    assert "DRY RUN" not in out and "# plan" not in out and "rejected it: no" in err

    events.clear()
    monkeypatch.setattr(verl_check.VerlCheck, "_ask", verl_says(None, events))
    # (another config: the rejection above is cached for the default one)
    assert grail_megatron(["train", "--dry-run", "--print-config", "actor_rollout_ref.rollout.temperature=0.9"]) == 0
    assert [what for what, _ in events] == ["helper", "compose", "report", "verdict"]
    out = capsys.readouterr().out
    assert out.startswith("# resolved config\n")
    assert out.endswith("verl validate_config: passed\nDRY RUN: nothing launched.\n")
