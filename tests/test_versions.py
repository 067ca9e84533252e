"""The installed environment matches the version matrix in grail_megatron/versions.toml."""
import subprocess
import sys
from pathlib import Path

from grail_megatron import versions

ROOT = Path(__file__).resolve().parent.parent


def test_matrix_has_the_design_versions():
    pins = versions.pypi_pins()
    assert pins["torch"] == "2.11.0"
    assert pins["megatron-core"] == "0.18.0"
    assert pins["verl"] == "0.9.1"


def test_installed_packages_match_the_matrix():
    assert versions.installed_mismatches() == {}


def test_pins_tool_prints_the_matrix_as_constraints():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "pins.py")], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines == [f"{k}=={v}" for k, v in versions.pypi_pins().items()]


def test_python_is_312():
    assert sys.version_info[:2] == (3, 12)
