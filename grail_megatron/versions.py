"""The version matrix (DESIGN.md section 3), read from versions.toml."""
from __future__ import annotations

import functools
import importlib.metadata
import pathlib
import tomllib

MATRIX_PATH = pathlib.Path(__file__).with_name("versions.toml")


@functools.cache
def matrix() -> dict[str, dict[str, str]]:
    return tomllib.loads(MATRIX_PATH.read_text())


def pypi_pins() -> dict[str, str]:
    return dict(matrix()["pypi"])


def container_pins() -> dict[str, str]:
    return dict(matrix()["container"])


def installed_mismatches() -> dict[str, tuple[str, str | None]]:
    """Packages whose installed version differs from the matrix: name -> (wanted, found)."""
    out = {}
    for name, wanted in pypi_pins().items():
        try:
            found = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found = None
        if found is None or found.split("+")[0] != wanted:
            out[name] = (wanted, found)
    return out
