#!/usr/bin/env bash
# Sets everything up (CPU or GPU, see setup.sh), then serves a tiny random Qwen3-MoE with
# --enable-expert-offload, sends one chat request and prints the answer and the offload counters.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=$("$root/scripts/setup.sh" | tail -1)
exec "$py" -m vllm_moe_offload demo "$@"
