# An image whose entry point is the robustbench-alm command line (tested with podman; docker
# builds and runs the same file). See README.md, section Docker.
#
#   docker/build-base.sh                 # the default base, Debian bookworm made by debootstrap
#   docker/wheels.sh                     # optional: ./wheels for a build without PyPI
#   podman build --build-arg WHEELS=wheels --build-arg TORCHVISION=no -t robustbench-alm .
#   podman run --rm --network none -v "$PWD/runs:/submission:ro" -v "$PWD/results:/results" \
#       robustbench-alm evaluate /submission/model.safetensors --eps 0.1 --leaderboard-dir /results
#
# Build arguments:
#   BASE      the base image: any Debian-like image with apt and a Python >= 3.11 (default: the
#             local debootstrap image of docker/build-base.sh; debian:bookworm-slim where a registry
#             is reachable; a CUDA runtime image such as nvidia/cuda:12.8.1-runtime-ubuntu24.04 for
#             GPUs, with wheels for its Python, 3.12 there).
#   WHEELS    a folder of wheels inside the build context: pip installs from it alone (--no-index),
#             so the build needs no PyPI (apt still fetches python3 and the dataset). Empty: PyPI.
#   TORCH     the PyTorch requirement (default "torch": whatever WHEELS holds, or PyPI's default
#             build, which on Linux carries CUDA and is several GB; e.g. "torch==2.13.0+cpu").
#   TORCHVISION  yes (default) or no. The package declares torchvision, but needs it only to read
#             CIFAR/SVHN or to download data; Fashion-MNIST and MNIST are read from IDX files.
#             PyPI's torchvision wheels are CUDA builds that do not import beside a CPU-only torch
#             ("operator torchvision::nms does not exist"), so a CPU image built from the +cpu
#             torch wheel needs TORCHVISION=no: every dependency that pyproject.toml declares is
#             installed but torchvision.
#   PIP_CERT  a CA bundle for pip inside the build, for networks that re-sign TLS; mount it with
#             -v (e.g. -v /etc/ssl/certs/ca-certificates.crt:/etc/pip-ca.crt:ro
#             --build-arg PIP_CERT=/etc/pip-ca.crt). Not needed with WHEELS.
#   DATASET   Debian packages with data to bake in (default dataset-fashion-mnist; empty: none, and
#             the loader then needs --data-dir on a mounted folder, since jobs run offline).
ARG BASE=localhost/bookworm-minbase
FROM ${BASE}

ARG DATASET=dataset-fashion-mnist
# python3-venv brings ensurepip, so pip runs in its own virtual environment and never touches the
# system's Python (Debian marks it externally managed).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ${DATASET} \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# Any user id (run --user) and a read-only root file system (run --read-only) work: every cache
# the libraries want goes to /tmp, which the engine keeps writable.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/cache \
    TORCH_HOME=/tmp/torch

ARG TORCH="torch"
ARG TORCHVISION=yes
ARG WHEELS=""
ARG PIP_CERT=""
# Two steps, so that an edit of the sources reinstalls only the package: first PyTorch and the
# dependencies that pyproject.toml declares, then the package from its sources with --no-deps (a
# stale wheel of it in WHEELS is never used). The sources are copied, so the build cache sees their
# changes; the wheels are only mounted from the build context, so they stay out of the layers.
COPY pyproject.toml /opt/robustbench-alm/
RUN --mount=type=bind,target=/tmp/context \
    set -e; \
    if [ -n "$PIP_CERT" ]; then export PIP_CERT; fi; \
    if [ -n "$WHEELS" ]; then from="--no-index --find-links /tmp/context/$WHEELS"; else from=""; fi; \
    python3 -c 'import sys, tomllib; deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]; print("\n".join(d for d in deps if sys.argv[2] != "no" or not d.startswith("torchvision")))' \
        /opt/robustbench-alm/pyproject.toml "$TORCHVISION" > /tmp/requirements.txt; \
    pip install $from $TORCH -r /tmp/requirements.txt; \
    rm /tmp/requirements.txt

COPY README.md /opt/robustbench-alm/
COPY robustbench_alm /opt/robustbench-alm/robustbench_alm
COPY attacks /opt/robustbench-alm/attacks
RUN --mount=type=bind,target=/tmp/context \
    set -e; \
    if [ -n "$PIP_CERT" ]; then export PIP_CERT; fi; \
    if [ -n "$WHEELS" ]; then from="--no-index --find-links /tmp/context/$WHEELS"; else from=""; fi; \
    pip install $from --no-deps /opt/robustbench-alm; \
    rm -rf /opt/robustbench-alm; \
    python -c 'import robustbench_alm.evaluation, robustbench_alm.training'; \
    python -c 'from robustbench_alm.suites import available_suites as a; assert "standard" in a(), a()'; \
    robustbench-alm --help > /dev/null

WORKDIR /work
ENTRYPOINT ["robustbench-alm"]
CMD ["--help"]
