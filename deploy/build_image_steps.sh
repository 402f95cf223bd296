#!/usr/bin/env bash
# The build steps of the container image (deploy/Containerfile runs this very script in its build
# stage), usable on a host as well: install thighnode from the source tree SRC into PREFIX.
#
#   deploy/build_image_steps.sh SRC PREFIX
#
# PREFIX gets the runtime files only (the packages, config/, bundles/, deploy/, README.md,
# pyproject.toml; no tests) and a virtual environment PREFIX/.venv with torch (pinned, installed
# first: on a CPU base the CPU build, on a CUDA base with a CUDA index the CUDA build) and the project
# installed editable, so that the project finds config/ and bundles/ beside its packages. Everything
# is byte-compiled, so the node writes no __pycache__ at run time (the image's root file system is
# read-only).
#
# Environment:
#   PYTHON       the interpreter for the venv (default python3)
#   TORCH_SPEC   the torch requirement (default torch==2.13.0, the project's pin)
#   THIGHNODE_EXTRAS  optional extras of the project to install too, comma-separated (e.g. celery)
#   PIP_*        passed to pip as usual (e.g. PIP_FIND_LINKS=/wheels, PIP_INDEX_URL for a CUDA build)
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: $0 SRC PREFIX" >&2
    exit 2
fi
src="$(cd "$1" && pwd)"
prefix="$2"
python="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
project="$prefix"
if [ -n "${THIGHNODE_EXTRAS:-}" ]; then
    project="$prefix[$THIGHNODE_EXTRAS]"
fi

# 1. The runtime files of the source tree (what the node reads at run time, nothing else).
mkdir -p "$prefix"
for item in thighnode scp pipeline dicomout modelkit research node_errors.py pyproject.toml README.md \
            config bundles deploy; do
    if [ ! -e "$src/$item" ]; then
        echo "error: $src/$item is missing; SRC must be the thighnode source tree" >&2
        exit 2
    fi
    cp -a "$src/$item" "$prefix/"
done
find "$prefix" -name __pycache__ -type d -prune -exec rm -rf {} +
find "$prefix" -name '*.egg-info' -type d -prune -exec rm -rf {} +

# 2. The venv: torch first with the pin (a looser requirement pulls gigabytes of CUDA wheels on a
#    CPU host), then the project, editable, without pip's cache.
"$python" -m venv "$prefix/.venv"
"$prefix/.venv/bin/pip" install --no-cache-dir --disable-pip-version-check -q "$torch_spec"
"$prefix/.venv/bin/pip" install --no-cache-dir --disable-pip-version-check -q -e "$project"

# 3. Byte-compile the project (pip compiled the venv's packages), so nothing is written beside the
#    code at run time.
"$prefix/.venv/bin/python" -m compileall -q -j 0 \
    "$prefix"/thighnode "$prefix"/scp "$prefix"/pipeline "$prefix"/dicomout "$prefix"/modelkit \
    "$prefix"/research "$prefix"/deploy "$prefix"/node_errors.py

# 4. The installed command must run.
"$prefix/.venv/bin/thighnode" --help >/dev/null
echo "thighnode installed in $prefix (venv $prefix/.venv)"
