"""Wheelhouse for the bare GPU self-test: build it on a connected machine, install it offline.

Standard library only: the `install` side runs with the GPU node's own Python before anything
else is installed. Two halves:

  build OUT     (connected machine, Python 3.12 on Linux x86_64; scripts/make_wheelhouse.sh)
      1. the requirement set: grail-megatron's dependencies (pyproject.toml) with the version
         matrix (grail_megatron/versions.toml) as constraints, or --requirements FILE;
      2. pip resolves it (`pip install --dry-run --ignore-installed --report`, metadata only);
      3. torch and its CUDA runtime (torch, triton, nvidia-*, cuda-*) are dropped: they are the
         node's own and are never installed by the self-test;
      4. `pip wheel --no-deps --require-hashes` fetches every remaining file, checking the
         index's sha256, and builds a wheel from each sdist (antlr4-python3-runtime, or
         megatron-core where the index has no wheel);
      5. writes OUT/wheels/*.whl, OUT/requirements.txt (name==version --hash=sha256:...) and
         OUT/manifest.json (size and sha256 of every file, where it came from, the matrix);
      6. with --part-mb N: OUT/parts/ holds tar files of at most N MB (10^6 bytes) each, plus a
         copy of the manifest; a wheel larger than a part is cut into pieces across parts.

  install DIR --prefix P [--python NODE_PYTHON]   (the GPU node, offline)
      DIR is OUT (wheels/ + manifest.json) or OUT/parts (the part files + manifest.json).
      Every part and every file is checked against the manifest's size and sha256 before
      anything is installed; then a virtual environment P is created from NODE_PYTHON, the
      node's own site-packages (its torch) are appended to P's path through a .pth file, and
      `pip install --no-index --no-deps --require-hashes` installs exactly the manifest's files
      into P (pip's configuration and PIP_* variables are ignored, so no other index is used).
      The node's environment is never written to: torch is imported from where it was.

  verify DIR    the checks of `install` without installing.

Output lines start with PASS/FAIL (the self-test's convention); exit status 0 = success.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MATRIX = ROOT / "grail_megatron" / "versions.toml"
PYPROJECT = ROOT / "pyproject.toml"
SCHEMA = 1
MB = 1_000_000  # --part-mb counts decimal megabytes (smaller than MiB: safe for both readings)
# The node brings these with its CUDA build of torch; installing them would shadow its torch.
EXCLUDED_PATTERNS = (r"torch", r"triton", r"nvidia-.*", r"cuda-.*")
TAR_BLOCK, TAR_RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE
PART_NAME = "grail-wheelhouse-part-{index:03d}-of-{count:03d}.tar"
TARGET_PYTHON = (3, 12)


class WheelhouseError(RuntimeError):
    """A problem with the wheelhouse or the environment, explained for the user."""


# ----------------------------------------------------------------------------- small helpers


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def is_excluded(name: str) -> bool:
    return any(re.fullmatch(p, normalize(name)) for p in EXCLUDED_PATTERNS)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def wheel_name_version(filename: str) -> tuple[str, str]:
    parts = filename[:-len(".whl")].split("-")
    if len(parts) < 5:
        raise WheelhouseError(f"{filename} is not a wheel file name")
    return normalize(parts[0]), parts[1]


def wheel_tags(filename: str) -> tuple[str, str, str]:
    python, abi, plat = filename[:-len(".whl")].split("-")[-3:]
    return python, abi, plat


def wheel_fits_target(filename: str) -> bool:
    """True if the wheel installs on CPython 3.12, Linux x86_64 (by its file name tags)."""
    python, abi, plat = wheel_tags(filename)
    platforms = plat.split(".")
    if not all(p == "any" or (p.endswith("x86_64") and ("linux" in p)) for p in platforms):
        return False
    for tag in python.split("."):
        if tag in ("py3", "cp312", "py312"):
            return True
        match = re.fullmatch(r"(cp|py)3(\d+)", tag)
        if match and int(match.group(2)) <= 12 and (match.group(1) == "py" or abi == "abi3"):
            return True
    return False


def required_glibc(filename: str) -> tuple[int, int] | None:
    """Lowest glibc among the wheel's manylinux tags (None for pure or plain linux wheels)."""
    legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
    found = []
    for plat in wheel_tags(filename)[2].split("."):
        match = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", plat)
        if match:
            found.append((int(match.group(1)), int(match.group(2))))
        elif plat.split("_x86_64")[0] in legacy:
            found.append(legacy[plat.split("_x86_64")[0]])
    return min(found) if found else None


def node_glibc() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except (ValueError, OSError, AttributeError):
        return None


def clean_pip_env() -> dict:
    """The environment for a pip that must use only what we pass (no config, no PIP_*)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def run(cmd: list[str], env: dict | None = None, what: str = "") -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
        raise WheelhouseError(f"{what or cmd[0]} failed (exit {done.returncode}):\n{tail}")
    return done


def matrix_pins() -> dict[str, str]:
    import tomllib

    return dict(tomllib.loads(MATRIX.read_text())["pypi"])


def project_requirements() -> list[str]:
    import tomllib

    return list(tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"])


# ----------------------------------------------------------------------------- build


def check_builder() -> None:
    if sys.version_info[:2] != TARGET_PYTHON or platform.machine() != "x86_64" or not sys.platform.startswith("linux"):
        raise WheelhouseError(
            f"the wheelhouse is built for CPython 3.12 on Linux x86_64 (sdists are compiled here), but "
            f"this is Python {platform.python_version()} on {sys.platform} {platform.machine()}: run "
            "scripts/make_wheelhouse.sh with PYTHON312=/path/to/python3.12 on a Linux x86_64 machine")


def resolve(requirements: list[str], constraints: dict[str, str], work: Path) -> list[dict]:
    """pip's resolution of `requirements` (metadata only): [{name, version, url, sha256, requested}]."""
    req_file, con_file, report = work / "requirements.in", work / "constraints.txt", work / "report.json"
    req_file.write_text("".join(f"{r}\n" for r in requirements))
    con_file.write_text("".join(f"{n}=={v}\n" for n, v in constraints.items()))
    run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
         "--report", str(report), "-c", str(con_file), "-r", str(req_file)], what="pip's resolution")
    items = []
    for entry in json.loads(report.read_text())["install"]:
        info = entry["download_info"]
        sha = (info.get("archive_info") or {}).get("hashes", {}).get("sha256")
        if not sha:
            raise WheelhouseError(f"{entry['metadata']['name']} resolves to {info['url']}, which has no "
                                  "sha256 (a local folder or VCS checkout cannot go into the wheelhouse)")
        items.append(dict(name=normalize(entry["metadata"]["name"]), version=entry["metadata"]["version"],
                          url=info["url"], sha256=sha, requested=bool(entry.get("requested"))))
    return items


def fetch_and_build(items: list[dict], wheels: Path, work: Path, build_isolation: bool) -> None:
    pinned = work / "pinned.txt"
    pinned.write_text("".join(f"{i['name']}=={i['version']} --hash=sha256:{i['sha256']}\n" for i in items))
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--require-hashes",
           "-r", str(pinned), "-w", str(wheels)]
    if not build_isolation:
        cmd.append("--no-build-isolation")
    run(cmd, what="pip wheel (download + build of the sdists)")


def describe_files(items: list[dict], wheels: Path) -> list[dict]:
    by_name = {}
    for path in sorted(wheels.glob("*.whl")):
        name, version = wheel_name_version(path.name)
        by_name.setdefault(name, []).append(path)
    files = []
    for item in items:
        found = by_name.pop(item["name"], [])
        if len(found) != 1:
            raise WheelhouseError(f"expected one wheel for {item['name']}=={item['version']}, found "
                                  f"{[p.name for p in found]}")
        (path,) = found
        if not wheel_fits_target(path.name):
            raise WheelhouseError(f"{path.name} does not install on CPython 3.12 Linux x86_64")
        sha = sha256_of(path)
        from_sdist = not item["url"].endswith(".whl")
        if not from_sdist and sha != item["sha256"]:
            raise WheelhouseError(f"{path.name}: sha256 {sha} differs from the index's {item['sha256']}")
        glibc = required_glibc(path.name)
        files.append(dict(
            file=path.name, name=item["name"], version=item["version"], size=path.stat().st_size,
            sha256=sha, source="built from sdist" if from_sdist else "index wheel",
            **({"sdist": item["url"].rsplit("/", 1)[-1], "sdist_sha256": item["sha256"]} if from_sdist else {}),
            requires_glibc=".".join(map(str, glibc)) if glibc else None, requested=item["requested"]))
    if by_name:
        raise WheelhouseError(f"unexpected wheels in {wheels}: {sorted(by_name)}")
    return files


def build(out: Path, requirements: list[str] | None, part_mb: float | None, build_isolation: bool,
          dry_run: bool) -> dict:
    check_builder()
    start = time.monotonic()
    pins = matrix_pins()
    requested = requirements if requirements is not None else project_requirements()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="grail-wheelhouse-") as tmp:
        work = Path(tmp)
        resolved = resolve(requested, pins, work)
        kept = [i for i in resolved if not is_excluded(i["name"])]
        excluded = [{"name": i["name"], "version": i["version"]} for i in resolved if is_excluded(i["name"])]
        plan = dict(requirements=requested, constraints=pins, kept=kept, excluded=excluded)
        if dry_run:
            (out / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
            for item in kept:
                kind = "wheel" if item["url"].endswith(".whl") else "sdist -> build"
                print(f"  {item['name']}=={item['version']}  ({kind})")
            print(f"PASS wheelhouse_plan: {len(kept)} packages, {len(excluded)} excluded "
                  f"({', '.join(e['name'] for e in excluded) or 'none'}); plan in {out / 'plan.json'}")
            return plan
        wheels = out / "wheels"
        if wheels.exists():
            shutil.rmtree(wheels)
        wheels.mkdir()
        fetch_and_build(kept, wheels, work, build_isolation)
        files = describe_files(kept, wheels)
    pip_version = run([sys.executable, "-m", "pip", "--version"]).stdout.split()[1]
    manifest = dict(
        schema=SCHEMA, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        target=dict(python="3.12", implementation="cp", platform="linux_x86_64"),
        builder=dict(python=platform.python_version(), pip=pip_version, glibc=".".join(map(str, node_glibc() or ()))),
        matrix=pins, requirements=requested, excluded=excluded,
        excluded_patterns=list(EXCLUDED_PATTERNS),
        total_size=sum(f["size"] for f in files), files=files)
    (out / "requirements.txt").write_text(requirements_text(manifest))
    if part_mb:
        manifest["parts"] = split(out, manifest, part_mb)
    write_manifest(out / "manifest.json", manifest)
    if part_mb:
        write_manifest(out / "parts" / "manifest.json", manifest)
    built = sum(f["source"] == "built from sdist" for f in files)
    print(f"PASS wheelhouse_build: {len(files)} wheels ({built} built from sdists), "
          f"{manifest['total_size'] / MB:.1f} MB, {len(excluded)} excluded, "
          f"{time.monotonic() - start:.0f} s -> {out}")
    if part_mb:
        sizes = [p["size"] for p in manifest["parts"]]
        print(f"PASS wheelhouse_parts: {len(sizes)} parts of at most {part_mb:g} MB "
              f"(largest {max(sizes) / MB:.3f} MB) in {out / 'parts'}")
    return manifest


def requirements_text(manifest: dict) -> str:
    return "".join(f"{f['name']}=={f['version']} --hash=sha256:{f['sha256']}\n" for f in manifest["files"])


def write_manifest(path: Path, manifest: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2) + "\n")


# ----------------------------------------------------------------------------- parts


def _member_cost(name: str, length: int) -> int:
    """Bytes a regular member takes in a GNU tar (header, long-name record, padded data)."""
    cost = TAR_BLOCK + -(-length // TAR_BLOCK) * TAR_BLOCK
    if len(name.encode()) >= tarfile.LENGTH_NAME:
        cost += TAR_BLOCK + -(-(len(name.encode()) + 1) // TAR_BLOCK) * TAR_BLOCK
    return cost


def _archive_size(members_cost: int) -> int:
    return -(-(members_cost + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


def plan_parts(files: list[dict], limit: int) -> list[list[dict]]:
    """Cut the files into parts whose tar archives are at most `limit` bytes.

    Files that fit in a part are packed first-fit decreasing; a larger one is cut into pieces
    that fill whole parts, its remainder packed like a small file. Returns, per part, members
    {member, file, offset, length}.
    """
    if _archive_size(_member_cost("x" * 200, 1)) > limit:
        raise WheelhouseError(f"--part-mb {limit / MB:g} is too small for even one tar member")
    parts: list[list[dict]] = []
    used: list[int] = []

    def fits(index: int, member: str, length: int) -> bool:
        return _archive_size(used[index] + _member_cost(member, length)) <= limit

    def add(index: int, member: dict) -> None:
        parts[index].append(member)
        used[index] += _member_cost(member["member"], member["length"])

    def new_part() -> int:
        parts.append([])
        used.append(0)
        return len(parts) - 1

    pieces = []
    for f in sorted(files, key=lambda f: (-f["size"], f["file"])):
        whole = f["file"]
        if _archive_size(_member_cost(whole, f["size"])) <= limit:
            pieces.append(dict(member=whole, file=whole, offset=0, length=f["size"]))
            continue
        # cut into pieces that fill an empty part; the name is the longest it will be
        name = f"{whole}.piece-000"
        capacity = (limit // TAR_RECORD) * TAR_RECORD - 2 * TAR_BLOCK - _member_cost(name, 0)
        capacity = capacity // TAR_BLOCK * TAR_BLOCK
        offset, k = 0, 0
        while f["size"] - offset > capacity:
            index = new_part()
            add(index, dict(member=f"{whole}.piece-{k:03d}", file=whole, offset=offset, length=capacity))
            offset, k = offset + capacity, k + 1
        pieces.append(dict(member=f"{whole}.piece-{k:03d}", file=whole, offset=offset, length=f["size"] - offset))
    for piece in sorted(pieces, key=lambda p: -p["length"]):
        index = next((i for i in range(len(parts)) if fits(i, piece["member"], piece["length"])), None)
        if index is None:
            index = new_part()
        add(index, piece)
    return parts


def split(out: Path, manifest: dict, part_mb: float) -> list[dict]:
    limit = int(part_mb * MB)
    plan = plan_parts(manifest["files"], limit)
    parts_dir = out / "parts"
    if parts_dir.exists():
        shutil.rmtree(parts_dir)
    parts_dir.mkdir()
    wheels = out / "wheels"
    described = []
    for index, members in enumerate(plan, start=1):
        name = PART_NAME.format(index=index, count=len(plan))
        path = parts_dir / name
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
            for m in members:
                with open(wheels / m["file"], "rb") as fh:
                    fh.seek(m["offset"])
                    data = fh.read(m["length"])
                m["sha256"] = hashlib.sha256(data).hexdigest()
                info = tarfile.TarInfo(m["member"])
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
        size = path.stat().st_size
        if size > limit:
            raise WheelhouseError(f"{name} is {size} bytes, over the limit of {limit} (a bug)")
        described.append(dict(file=name, size=size, sha256=sha256_of(path), members=members))
    return described


# ----------------------------------------------------------------------------- verify + install


def load_manifest(directory: Path) -> dict:
    path = directory / "manifest.json"
    if not path.is_file():
        raise WheelhouseError(f"{path} not found: pass the folder made by scripts/make_wheelhouse.sh "
                              "(OUT, or OUT/parts with its manifest.json)")
    manifest = json.loads(path.read_text())
    if manifest.get("schema") != SCHEMA:
        raise WheelhouseError(f"{path}: unknown manifest schema {manifest.get('schema')!r}")
    bad = [f["file"] for f in manifest["files"] if is_excluded(f["name"])]
    if bad:
        raise WheelhouseError(f"the wheelhouse contains {bad}: it must never install torch or its CUDA "
                              "runtime over the node's own")
    return manifest


def assemble(directory: Path, manifest: dict, staging: Path) -> Path:
    """A folder holding every wheel of the manifest, each checked (size, sha256). Raises on any problem."""
    files = manifest["files"]
    wheels = directory / "wheels"
    if wheels.is_dir() and all((wheels / f["file"]).is_file() for f in files):
        source = wheels
    elif manifest.get("parts"):
        source = _extract_parts(directory, manifest, staging)
    else:
        missing = [f["file"] for f in files if not (wheels / f["file"]).is_file()]
        raise WheelhouseError(f"{wheels} lacks {len(missing)} wheel(s) of the manifest, e.g. {missing[:3]}, "
                              "and the manifest lists no parts")
    problems = []
    for f in files:
        path = source / f["file"]
        size = path.stat().st_size
        if size != f["size"]:
            problems.append(f"{f['file']}: {size} bytes, the manifest says {f['size']}")
            continue
        sha = sha256_of(path)
        if sha != f["sha256"]:
            problems.append(f"{f['file']}: sha256 mismatch (manifest {f['sha256'][:16]}..., file {sha[:16]}...)")
    if problems:
        raise WheelhouseError("the wheelhouse is damaged, nothing was installed:\n  " + "\n  ".join(problems))
    return source


def _extract_parts(directory: Path, manifest: dict, staging: Path) -> Path:
    parts_dir = directory if (directory / manifest["parts"][0]["file"]).exists() else directory / "parts"
    missing = [p["file"] for p in manifest["parts"] if not (parts_dir / p["file"]).is_file()]
    if missing:
        raise WheelhouseError(f"missing part(s) in {parts_dir}: {', '.join(missing)} "
                              f"({len(manifest['parts'])} parts in all)")
    for part in manifest["parts"]:
        sha = sha256_of(parts_dir / part["file"])
        if sha != part["sha256"]:
            raise WheelhouseError(f"{part['file']}: sha256 mismatch (damaged in transfer?), nothing was installed")
    out = staging / "wheels"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    pieces: dict[str, list[tuple[int, bytes]]] = {}
    for part in manifest["parts"]:
        with tarfile.open(parts_dir / part["file"]) as tar:
            for m in part["members"]:
                data = tar.extractfile(m["member"]).read()
                if hashlib.sha256(data).hexdigest() != m["sha256"] or len(data) != m["length"]:
                    raise WheelhouseError(f"{part['file']}:{m['member']} does not match the manifest")
                pieces.setdefault(m["file"], []).append((m["offset"], data))
    for name, chunks in pieces.items():
        with open(out / name, "wb") as fh:
            for _, data in sorted(chunks, key=lambda c: c[0]):
                fh.write(data)
    return out


def node_facts(python: str) -> dict:
    """torch and the site folders of the node's Python (read, never written)."""
    code = (
        "import json, os, sys, site\n"
        "facts = {'python': list(sys.version_info[:3]), 'executable': sys.executable, 'prefix': sys.prefix,\n"
        "         'site_dirs': [p for p in sys.path if os.path.basename(p) in ('site-packages', 'dist-packages')"
        " and os.path.isdir(p)]}\n"
        "try:\n"
        "    import torch\n"
        "    facts['torch'] = {'version': torch.__version__, 'file': torch.__file__, 'cuda': torch.version.cuda}\n"
        "    facts['site_dirs'].append(os.path.dirname(os.path.dirname(torch.__file__)))\n"
        "except Exception as exc:\n"
        "    facts['torch_error'] = f'{type(exc).__name__}: {exc}'\n"
        "facts['site_dirs'] = list(dict.fromkeys(facts['site_dirs']))\n"
        "print(json.dumps(facts))\n")
    done = run([python, "-c", code], what=f"{python} (the node's Python)")
    return json.loads(done.stdout.strip().splitlines()[-1])


def pip_command(python: str, prefix_python: str) -> list[str]:
    """A pip that installs into the prefix: the wheel bundled with the node's Python (ensurepip),
    else the node's own pip pointed at the prefix (`pip --python`, pip >= 22.3)."""
    code = ("import glob, os, ensurepip; "
            "print(sorted(glob.glob(os.path.join(os.path.dirname(ensurepip.__file__), '_bundled', 'pip-*.whl')))[-1])")
    found = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if found.returncode == 0 and found.stdout.strip():
        return [prefix_python, f"{found.stdout.strip()}/pip"]
    if subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0:
        return [python, "-m", "pip", "--python", prefix_python]
    raise WheelhouseError(f"{python} has neither ensurepip's bundled pip nor pip itself: no way to install")


def install(directory: Path, prefix: Path, python: str, staging: Path | None = None) -> dict:
    start = time.monotonic()
    manifest = load_manifest(directory)
    staging = staging or prefix.parent / f"{prefix.name}-staging"
    glibc = node_glibc()
    too_new = [f["file"] for f in manifest["files"] if f.get("requires_glibc") and glibc
               and tuple(map(int, f["requires_glibc"].split("."))) > glibc]
    if too_new:
        raise WheelhouseError(f"this node has glibc {'.'.join(map(str, glibc))}; these wheels need a newer one: "
                              f"{too_new} (build the wheelhouse on a machine with the node's glibc or older)")
    source = assemble(directory, manifest, staging)
    print(f"PASS wheelhouse_verify: {len(manifest['files'])} files, {manifest['total_size'] / MB:.1f} MB, "
          f"sizes and sha256 as in the manifest ({'parts' if source != directory / 'wheels' else 'wheels/'})",
          flush=True)
    node = node_facts(python)
    if tuple(node["python"][:2]) != TARGET_PYTHON:
        raise WheelhouseError(f"{python} is Python {'.'.join(map(str, node['python']))}; the wheelhouse is for 3.12")
    if "torch" not in node:
        raise WheelhouseError(f"{python} cannot import torch ({node.get('torch_error')}): the bare self-test "
                              "runs on top of the node's own CUDA build of torch (PYTHON=/path/to/python)")
    if prefix.exists():
        shutil.rmtree(prefix)
    run([python, "-m", "venv", "--without-pip", str(prefix)], what="creating the private prefix (python -m venv)")
    prefix_python = str(prefix / "bin" / "python")
    site_packages = Path(run([prefix_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                             ).stdout.strip())
    # the node's own packages, torch first of all, come after the prefix's on sys.path
    lines = [f"import site; site.addsitedir({d!r})" for d in node["site_dirs"]]
    (site_packages / "zz_grail_node_site.pth").write_text("\n".join(lines) + "\n")
    requirements = staging / "requirements.txt"
    staging.mkdir(parents=True, exist_ok=True)
    requirements.write_text(requirements_text(manifest))
    # --ignore-installed: into the prefix even where the node has the same version (and never
    # uninstall anything of the node's)
    run(pip_command(python, prefix_python) + [
        "install", "--quiet", "--no-index", "--no-deps", "--require-hashes", "--ignore-installed",
        "--find-links", str(source), "-r", str(requirements)], env=clean_pip_env(),
        what="pip install --no-index --require-hashes")
    installed = {}
    for meta in site_packages.glob("*.dist-info"):
        name, _, version = meta.name[:-len(".dist-info")].rpartition("-")
        installed[normalize(name)] = version
    missing = [f"{f['name']}=={f['version']}" for f in manifest["files"] if installed.get(f["name"]) != f["version"]]
    if missing:
        raise WheelhouseError(f"not installed in {site_packages} after pip: {missing}")
    after = node_facts(prefix_python)
    torch_before, torch_after = node["torch"], after.get("torch")
    if torch_after != torch_before:
        raise WheelhouseError(f"torch in the prefix is {torch_after}, not the node's {torch_before}")
    if any(Path(site_packages, n).exists() for n in ("torch", "triton")):
        raise WheelhouseError(f"torch or triton was installed into {site_packages}")
    shadowed = _shadowed(node["site_dirs"], manifest)
    result = dict(prefix=str(prefix), python=prefix_python, files=len(manifest["files"]),
                  bytes=manifest["total_size"], seconds=round(time.monotonic() - start, 1),
                  node_python=node["executable"], node_torch=torch_before, node_site_dirs=node["site_dirs"],
                  matrix_torch=manifest["matrix"].get("torch"), shadowed_node_packages=shadowed)
    print(f"PASS wheelhouse_install: {len(manifest['files'])} wheels into {prefix} with pip --no-index "
          f"--no-deps --require-hashes ({result['seconds']:.0f} s)", flush=True)
    note = "" if torch_before["version"].split("+")[0] == result["matrix_torch"] else \
        f"; the version matrix has torch {result['matrix_torch']}"
    print(f"PASS node_torch_untouched: torch {torch_before['version']} (CUDA {torch_before['cuda']}) still "
          f"imported from {torch_before['file']}{note}", flush=True)
    return result


def _shadowed(site_dirs: list[str], manifest: dict) -> list[str]:
    """Node packages that the prefix now hides behind another version (information only)."""
    ours = {f["name"]: f["version"] for f in manifest["files"]}
    found = []
    for directory in site_dirs:
        for meta in Path(directory).glob("*.dist-info"):
            stem = meta.name[:-len(".dist-info")]
            name, _, version = stem.rpartition("-")
            name = normalize(name)
            if name in ours and ours[name] != version:
                found.append(f"{name} {version} -> {ours[name]}")
    return sorted(set(found))


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download/build the wheels (connected machine)")
    b.add_argument("out", type=Path)
    b.add_argument("--part-mb", type=float, default=None, help="also write parts of at most this many MB")
    b.add_argument("--requirements", type=Path, default=None,
                   help="requirement lines to use instead of grail-megatron's dependencies")
    b.add_argument("--no-build-isolation", action="store_true",
                   help="build sdists with this Python's setuptools instead of an isolated build env")
    b.add_argument("--dry-run", action="store_true", help="resolve and print the set, download nothing")
    s = sub.add_parser("split", help="(re)write the parts of an existing wheelhouse")
    s.add_argument("out", type=Path)
    s.add_argument("--part-mb", type=float, required=True)
    v = sub.add_parser("verify", help="check a wheelhouse (or its parts) against its manifest")
    v.add_argument("directory", type=Path)
    v.add_argument("--staging", type=Path, default=None)
    i = sub.add_parser("install", help="install a wheelhouse into a private prefix (offline)")
    i.add_argument("directory", type=Path)
    i.add_argument("--prefix", type=Path, required=True)
    i.add_argument("--python", default=sys.executable, help="the node's Python, with its torch")
    i.add_argument("--staging", type=Path, default=None)
    i.add_argument("--report", type=Path, default=None, help="write the install facts as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "build":
            requirements = None
            if args.requirements:
                requirements = [ln.strip() for ln in args.requirements.read_text().splitlines()
                                if ln.strip() and not ln.lstrip().startswith("#")]
            build(args.out, requirements, args.part_mb, not args.no_build_isolation, args.dry_run)
        elif args.command == "split":
            manifest = load_manifest(args.out)
            manifest["parts"] = split(args.out, manifest, args.part_mb)
            write_manifest(args.out / "manifest.json", manifest)
            write_manifest(args.out / "parts" / "manifest.json", manifest)
            print(f"PASS wheelhouse_parts: {len(manifest['parts'])} parts in {args.out / 'parts'}")
        elif args.command == "verify":
            manifest = load_manifest(args.directory)
            with tempfile.TemporaryDirectory() as tmp:
                assemble(args.directory, manifest, args.staging or Path(tmp))
            print(f"PASS wheelhouse_verify: {len(manifest['files'])} files match the manifest")
        else:
            result = install(args.directory, args.prefix, args.python, args.staging)
            if args.report:
                args.report.parent.mkdir(parents=True, exist_ok=True)
                args.report.write_text(json.dumps(result, indent=2) + "\n")
    except WheelhouseError as exc:
        name = {"build": "wheelhouse_build", "split": "wheelhouse_parts"}.get(args.command, "wheelhouse_install")
        print(f"FAIL {name}: {exc}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
