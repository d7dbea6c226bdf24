#!/usr/bin/env bash
# The GPU check in one run (<= 8 minutes on one GPU): the device-marked tests, then the GPU benches, one summary
# table; exits non-zero if anything failed. Without a GPU: `bash bench/device_check.sh --dry-run` (CPU, tiny
# shapes, device tests skipped). Options: see `python bench/device_bench.py --help`.
#
# Works from a bare copy of the repository (no venv, no install): the source goes on PYTHONPATH, and wheels
# carried in .whl/ (if any) are installed into /tmp first. With $OUT set, the log and the table land there too.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -x .venv/bin/python ]]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ibl-site \
        "${wheels[@]}" || { echo "device_check: installing the wheels in .whl/ failed" >&2; exit 1; }
    export PYTHONPATH="$PYTHONPATH:/tmp/ibl-site"
fi

if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    "$PY" bench/device_bench.py "$@" 2>&1 | tee "$OUT/device_check.log"
    exit "${PIPESTATUS[0]}"
fi
exec "$PY" bench/device_bench.py "$@"
