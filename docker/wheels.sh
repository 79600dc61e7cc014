#!/usr/bin/env bash
# Fills a folder of wheels for an offline image build (the Dockerfile's WHEELS build argument):
# the PyTorch build named by TORCH, this package and every dependency.
#
#   docker/wheels.sh                   # into ./wheels (inside the build context)
#   docker/wheels.sh some/folder
#   TORCH="torch==2.14.1" docker/wheels.sh    # another PyTorch build
#
# It runs pip on this machine, so pip's own configuration (index, find-links, certificates) applies.
# The wheels must suit the image's Python: Debian bookworm has 3.11, so run this with a Python 3.11
# (PYTHON=python3.11) or check the warning below. PIP_ARGS passes more options to pip.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here/wheels}
PYTHON=${PYTHON:-python3}
# The default is a CPU-only build; for a CUDA image pick the CUDA build, e.g. TORCH="torch".
# pip also fetches a torchvision (the package declares one); PyPI's are CUDA builds that do not
# import beside the +cpu torch, hence the Dockerfile's TORCHVISION=no for this folder.
TORCH=${TORCH:-torch==2.13.0+cpu}
read -r -a torch_reqs <<< "$TORCH"
read -r -a pip_args <<< "${PIP_ARGS:-}"

version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$version" = 3.11 ] || echo "warning: $PYTHON is Python $version; the bookworm image has 3.11" >&2

mkdir -p "$out"
# pip wheel builds this package into a wheel and fetches (or builds) a wheel of every dependency.
"$PYTHON" -m pip wheel "${pip_args[@]}" --wheel-dir "$out" "${torch_reqs[@]}" "setuptools>=68" "$here"
ls "$out" | wc -l | xargs echo "wheels in $out:"
