"""MBPP reward: 0.7 pass rate + 0.1 compiles + 0.1 (solution, trailing < 50) + 0.1 thinking.

Test programs follow GRAIL's reference: ground truth is JSON with ``test_list``,
``test_setup_code`` and ``test_imports``; test i is ``imports + setup + assert`` and runs
as ``code + "\\n\\n" + test`` in a fresh confined process (``sandbox.py``); tests of the
form ``assert CALL == EXPECTED`` are judged outside the sandbox (``plain_data``).
"""
from __future__ import annotations

import json
import logging
from typing import Any

from grail_megatron.rewards.extract import parse_completion
from grail_megatron.rewards.sandbox import SandboxPool, SandboxUnavailable, default_pool
from grail_megatron.rewards.sandbox_mode import format_only_allowed

_LOG = logging.getLogger(__name__)
_WARNED_FORMAT_ONLY = False


def build_tests(test_data: dict) -> list[str]:
    """The reference's test cases; raises TypeError where the reference would."""
    test_list = test_data.get("test_list", [])
    if not test_list:
        return []
    test_setup = test_data.get("test_setup_code", "")
    test_imports = test_data.get("test_imports", [])
    setup_code = "\n".join(test_imports) if test_imports else ""
    if test_setup:
        setup_code += f"\n{test_setup}"
    return [f"{setup_code}\n{test}" if setup_code else test for test in test_list]


def _load_ground_truth(ground_truth: Any) -> tuple[dict | None, str]:
    """The reference's ``json.loads`` with failures mapped to {} (not executed) + a reason."""
    try:
        data = json.loads(ground_truth)
    except (json.JSONDecodeError, TypeError) as exc:
        return None, f"ground_truth is not valid JSON: {exc}"
    if not isinstance(data, dict):
        return None, f"ground_truth JSON must be an object, got {type(data).__name__}"
    return data, ""


def _compiles(code: str) -> bool:
    try:
        compile(code, "<string>", "exec")
        return True
    except (SyntaxError, ValueError):  # ValueError: source contains NUL bytes
        return False


def _execution_summary(verdicts: list[dict]) -> dict[str, Any]:
    """The reference's check_code_executes result from per-test verdicts."""
    total = len(verdicts)
    passed = sum(v["status"] == "success" for v in verdicts)
    timeouts = sum(v["status"] == "timeout" for v in verdicts)
    if passed == total:
        status = "all_passed"
    elif passed > 0:
        status = "some_failed"
    else:
        status = "timeout" if timeouts == total else "error"
    return {
        "passed": passed,
        "total": total,
        "exec_status": status,
        "test_passed": [v["status"] == "success" for v in verdicts],
        "test_errors": [None if v["status"] == "success" else v["error"] for v in verdicts],
    }


def _format_only_verdicts(exc: SandboxUnavailable, count: int, allow: bool | None) -> list[dict]:
    """Without a sandbox, never run model code: re-raise unless the caller opted in to
    format-only MBPP scores (then every test counts as failed, with the reason)."""
    global _WARNED_FORMAT_ONLY
    if not format_only_allowed(allow):
        raise exc
    if not _WARNED_FORMAT_ONLY:
        _WARNED_FORMAT_ONLY = True
        _LOG.warning("MBPP tests are NOT run (format-only scores accepted explicitly): %s", exc)
    return [{"status": "process_error", "error": str(exc)}] * count


def score(solution_str: str, ground_truth: Any, *, pool: SandboxPool | None = None,
          allow_format_only: bool | None = None) -> dict[str, Any]:
    """``allow_format_only`` (default: ``$GRAIL_ALLOW_FORMAT_ONLY_MBPP``) accepts format-only
    scores when no sandbox can start; otherwise that raises SandboxUnavailable."""
    parsed = parse_completion(solution_str)
    code = parsed.inside
    syntax_valid = bool(code) and _compiles(code)
    solution_format = parsed.has_solution and parsed.trailing < 50
    result: dict[str, Any] = {
        "route": "mbpp",
        "code_len": len(code),
        "syntax_valid": syntax_valid,
        "answer": parsed.has_solution,
        "thinking": parsed.thinking,
        "trailing": parsed.trailing,
        "solution_format": solution_format,
        "executed": False,
        "timed_out": False,
        "reason": "",
    }
    test_data, reason = _load_ground_truth(ground_truth)
    result["reason"] = reason
    correctness = 0.0
    pass_rate = None
    if code and test_data is not None:
        try:
            tests = build_tests(test_data)
        except TypeError as exc:
            tests = []
            result["reason"] = f"ground_truth test fields are malformed: {exc}"
        if tests:
            result["executed"] = True
            if syntax_valid:
                try:
                    verdicts = (pool or default_pool()).run_tests(code, tests)
                except SandboxUnavailable as exc:  # never run model code unconfined
                    verdicts = _format_only_verdicts(exc, len(tests), allow_format_only)
                    result["reason"] = str(exc)
                summary = _execution_summary(verdicts)
            else:  # the reference checks syntax before running anything
                summary = {"passed": 0, "total": len(tests), "exec_status": "syntax_error",
                           "test_passed": [], "test_errors": []}
            result.update(summary)
            result["timed_out"] = summary["exec_status"] != "syntax_error" and any(
                error == "Execution timed out" for error in summary["test_errors"]
            )
            pass_rate = summary["passed"] / summary["total"]
            correctness = 0.7 * pass_rate
    result["pass_rate"] = pass_rate
    result["correctness"] = correctness
    result["score"] = (
        correctness
        + (0.1 if syntax_valid else 0.0)
        + (0.1 if solution_format else 0.0)
        + (0.1 if parsed.thinking else 0.0)
    )
    return {"score": result.pop("score"), **result}
