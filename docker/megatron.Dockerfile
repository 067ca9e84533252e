# syntax=docker/dockerfile:1.7
#
# grail-megatron training image: CUDA 13 + Python 3.12, PyTorch, Apex (C++/CUDA extensions),
# Transformer Engine, Megatron-LM core_v0.18.0 with patches/ applied, flash-attn, vLLM, verl,
# mbridge and this package (editable, in /opt/grail-megatron).
#
#   DOCKER_BUILDKIT=1 docker build -f docker/megatron.Dockerfile -t grail-megatron:cu13 .
#
# Every version below equals grail_megatron/versions.toml (tests/container checks it);
# change the matrix and these defaults together. Build arguments (see docs/container.md):
#   CUDA_ARCHS   compute capabilities to compile for, "8.0;9.0" = A100 + H100
#   MAX_JOBS     parallel compile jobs (each nvcc job can take 4-8 GB of RAM)
#   NVCC_THREADS nvcc --threads per job
#   *_VERSION, MEGATRON_LM_REF, APEX_COMMIT   the pinned components
#   RUNTIME_FLAVOR  cudnn-runtime (default) or cudnn-devel if a JIT in your stack needs nvcc
#   CHECK_VERSION_MATRIX  1 = fail the build if installed versions differ from versions.toml
#
# Stages: `builder` (CUDA devel image: compilers, ccache, the Apex/Megatron-LM sources)
# builds everything into the virtualenv /opt/venv; `runtime` (CUDA runtime image) receives
# only that virtualenv and the project tree. BuildKit cache mounts keep pip downloads and
# ccache objects between builds, so a rebuild after a code change takes minutes.

ARG CUDA_VERSION=13.0.1
ARG UBUNTU_VERSION=24.04
ARG RUNTIME_FLAVOR=cudnn-runtime

# --------------------------------------------------------------------------- builder
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu${UBUNTU_VERSION} AS builder

ARG PYTHON_VERSION=3.12
ARG CUDA_ARCHS="8.0;9.0"
ARG MAX_JOBS=8
ARG NVCC_THREADS=2

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/lib/ccache:${PATH} \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CCACHE_DIR=/root/.cache/ccache \
    CCACHE_MAXSIZE=20G \
    PYTORCH_NVCC="ccache nvcc" \
    CMAKE_C_COMPILER_LAUNCHER=ccache \
    CMAKE_CXX_COMPILER_LAUNCHER=ccache \
    CMAKE_CUDA_COMPILER_LAUNCHER=ccache

# Ubuntu's own Python 3.12 (24.04 ships it). apt versions come with the pinned CUDA base
# image's Ubuntu release; pinning each .deb would break whenever the archive moves on.
# hadolint ignore=DL3008
RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \
    --mount=type=cache,target=/var/lib/apt/lists,sharing=locked \
    rm -f /etc/apt/apt.conf.d/docker-clean \
    && apt-get update \
    && apt-get install -y --no-install-recommends \
        "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-dev" "python${PYTHON_VERSION}-venv" \
        build-essential ccache cmake git ninja-build ca-certificates \
    && "python${PYTHON_VERSION}" -m venv /opt/venv

# PyTorch first: every extension below compiles against it.
ARG TORCH_VERSION=2.11.0
# Build tools float (they only run in this stage); torch is pinned.
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --upgrade pip setuptools wheel packaging ninja pybind11 psutil \
    && pip install "torch==${TORCH_VERSION}"

# Apex with its C++ and CUDA extensions (fused Adam, fused layer norm, amp_C multi-tensor ops).
# Apex publishes no releases on the package index: a pinned commit of NVIDIA/apex.
ARG APEX_COMMIT=6424da3b4faa6c8f062da4a48c424fff3f02d42d
WORKDIR /src/apex
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=cache,target=/root/.cache/ccache \
    git init -q . \
    && git fetch -q --depth 1 https://github.com/NVIDIA/apex.git "${APEX_COMMIT}" \
    && git checkout -q FETCH_HEAD \
    && APEX_CPP_EXT=1 APEX_CUDA_EXT=1 TORCH_CUDA_ARCH_LIST="${CUDA_ARCHS}" MAX_JOBS="${MAX_JOBS}" \
       NVCC_APPEND_FLAGS="--threads ${NVCC_THREADS}" \
       pip install -v --no-build-isolation --no-deps . \
    && python -c "import amp_C, fused_layer_norm_cuda; import apex.optimizers"

# Transformer Engine: the CUDA 13 core library from the index, its PyTorch extension
# compiled here against the torch above (NVTE_CUDA_ARCHS takes "80;90").
ARG TE_VERSION=2.16.1
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=cache,target=/root/.cache/ccache \
    NVTE_FRAMEWORK=pytorch NVTE_CUDA_ARCHS="$(echo "${CUDA_ARCHS}" | tr -d .)" MAX_JOBS="${MAX_JOBS}" \
    NVTE_BUILD_THREADS_PER_JOB="${NVCC_THREADS}" \
    pip install -v --no-build-isolation "transformer_engine[pytorch,core_cu13]==${TE_VERSION}"

# flash-attn from source for exactly these architectures (FLASH_ATTN_CUDA_ARCHS takes "80;90").
ARG FLASH_ATTN_VERSION=2.8.3
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=cache,target=/root/.cache/ccache \
    FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTN_CUDA_ARCHS="$(echo "${CUDA_ARCHS}" | tr -d .)" \
    MAX_JOBS="${MAX_JOBS}" NVCC_THREADS="${NVCC_THREADS}" \
    pip install -v --no-build-isolation --no-deps "flash-attn==${FLASH_ATTN_VERSION}"

# Megatron-LM at the pinned tag with patches/ applied in `series` order. `git apply --3way`
# exits non-zero on a conflict, which fails the build; the last line makes sure no file is
# left unmerged.
ARG MEGATRON_LM_REF=core_v0.18.0
ARG MEGATRON_CORE_VERSION=0.18.0
WORKDIR /src/Megatron-LM
COPY patches/ /src/patches/
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=cache,target=/root/.cache/ccache \
    git -c advice.detachedHead=false clone -q --depth 1 --branch "${MEGATRON_LM_REF}" \
        https://github.com/NVIDIA/Megatron-LM.git . \
    && grep -v -e '^#' -e '^[[:space:]]*$' /src/patches/series | while read -r patch; do \
         echo "applying ${patch}" && git apply --3way "/src/patches/${patch}" || exit 1; \
       done \
    && test -z "$(git diff --name-only --diff-filter=U)" \
    && pip install --no-build-isolation --no-deps . \
    && python -c "import importlib.metadata as m; v = m.version('megatron-core'); \
assert v == '${MEGATRON_CORE_VERSION}', v"

# The inference engine, the trainer and the bridge. vLLM pins torch itself (== TORCH_VERSION);
# verl is installed without extras: its [megatron]/[vllm] extras pin Megatron-Bridge and an
# older transformers, which this image replaces with mbridge and the matrix's transformers.
ARG VLLM_VERSION=0.24.0
ARG VERL_VERSION=0.9.1
ARG MBRIDGE_VERSION=0.15.1
ARG TRANSFORMERS_VERSION=5.10.4
ARG TENSORDICT_VERSION=0.10.0
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install \
        "torch==${TORCH_VERSION}" \
        "vllm==${VLLM_VERSION}" \
        "verl==${VERL_VERSION}" \
        "mbridge==${MBRIDGE_VERSION}" \
        "transformers==${TRANSFORMERS_VERSION}" \
        "tensordict==${TENSORDICT_VERSION}" \
        "megatron-core==${MEGATRON_CORE_VERSION}"

# This package, editable: configs/ and scripts/ live next to it in /opt/grail-megatron.
# The constraints keep pip from moving any component installed above.
WORKDIR /opt/grail-megatron
COPY pyproject.toml README.md ./
COPY grail_megatron/ grail_megatron/
COPY configs/ configs/
COPY scripts/ scripts/
COPY tools/ tools/
COPY patches/ patches/
COPY docs/ docs/
COPY docker/selftest/ docker/selftest/
ARG CHECK_VERSION_MATRIX=1
RUN --mount=type=cache,target=/root/.cache/pip \
    printf '%s\n' "torch==${TORCH_VERSION}" "vllm==${VLLM_VERSION}" "verl==${VERL_VERSION}" \
        "mbridge==${MBRIDGE_VERSION}" "transformers==${TRANSFORMERS_VERSION}" \
        "tensordict==${TENSORDICT_VERSION}" "megatron-core==${MEGATRON_CORE_VERSION}" \
        "flash-attn==${FLASH_ATTN_VERSION}" "transformer_engine==${TE_VERSION}" > /tmp/constraints.txt \
    && pip install -c /tmp/constraints.txt -e . \
    && if [ "${CHECK_VERSION_MATRIX}" = 1 ]; then \
         python -c "from grail_megatron.versions import installed_mismatches as m; bad = m(); \
assert not bad, f'image differs from versions.toml: {bad}'"; \
       fi \
    && python -c "import inspect, megatron.core.pipeline_parallel.schedules as s; \
assert '_token_counter_device' in inspect.getsource(s), 'patches/ not in the installed megatron-core'"

# --------------------------------------------------------------------------- runtime
FROM nvidia/cuda:${CUDA_VERSION}-${RUNTIME_FLAVOR}-ubuntu${UBUNTU_VERSION} AS runtime

ARG CUDA_VERSION
ARG UBUNTU_VERSION
ARG RUNTIME_FLAVOR
ARG PYTHON_VERSION=3.12
ARG TORCH_VERSION=2.11.0
ARG MEGATRON_LM_REF=core_v0.18.0
ARG TE_VERSION=2.16.1
ARG APEX_COMMIT=6424da3b4faa6c8f062da4a48c424fff3f02d42d
ARG FLASH_ATTN_VERSION=2.8.3
ARG VLLM_VERSION=0.24.0
ARG VERL_VERSION=0.9.1
ARG MBRIDGE_VERSION=0.15.1
ARG TRANSFORMERS_VERSION=5.10.4
ARG CUDA_ARCHS="8.0;9.0"

LABEL org.opencontainers.image.title="grail-megatron" \
      org.opencontainers.image.description="GRPO with GRAIL rewards on verl's Megatron-LM backend" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="nvidia/cuda:${CUDA_VERSION}-${RUNTIME_FLAVOR}-ubuntu${UBUNTU_VERSION}" \
      io.grail-megatron.cuda="${CUDA_VERSION}" \
      io.grail-megatron.cuda-archs="${CUDA_ARCHS}" \
      io.grail-megatron.python="${PYTHON_VERSION}" \
      io.grail-megatron.torch="${TORCH_VERSION}" \
      io.grail-megatron.megatron-lm-ref="${MEGATRON_LM_REF}" \
      io.grail-megatron.transformer-engine="${TE_VERSION}" \
      io.grail-megatron.apex-commit="${APEX_COMMIT}" \
      io.grail-megatron.flash-attn="${FLASH_ATTN_VERSION}" \
      io.grail-megatron.vllm="${VLLM_VERSION}" \
      io.grail-megatron.verl="${VERL_VERSION}" \
      io.grail-megatron.mbridge="${MBRIDGE_VERSION}" \
      io.grail-megatron.transformers="${TRANSFORMERS_VERSION}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=1

# gcc and the Python headers stay: Triton (torch.compile, vLLM, TE) compiles its kernel
# launcher with the host compiler at run time. nvcc, ccache and all sources do not.
# The verbs libraries and providers let NCCL use InfiniBand/RoCE between nodes.
# apt versions come with the base image's Ubuntu release, as in the builder.
# hadolint ignore=DL3008
RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \
    --mount=type=cache,target=/var/lib/apt/lists,sharing=locked \
    rm -f /etc/apt/apt.conf.d/docker-clean \
    && apt-get update \
    && apt-get install -y --no-install-recommends \
        "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-dev" gcc libc6-dev \
        git ca-certificates procps libibverbs1 ibverbs-providers librdmacm1 libnuma1

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/grail-megatron /opt/grail-megatron
WORKDIR /opt/grail-megatron
CMD ["bash"]
