#!/usr/bin/env bash
# One device lease's work: the three kit-staging calls (see ../shared/device/README.md), then
# one call per group of end-to-end runs. Each step writes its logs and results to $OUT
# (at most 8 files come back per call).
#   kernels : GPU kernel tests at real shapes (no vLLM needed)          [call with kit part 0]
#   stage   : nothing more                                              [call with kit part 1]
#   bench   : tile-size tuning (kept in /root/tuned) + kernel benchmark
#             vs vLLM fused_experts                                     [call with kit part 2]
#   equality: GPU e2e tests (greedy equality with CUDA graphs)
#   e2e "SYSTEMS" SCENARIOS : benchmarks/bench_e2e.py per system, uniform routing
#             e.g. e2e "stock offload100" lat,thr,ttft                   [later calls]
#   serve   : `vllm serve --enable-expert-offload` answers a chat
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out"
bash .devicekit/kit/stage.sh
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
with_vllm() {
  cp /root/tuned/*.json vllm_moe_offload/kernels/configs/ 2>/dev/null
  source .devicekit/kit/env.sh; export PYTHONPATH=$PWD:$PYTHONPATH
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
}
case "$1" in
kernels)
  python3 -m pip install -q --no-index --find-links .devicekit/wheels pytest 2>/dev/null
  python3 -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tee "$out/pytest-kernels.log" | tail -3 ;;
stage) ;;
bench)
  with_vllm  # the tuner needs vLLM's grouping and quantiser: they are part of the step it times
  python3 benchmarks/tune_grouped_gemm.py --dtype fp8 2>&1 | grep -v -i warn | tee "$out/tune.log" | tail -8
  mkdir -p /root/tuned && cp vllm_moe_offload/kernels/configs/*.json /root/tuned/
  cp /root/tuned/*.json "$out/tuned-configs.json"
  python3 benchmarks/bench_kernels.py --out "$out/kernels.json" 2>&1 | grep -v -i "warn\|INFO" | tail -10 ;;
equality)
  with_vllm
  timeout 500 env OUT="$out" bash scripts/device-foundation.sh equality "cuda_graphs or bf16" | tail -4 ;;
e2e)
  with_vllm
  for system in $2; do
    VLLM_MOE_ROUTING_SIMULATION_STRATEGY=uniform_random python3 benchmarks/bench_e2e.py \
      "$system" "$3" --out "$out/e2e-$system.json" > "$out/e2e-$system.log" 2>&1
    echo "== $system: exit $?"; grep -E "RESULT|Error|error:" "$out/e2e-$system.log" | cut -c1-400 | tail -6
  done ;;
serve)
  with_vllm
  env OUT="$out" bash scripts/device-foundation.sh serve | tail -6 ;;
esac
