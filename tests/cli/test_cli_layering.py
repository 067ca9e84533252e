"""Imports run one way: the command-line package sits above the layers and none of them imports it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "grail_megatron"
# The smoke driver (`make smoke`) runs the commands the way a user does, as a script would.
DRIVERS = {PACKAGE / "local" / "smoke.py"}


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_layer_imports_the_cli_package():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if PACKAGE / "cli" in path.parents or path in DRIVERS:
            continue
        bad = sorted(m for m in _imported_modules(path) if m == "grail_megatron.cli" or m.startswith("grail_megatron.cli."))
        if bad:
            offenders.append(f"{path.relative_to(PACKAGE.parent)}: {', '.join(bad)}")
    assert offenders == []


def test_config_no_longer_holds_entry_points():
    config = {p.name for p in (PACKAGE / "config").glob("*.py")}
    assert not config & {"train_cli.py", "plan_cli.py", "env_launch.py"}
    for name in ("train", "plan", "env_launch", "convert", "eval", "prepare_data", "preflight", "exits"):
        assert (PACKAGE / "cli" / f"{name}.py").is_file(), name
