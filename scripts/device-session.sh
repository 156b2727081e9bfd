#!/usr/bin/env bash
# One device lease's work, in the three kit-staging calls and one more (see
# ../shared/device/README.md). Each step writes its logs and results to $OUT.
#   kernels : GPU kernel tests at real shapes (no vLLM needed)        [call with kit part 0]
#   tune    : tile-size tuning of the grouped GEMM, kept in /root     [call with kit part 1]
#   bench   : kernel benchmark vs vLLM fused_experts + GPU e2e tests  [call with kit part 2]
#   serve   : `vllm serve --enable-expert-offload` answers a chat     [a fourth call]
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out"
bash .devicekit/kit/stage.sh
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
case "$1" in
kernels)
  python3 -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tee "$out/pytest-kernels.log" | tail -3 ;;
tune)
  python3 benchmarks/tune_grouped_gemm.py --dtype fp8 2>&1 | tee "$out/tune.log" | tail -9
  mkdir -p /root/tuned && cp vllm_moe_offload/kernels/configs/*.json /root/tuned/ && cp /root/tuned/*.json "$out/" ;;
bench)
  cp /root/tuned/*.json vllm_moe_offload/kernels/configs/ 2>/dev/null
  source .devicekit/kit/env.sh; export PYTHONPATH=$PWD:$PYTHONPATH
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
  python3 benchmarks/bench_kernels.py --out "$out/kernels.json" 2>&1 | grep -v -i "warn\|INFO" | tail -9
  timeout 420 env OUT="$out" bash scripts/device-foundation.sh equality "cuda_graphs or bf16" | tail -3 ;;
serve)
  cp /root/tuned/*.json vllm_moe_offload/kernels/configs/ 2>/dev/null
  env OUT="$out" bash scripts/device-foundation.sh serve | tail -6 ;;
esac
