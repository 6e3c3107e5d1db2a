#!/usr/bin/env bash
# The wheels the GPU check's first tier (scripts/gpu_check_core.py) needs beside a CUDA torch, downloaded
# beforehand into DIR, for a GPU machine that has torch (with numpy and Pillow) and no network:
#
#   bash scripts/gpu_check_wheels.sh DIR [--python 3.12] [--dry-run]
#   # on the GPU machine:
#   python -m pip install --no-index --no-deps --target /tmp/near_ray_site DIR/*.whl
#   PYTHONPATH=/tmp/near_ray_site:. python scripts/gpu_check_core.py --json gpu_check_core.json
#
# The versions are the project's pins (constraints/cpu.txt); about 10 MB together. open_clip also needs
# torchvision, which must match the machine's torch: install that with torch if it is missing.
# --dry-run prints what it would fetch and fetches nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:?usage: gpu_check_wheels.sh DIR [--python 3.12] [--dry-run]}
shift
py=3.12
dry=0
while [ $# -gt 0 ]; do
  case $1 in
    --python) py=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    *) echo "gpu_check_wheels.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
names="open_clip_torch ftfy wcwidth regex pydantic pydantic_core annotated-types typing-inspection safetensors PyYAML tqdm"
pins=()
for name in $names; do
  pin=$(grep -i -E "^${name}==" "$here/constraints/cpu.txt" || true)
  if [ -z "$pin" ]; then echo "gpu_check_wheels.sh: $name is not pinned in constraints/cpu.txt" >&2; exit 1; fi
  pins+=("$pin")
done
cmd=(python3 -m pip download --no-deps --only-binary=:all: --python-version "$py" --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
     -d "$dir" "${pins[@]}")
if [ "$dry" = 1 ]; then
  printf '%s\n' "${pins[@]}"
  echo "${cmd[*]}"
  exit 0
fi
mkdir -p "$dir"
"${cmd[@]}"
du -sh "$dir"
