#!/usr/bin/env bash
# Sets everything up (CPU or GPU, see setup.sh) and runs the test suite. Extra arguments go
# to pytest. GPU-only tests skip themselves without CUDA.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=$("$root/scripts/setup.sh" | tail -1)
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
"$py" -m ruff check vllm_moe_offload tests benchmarks
exec "$py" -m pytest -q -rs "$@" tests
