# An image whose entry point is the robustbench-alm command line.
#   docker build -t robustbench-alm .
#   docker run --rm --network none -v "$PWD/leaderboards:/work/leaderboards" robustbench-alm \
#       evaluate /models/model.safetensors --eps 0.1
# BASE picks the base image (a CUDA runtime image for GPUs); WHEELS names a folder of wheels in
# the build context to install from without network access (empty: install from PyPI).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG TORCH="torch torchvision"
ARG WHEELS=""
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

RUN apt-get update \
    && (apt-get install -y --no-install-recommends dataset-fashion-mnist || true) \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/robustbench-alm
COPY pyproject.toml README.md ./
COPY robustbench_alm ./robustbench_alm
COPY attacks ./attacks
COPY . /tmp/context
RUN if [ -n "$WHEELS" ]; then \
        pip install --no-index --find-links "/tmp/context/$WHEELS" $TORCH . ; \
    else \
        pip install $TORCH . ; \
    fi \
    && rm -rf /tmp/context

WORKDIR /work
ENTRYPOINT ["robustbench-alm"]
CMD ["--help"]
