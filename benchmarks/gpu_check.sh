#!/usr/bin/env bash
# Run benchmarks/gpu_check.py under a time limit and print its result, the last stdout line (JSON).
#
#   bash benchmarks/gpu_check.sh [gpu_check.py options]      # e.g. --teacher swsl_resnext101_32x8d
#   GPU_CHECK_TIMEOUT_S=600 PYTHON=python3 bash benchmarks/gpu_check.sh
#
# Why a wrapper: a device machine is lent for minutes, so a hung NCCL rendezvous or a stuck
# decoder must not eat them. The check's progress (stderr) streams through; its stdout is kept
# and only the JSON line is printed, so `... | tail -n 1` or a parser sees one object. On a
# timeout or a failure it exits with the check's status (124 for the timeout) and prints no JSON.
set -uo pipefail

cd "$(dirname "$0")/.."
limit="${GPU_CHECK_TIMEOUT_S:-300}"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi

stdout="$(timeout --kill-after=15 "$limit" "$python" benchmarks/gpu_check.py "$@")"
status=$?
if [[ $status -ne 0 ]]; then
    [[ $status -eq 124 ]] && echo "gpu_check: no result within ${limit}s (GPU_CHECK_TIMEOUT_S)" >&2
    echo "gpu_check: failed with status $status" >&2
    exit "$status"
fi
printf '%s\n' "$stdout" | tail -n 1
