# syntax=docker/dockerfile:1
# A job worker on an NVIDIA GPU: PyTorch 2.13.0's CUDA build on an NVIDIA CUDA image.
#   docker build -f docker/worker.Dockerfile -t strata-gpu .
# Needs the NVIDIA Container Toolkit on the host and a driver for CUDA 13.0 (R580 or newer).
#
# PyPI's torch 2.13.0 wheel for Linux x86_64 is the CUDA 13.0 build, and brings its CUDA user-space libraries
# (cuBLAS, cuDNN, NCCL, ...) as pip packages, so the `base` flavour of the CUDA image is enough: it sets up the
# container for the NVIDIA runtime (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES) without a second copy
# of those libraries, which the `runtime` flavour would add.
FROM nvidia/cuda:13.0.0-base-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    STRATA_HOME=/data/strata \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04's Python is 3.12 (the project needs 3.11 or newer); a virtualenv, as the system one is
# externally managed (PEP 668).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# PyTorch first, in its own layer (the CUDA 13.0 build, from PyPI).
RUN pip install torch==2.13.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY workers ./workers
RUN pip install .

# uid 10001 as in api.Dockerfile, so both may write the shared model store (uid 1000 is Ubuntu's `ubuntu`).
RUN useradd --uid 10001 --create-home strata \
    && mkdir -p /data/strata \
    && chown strata:strata /data/strata
USER strata
VOLUME ["/data/strata"]

# Jobs (merges, variants, ...) from REDIS_URL's queue; it uses CUDA when it sees a GPU, the CPU otherwise.
CMD ["strata", "worker"]
