"""scripts/make_wheelhouse.sh and the offline install of the bare GPU self-test (docker/selftest/wheelhouse.py).

Real downloads from the package index, a real sdist built into a wheel, real tar parts, a real
`pip install --no-index --require-hashes` into a private prefix created from this venv's
Python (standing in for a GPU node's Python with its torch). The default set (grail-megatron's
dependencies under the version matrix) is resolved with pip for real, without downloading it.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
from container_helpers import PART_MB, ROOT, SMALL_SET

SCRIPT = ROOT / "scripts" / "make_wheelhouse.sh"
HELPER = ROOT / "docker" / "selftest" / "wheelhouse.py"
LIMIT = int(PART_MB * 1_000_000)


def load_wheelhouse_module():
    spec = importlib.util.spec_from_file_location("selftest_wheelhouse", HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wh = load_wheelhouse_module()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def install(directory: Path, prefix: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HELPER), "install", str(directory), "--prefix", str(prefix),
                           "--python", sys.executable, "--report", str(prefix.parent / "install.json")],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def manifest(small_wheelhouse) -> dict:
    return json.loads((small_wheelhouse / "manifest.json").read_text())


# --------------------------------------------------------------------------- the builder


def test_script_usage():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    assert os.access(SCRIPT, os.X_OK)
    done = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--part-mb" in done.stdout and "versions.toml" in done.stdout
    assert subprocess.run(["bash", str(SCRIPT)], capture_output=True).returncode != 0


def test_manifest_lists_every_wheel_with_its_size_and_hash(small_wheelhouse, manifest):
    wheels = small_wheelhouse / "wheels"
    assert sorted(f["file"] for f in manifest["files"]) == sorted(p.name for p in wheels.iterdir())
    assert {f["name"] for f in manifest["files"]} == set(SMALL_SET)
    for f in manifest["files"]:
        path = wheels / f["file"]
        assert f["size"] == path.stat().st_size and f["sha256"] == sha256(path), f["file"]
        assert f["version"] == importlib.metadata.version(f["name"])
        assert wh.wheel_fits_target(f["file"])
    assert manifest["total_size"] == sum(f["size"] for f in manifest["files"])
    matrix = tomllib.loads((ROOT / "grail_megatron" / "versions.toml").read_text())["pypi"]
    assert manifest["matrix"] == matrix
    # the pip-installable requirement list pins each file by its hash
    lines = (small_wheelhouse / "requirements.txt").read_text().splitlines()
    assert sorted(lines) == sorted(f"{f['name']}=={f['version']} --hash=sha256:{f['sha256']}" for f in manifest["files"])


def test_sdist_is_built_into_a_wheel_and_index_wheels_keep_the_index_hash(manifest):
    by_name = {f["name"]: f for f in manifest["files"]}
    built = by_name["antlr4-python3-runtime"]
    assert built["source"] == "built from sdist"
    assert built["sdist"].endswith(".tar.gz") and re.fullmatch(r"[0-9a-f]{64}", built["sdist_sha256"])
    assert built["file"].endswith("-py3-none-any.whl")
    for name in ("six", "idna"):
        assert by_name[name]["source"] == "index wheel" and "sdist" not in by_name[name]


def test_parts_are_at_most_the_limit_and_cut_a_larger_wheel(small_wheelhouse, manifest):
    parts_dir = small_wheelhouse / "parts"
    parts = manifest["parts"]
    on_disk = sorted(p.name for p in parts_dir.glob("*.tar"))
    assert on_disk == [p["file"] for p in parts] and len(parts) >= 2
    assert json.loads((parts_dir / "manifest.json").read_text()) == manifest
    for p in parts:
        path = parts_dir / p["file"]
        assert path.stat().st_size == p["size"] <= LIMIT and sha256(path) == p["sha256"]
        with tarfile.open(path) as tar:
            assert [m.name for m in tar.getmembers()] == [m["member"] for m in p["members"]]
    big = next(f for f in manifest["files"] if f["size"] > LIMIT)  # the antlr4 wheel
    pieces = sorted((m for p in parts for m in p["members"] if m["file"] == big["file"]), key=lambda m: m["offset"])
    assert len(pieces) >= 2 and sum(m["length"] for m in pieces) == big["size"]
    assert [m["offset"] for m in pieces] == [sum(m["length"] for m in pieces[:i]) for i in range(len(pieces))]
    # every file is in the parts exactly once
    covered = {}
    for p in parts:
        for m in p["members"]:
            covered[m["file"]] = covered.get(m["file"], 0) + m["length"]
    assert covered == {f["file"]: f["size"] for f in manifest["files"]}


def test_part_planner_respects_any_limit():
    files = [{"file": f"pkg{i}-1.0-py3-none-any.whl", "size": s}
             for i, s in enumerate([5, 40_000, 250_000, 99_000, 1_234_567, 10_240, 512])]
    for limit in (60_000, 100_000, 1_000_000):
        plan = wh.plan_parts(files, limit)
        for members in plan:
            cost = sum(wh._member_cost(m["member"], m["length"]) for m in members)
            assert wh._archive_size(cost) <= limit
        total = {}
        for members in plan:
            for m in members:
                total[m["file"]] = total.get(m["file"], 0) + m["length"]
        assert total == {f["file"]: f["size"] for f in files}
    with pytest.raises(wh.WheelhouseError, match="too small"):
        wh.plan_parts(files, 5_000)


def test_target_tags_and_exclusions():
    assert wh.wheel_fits_target("six-1.17.0-py2.py3-none-any.whl")
    assert wh.wheel_fits_target("tokenizers-0.22.2-cp39-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl")
    assert wh.wheel_fits_target("multiprocess-0.70.19-py312-none-any.whl")
    assert not wh.wheel_fits_target("numpy-2.5.5-cp311-cp311-manylinux_2_28_x86_64.whl")
    assert not wh.wheel_fits_target("numpy-2.5.5-cp312-cp312-macosx_14_0_arm64.whl")
    assert not wh.wheel_fits_target("numpy-2.5.5-cp312-cp312-manylinux_2_28_aarch64.whl")
    assert wh.required_glibc("psutil-7.2.2-cp36-abi3-manylinux2010_x86_64.manylinux_2_12_x86_64.whl") == (2, 12)
    assert wh.required_glibc("cryptography-50.0.2-cp311-abi3-manylinux_2_34_x86_64.whl") == (2, 34)
    for name in ("torch", "triton", "nvidia-cublas", "nvidia_nccl_cu13", "cuda-bindings", "cuda-toolkit"):
        assert wh.is_excluded(name), name
    for name in ("torchdata", "megatron-core", "transformers", "cudapy"):
        assert not wh.is_excluded(name), name


def test_default_set_is_the_version_matrix_without_torch(default_wheelhouse_plan):
    """The real default set: grail-megatron's dependencies resolved by pip under versions.toml
    (conftest starts the resolution when the container tests begin)."""
    out, proc = default_wheelhouse_plan
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    plan = json.loads((out / "plan.json").read_text())
    kept = {i["name"]: i["version"] for i in plan["kept"]}
    excluded = {i["name"]: i["version"] for i in plan["excluded"]}
    matrix = tomllib.loads((ROOT / "grail_megatron" / "versions.toml").read_text())["pypi"]
    for name, version in matrix.items():
        if name == "torch":
            assert excluded["torch"] == version and "torch" not in kept
        else:
            assert kept[name] == version, name
    assert not [n for n in kept if wh.is_excluded(n)]
    assert any(n.startswith("nvidia-") for n in excluded) and "triton" in excluded
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in project:
        name = wh.normalize(re.split(r"[<>=!\[; ]", requirement, maxsplit=1)[0])
        assert name == "torch" or name in kept, name
    assert plan["constraints"] == matrix
    assert "PASS wheelhouse_plan:" in output


# --------------------------------------------------------------------------- the install


def node_site_snapshot() -> dict[str, float]:
    site = Path(importlib.util.find_spec("six").origin).parent
    return {p.name: p.stat().st_mtime for p in site.iterdir()}


def test_install_from_the_parts_into_a_private_prefix(small_wheelhouse, manifest, tmp_path):
    transfer = tmp_path / "transfer"  # what a user copies to the node: the parts folder only
    shutil.copytree(small_wheelhouse / "parts", transfer)
    before = node_site_snapshot()
    prefix = tmp_path / "prefix"
    done = install(transfer, prefix)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS wheelhouse_verify:" in done.stdout and "(parts)" in done.stdout
    assert "PASS wheelhouse_install: 3 wheels" in done.stdout
    assert "PASS node_torch_untouched:" in done.stdout
    assert node_site_snapshot() == before  # nothing of the "node" changed
    py = prefix / "bin" / "python"
    probe = subprocess.run([str(py), "-c", "import json, six, idna, antlr4, torch, importlib.metadata as m; "
                            "print(json.dumps({'six': six.__file__, 'idna': idna.__file__, 'torch': torch.__file__,"
                            " 'v': m.version('six')}))"], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    where = json.loads(probe.stdout)
    import torch

    assert where["six"].startswith(str(prefix)) and where["idna"].startswith(str(prefix))
    assert where["torch"] == torch.__file__  # the node's torch, from where it was
    assert where["v"] == importlib.metadata.version("six")
    report = json.loads((tmp_path / "install.json").read_text())
    assert report["files"] == 3 and report["node_torch"]["version"] == torch.__version__
    assert not list(Path(report["python"]).parent.parent.glob("lib/python3.12/site-packages/torch"))


def test_a_corrupted_wheel_is_refused_before_anything_is_installed(small_wheelhouse, manifest, tmp_path):
    copy = tmp_path / "wh"
    shutil.copytree(small_wheelhouse / "wheels", copy / "wheels")
    shutil.copy(small_wheelhouse / "manifest.json", copy / "manifest.json")
    victim = copy / "wheels" / next(f["file"] for f in manifest["files"] if f["name"] == "idna")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte different
    victim.write_bytes(bytes(data))
    prefix = tmp_path / "prefix"
    done = install(copy, prefix)
    assert done.returncode == 1
    assert re.search(rf"^FAIL wheelhouse_install: the wheelhouse is damaged", done.stdout, flags=re.M)
    assert f"{victim.name}: sha256 mismatch" in done.stdout
    assert not prefix.exists()


def test_missing_or_damaged_part_is_named(small_wheelhouse, manifest, tmp_path):
    parts = manifest["parts"]
    gone = tmp_path / "gone"
    shutil.copytree(small_wheelhouse / "parts", gone)
    (gone / parts[1]["file"]).unlink()
    done = install(gone, tmp_path / "p1")
    assert done.returncode == 1 and f"missing part(s) in {gone}: {parts[1]['file']}" in done.stdout
    bad = tmp_path / "bad"
    shutil.copytree(small_wheelhouse / "parts", bad)
    target = bad / parts[0]["file"]
    data = bytearray(target.read_bytes())
    data[700] ^= 0x01
    target.write_bytes(bytes(data))
    done = install(bad, tmp_path / "p2")
    assert done.returncode == 1 and f"{parts[0]['file']}: sha256 mismatch" in done.stdout
    assert not (tmp_path / "p1").exists() and not (tmp_path / "p2").exists()


def test_a_wheelhouse_holding_torch_is_refused(small_wheelhouse, tmp_path):
    copy = tmp_path / "wh"
    shutil.copytree(small_wheelhouse / "wheels", copy / "wheels")
    manifest = json.loads((small_wheelhouse / "manifest.json").read_text())
    manifest["files"].append(dict(manifest["files"][0], file="torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl",
                                  name="torch"))
    (copy / "manifest.json").write_text(json.dumps(manifest))
    done = install(copy, tmp_path / "prefix")
    assert done.returncode == 1 and "must never install torch" in done.stdout
