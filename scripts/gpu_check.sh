#!/usr/bin/env bash
# The GPU check: each GPU path of near_ray once on one GPU, one line per path with its figure, in
# under 10 minutes (see scripts/gpu_check.py for the paths). Run it on a GPU node whose Python has
# `near_ray[gpu]` installed:
#   bash scripts/gpu_check.sh [--only vllm,device,clip,faiss,train,serve] [--json OUT.json]    (make gpu-check)
# PYTHON picks the interpreter (default: .venv/bin/python where it exists, else python3). Without a
# GPU every path prints "no GPU: skipped" and the exit status is 0; a failed path makes it 1.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # a local Ray cluster binds to 127.0.0.1 (near_ray.runtime)
cd "$ROOT"
exec "$PYTHON" scripts/gpu_check.py "$@"
