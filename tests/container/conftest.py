"""Fixtures for the container checks: the pinned Megatron-LM source and the patch series.

The Megatron-LM source is the megatron-core sdist of the version matrix, fetched once with
pip and kept in pytest's cache directory (`.pytest_cache/d/megatron-core-sdist`). Its
`megatron/core/...` paths are the same as in a Megatron-LM checkout at `core_v0.18.0`
(every .py file is byte-identical to the tag's), so a patch that applies here applies in
the image build.
"""
from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from container_helpers import copy_tree, git_apply, pip_download_sdist, series

from grail_megatron import versions


@pytest.fixture(scope="session")
def megatron_sdist(request) -> Path:
    """Path of megatron_core-<matrix version>.tar.gz, downloaded on first use."""
    version = versions.pypi_pins()["megatron-core"]
    cache_plugin = getattr(request.config, "cache", None)  # absent under `-p no:cacheprovider`
    if cache_plugin is not None:
        cache = Path(cache_plugin.mkdir("megatron-core-sdist"))
    else:
        cache = request.getfixturevalue("tmp_path_factory").mktemp("megatron-core-sdist")
    archive = cache / f"megatron_core-{version}.tar.gz"
    if not archive.exists():
        pip_download_sdist(version, cache)
    assert archive.exists(), f"pip did not produce {archive.name} in {cache}"
    return archive


@pytest.fixture(scope="session")
def megatron_source(megatron_sdist, tmp_path_factory) -> Path:
    """A pristine extracted source tree (its root holds `megatron/core`). Do not modify it."""
    out = tmp_path_factory.mktemp("megatron-src")
    with tarfile.open(megatron_sdist) as tar:
        tar.extractall(out, filter="data")
    (tree,) = out.iterdir()
    assert (tree / "megatron" / "core" / "__init__.py").exists()
    return tree


@pytest.fixture(scope="session")
def patched_source(megatron_source, tmp_path_factory) -> Path:
    """The source tree with the whole series applied in order with `git apply`."""
    tree = copy_tree(megatron_source, tmp_path_factory.mktemp("megatron-patched") / "src")
    for patch in series():
        done = git_apply(tree, patch)
        assert done.returncode == 0, f"{patch.name} does not apply:\n{done.stderr}"
    return tree


@pytest.fixture(scope="session")
def small_wheelhouse(tmp_path_factory) -> Path:
    """OUT of `scripts/make_wheelhouse.sh OUT --requirements ... --part-mb 0.1` (real downloads)."""
    import importlib.metadata
    import os
    import subprocess
    import sys

    from container_helpers import PART_MB, ROOT, SMALL_SET

    work = tmp_path_factory.mktemp("wheelhouse")
    requirements = work / "small.txt"
    requirements.write_text("".join(f"{n}=={importlib.metadata.version(n)}\n" for n in SMALL_SET))
    out = work / "out"
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "make_wheelhouse.sh"), str(out), "--requirements", str(requirements),
         "--no-build-isolation", "--part-mb", str(PART_MB)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHON312": sys.executable})
    assert done.returncode == 0, done.stdout + done.stderr
    (out / "build.log").write_text(done.stdout)
    return out


@pytest.fixture(scope="session", autouse=True)
def default_wheelhouse_plan(tmp_path_factory):
    """`scripts/make_wheelhouse.sh OUT --dry-run` of the default set (grail-megatron's dependencies
    under the version matrix): pip resolves ~155 packages from their metadata, ~20-40 s mostly
    spent waiting on the index, so it starts with the first container test and overlaps with
    the others. test_container_wheelhouse.py reads the plan."""
    import os
    import signal
    import subprocess
    import sys

    from container_helpers import ROOT

    out = tmp_path_factory.mktemp("default-plan")
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "make_wheelhouse.sh"), str(out), "--dry-run"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHON312": sys.executable}, start_new_session=True)
    yield out, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
