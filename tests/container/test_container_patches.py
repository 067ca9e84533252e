"""patches/: the series applies to the pinned Megatron-LM source and each patch fixes what it says.

The source is the megatron-core sdist of the version matrix (see conftest.py). Each patch
has a CPU scenario in megatron_cpu_scenarios.py that fails on the unpatched tree, inside
the file the patch changes, and passes on the patched tree with exact values. The patches
change disjoint files, so the unpatched failure of a scenario is also its failure with
every other patch applied: each patch is needed for its scenario.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from container_helpers import PATCH_DIR, copy_tree, git, git_apply, series

SCENARIOS = Path(__file__).with_name("megatron_cpu_scenarios.py")

# patch -> (scenario in megatron_cpu_scenarios.py, file in which the unpatched tree fails)
PATCH_SCENARIOS = {
    "0001-rope-keep-frequencies-on-cpu-without-gpu.patch": ("rope", "rotary_pos_embedding.py"),
    "0002-schedules-token-counter-on-available-device.patch": ("schedules", "schedules.py"),
    "0003-optimizer-clip-grads-on-gradient-device.patch": ("clip_grads", "clip_grads.py"),
}


def touched_files(patch: Path) -> set[str]:
    return set(re.findall(r"^diff --git a/(\S+) b/", patch.read_text(), flags=re.M))


def header(patch: Path) -> str:
    text = patch.read_text()
    return text[: text.index("\ndiff --git ")]


# --------------------------------------------------------------------------- the series


def test_series_lists_every_patch_once():
    listed = [p.name for p in series()]
    assert listed, "patches/series is empty"
    assert len(listed) == len(set(listed)), listed
    assert sorted(listed) == sorted(p.name for p in PATCH_DIR.glob("*.patch"))
    assert listed == sorted(listed), "series order should follow the numbering"


def test_every_patch_has_a_scenario_that_proves_it():
    assert set(PATCH_SCENARIOS) == {p.name for p in series()}


@pytest.mark.parametrize("patch", series(), ids=lambda p: p.name[:4])
def test_patch_header_says_what_why_upstream_and_test(patch):
    text = header(patch)
    assert re.search(r"^Subject: \[PATCH \d+/\d+\] \S", text, flags=re.M), text[:200]
    for section in ("What:", "Why:", "Upstream:", "Test:"):
        assert re.search(rf"^{section} \S", text, flags=re.M), f"{patch.name} lacks {section}"
    assert "tests/container/test_container_patches.py" in text


def test_patches_change_disjoint_files_under_megatron_core():
    seen: dict[str, str] = {}
    for patch in series():
        files = touched_files(patch)
        assert files, f"{patch.name} changes nothing"
        for name in files:
            assert name.startswith("megatron/core/"), name
            assert name not in seen, f"{name} is changed by {seen[name]} and {patch.name}"
            seen[name] = patch.name


# --------------------------------------------------------------------------- applying


@pytest.mark.parametrize("patch", series(), ids=lambda p: p.name[:4])
def test_patch_applies_alone_to_the_pristine_source(patch, megatron_source):
    done = git_apply(megatron_source, patch, "--check", "-v")
    assert done.returncode == 0, done.stderr
    for name in touched_files(patch):
        assert f"Checking patch {name}..." in done.stderr


def test_series_applies_with_gnu_patch_too(megatron_source, tmp_path):
    tree = copy_tree(megatron_source, tmp_path / "src")
    for patch in series():
        done = subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", str(patch)],
                              cwd=tree, capture_output=True, text=True)
        assert done.returncode == 0, f"{patch.name}:\n{done.stdout}{done.stderr}"
        assert "offset" not in done.stdout and "fuzz" not in done.stdout, done.stdout
    assert not list(tree.rglob("*.rej")) and not list(tree.rglob("*.orig"))


def test_patched_source_compiles(patched_source):
    done = subprocess.run([sys.executable, "-m", "compileall", "-q", "megatron"],
                          cwd=patched_source, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    schedules = (patched_source / "megatron/core/pipeline_parallel/schedules.py").read_text()
    assert 'total_num_tokens = torch.zeros([], dtype=torch.int, device="cuda")' not in schedules
    assert schedules.count("device=_token_counter_device()") == 3


@pytest.fixture()
def git_checkout(megatron_source, tmp_path) -> Path:
    """The source as a git repository, like the Megatron-LM clone in the image build."""
    tree = copy_tree(megatron_source, tmp_path / "Megatron-LM")
    for args in (("init", "-q"), ("add", "-A"),
                 ("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "core_v0.18.0")):
        assert git(tree, *args).returncode == 0
    return tree


def test_series_applies_with_git_apply_3way_as_in_the_dockerfile(git_checkout):
    for patch in series():
        done = git_apply(git_checkout, patch, "--3way")
        assert done.returncode == 0, f"{patch.name}:\n{done.stderr}"
        assert "with conflicts" not in done.stderr
    assert git(git_checkout, "diff", "--name-only", "--diff-filter=U").stdout == ""
    changed = set(git(git_checkout, "diff", "--cached", "--name-only").stdout.split())
    assert changed == set().union(*(touched_files(p) for p in series()))


def test_git_apply_3way_exits_nonzero_on_a_conflict(git_checkout):
    """The image build relies on this: a drifted Megatron-LM ref must stop the build."""
    target = git_checkout / "megatron/core/pipeline_parallel/schedules.py"
    text = target.read_text()
    assert text.count('total_num_tokens = torch.zeros([], dtype=torch.int, device="cuda")') == 3
    target.write_text(text.replace('dtype=torch.int, device="cuda")', 'dtype=torch.long, device="cuda")'))
    git(git_checkout, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "upstream drift")
    patch = next(p for p in series() if "schedules.py" in " ".join(touched_files(p)))
    done = git_apply(git_checkout, patch, "--3way")
    assert done.returncode != 0
    assert "megatron/core/pipeline_parallel/schedules.py" in git(
        git_checkout, "diff", "--name-only", "--diff-filter=U").stdout


# --------------------------------------------------------------------------- behaviour


def _start_scenarios(tree: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "CUDA_VISIBLE_DEVICES": ""}
    names = [scenario for scenario, _ in PATCH_SCENARIOS.values()] + ["selftest_sees_patches"]
    return subprocess.Popen([sys.executable, str(SCENARIOS), *names], env=env, cwd=tree.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _collect(proc: subprocess.Popen, tree: Path) -> dict[str, dict]:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    results = {r["scenario"]: r for r in map(json.loads, out.splitlines())}
    for result in results.values():  # the tree under test was imported, not site-packages
        assert Path(result["megatron"]) == tree / "megatron" / "core", result["megatron"]
    return results


@pytest.fixture(scope="module")
def scenario_results(megatron_source, patched_source) -> dict[str, dict[str, dict]]:
    """Every scenario on the unpatched and on the patched tree (two interpreters in parallel)."""
    procs = {"unpatched": (_start_scenarios(megatron_source), megatron_source),
             "patched": (_start_scenarios(patched_source), patched_source)}
    return {label: _collect(proc, tree) for label, (proc, tree) in procs.items()}


@pytest.mark.parametrize("patch_name", sorted(PATCH_SCENARIOS), ids=lambda n: n[:4])
def test_scenario_fails_without_the_patch_inside_the_patched_file(patch_name, scenario_results):
    scenario, failing_file = PATCH_SCENARIOS[patch_name]
    result = scenario_results["unpatched"][scenario]
    assert not result["ok"], f"{scenario} passes on unpatched megatron-core: the patch is not needed"
    assert f" at {failing_file}:" in result["error"], result["error"]
    assert "NVIDIA driver" in result["error"] or "CUDA" in result["error"], result["error"]
    assert failing_file in {Path(f).name for f in touched_files(PATCH_DIR / patch_name)}


@pytest.mark.parametrize("patch_name", sorted(PATCH_SCENARIOS), ids=lambda n: n[:4])
def test_scenario_passes_with_the_patch(patch_name, scenario_results):
    scenario, _ = PATCH_SCENARIOS[patch_name]
    result = scenario_results["patched"][scenario]
    assert result["ok"], result["error"]


def test_the_image_selftest_tells_patched_from_unpatched(scenario_results):
    """scripts/gpu_selftest.sh's `megatron_patches` check (docker/selftest/check_kernels.py)."""
    unpatched = scenario_results["unpatched"]["selftest_sees_patches"]
    assert not unpatched["ok"] and "patch 0002 missing" in unpatched["error"], unpatched
    assert scenario_results["patched"]["selftest_sees_patches"]["ok"], scenario_results["patched"]
