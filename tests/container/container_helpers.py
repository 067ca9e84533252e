"""Shared helpers of the container tests (paths, the patch series, git/pip wrappers)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PATCH_DIR = ROOT / "patches"
DOCKERFILE = ROOT / "docker" / "megatron.Dockerfile"
# The small real wheelhouse of the wheelhouse and bare self-test checks (conftest.small_wheelhouse):
# two pure-python wheels and one sdist-only package (built into a wheel), at the versions this
# venv already has, so a prefix that holds them behaves exactly like this venv.
SMALL_SET = ("six", "idna", "antlr4-python3-runtime")
PART_MB = 0.1  # 100,000 bytes: the antlr4 wheel (~145 kB) must be cut into pieces


def series() -> list[Path]:
    """The patch files in `patches/series` order (comments and blank lines skipped)."""
    lines = (PATCH_DIR / "series").read_text().splitlines()
    return [PATCH_DIR / line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def pip_download_sdist(version: str, dest: Path) -> None:
    base = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
            "-d", str(dest), f"megatron-core=={version}"]
    # Without build isolation pip reads the sdist's metadata with the venv's setuptools and
    # pybind11 (2 s); with isolation it first installs them in a throwaway env (~60 s).
    done = subprocess.run(base + ["--no-build-isolation"], capture_output=True, text=True)
    if done.returncode != 0:
        subprocess.run(base, check=True, capture_output=True, text=True)


def copy_tree(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def git(tree: Path, *args: str) -> subprocess.CompletedProcess:
    """git in `tree`, never discovering a repository above it (tmp dirs may sit in one)."""
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tree.parent)}
    return subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True, env=env)


def git_apply(tree: Path, patch: Path, *flags: str) -> subprocess.CompletedProcess:
    return git(tree, "apply", *flags, str(patch))
