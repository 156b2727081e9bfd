#!/usr/bin/env bash
# One device lease's work: the three kit-staging calls (see ../shared/device/README.md), then
# one call per group of end-to-end runs. Each step writes its logs and results to $OUT
# (at most 8 files come back per call).
#   kernels : GPU kernel tests at real shapes (no vLLM needed)          [call with kit part 0]
#   tune-host: tiles for zero-copy passes (tune_grouped_gemm.py --host; no vLLM needed: the
#             torch grouping stands in), kept in /root/tuned               [call with kit part 0]
#   stage   : nothing more                                              [call with kit part 1]
#   bench   : tile-size tuning (kept in /root/tuned) + kernel benchmark
#             vs vLLM fused_experts                                     [call with kit part 2]
#   equality [K]: GPU e2e tests (greedy equality with CUDA graphs, EAGLE-3 in graphs),
#             pytest -k K (default: all but the eager oracle-draft sweep)
#   fullsize: writes the full-size qwen3-30b-a3b-fp8 checkpoint to /root (once per lease) and
#             runs its greedy-equality test (stock vs offload at 25%, engines side by side)
#   e2e "SYSTEMS" SCENARIOS [ROUTING]: benchmarks/bench_e2e.py per system, ROUTING uniform,
#             realistic (default) or model (bench_e2e.py --routing); the engines start side by
#             side and measure one at a time (--barrier); they must fit the card together,
#             e.g. e2e "uva25 offload25" lat,n8,n64,ttft uniform   [later calls]
#             or the concurrency sweep: e2e "offload25" n1,n4,n8,n16,n32,n64,n128
#             ROUTING_STATS=N: the stock/uva engines then route N requests with vLLM's
#             routed-experts capture (bench_e2e.py --routing-stats); TP=N: every system with
#             --tp N (nvidia-h200-x2: the budget stays per card)
#   tp      : on two GPUs (nvidia-h200-x2), tests/e2e/test_tp.py: TP=2 offload against stock
#   trace SYSTEM: bench_e2e.py SYSTEM lat --trace: one sequence's decode steps under vLLM's
#             torch profiler, split by trace_summary.py (where a layer step's time goes)
#   step [TOKENS]: benchmarks/bench_step.py, the plugin's layer steps (device, graph: captured
#             in a CUDA graph, staged) with misses and no engine around them (8 layers, 25%),
#             traced and split by trace_summary.py; vLLM staged only for its grouping kernel
#   plan    : `vllm-moe-offload plan` on the card (its profile: h2d, GEMM against tokens, the
#             layer step's fixed cost) -> plan.json, for planner_check.py
#   walk    : the full-size --predictable target (realistic routers) and its oracle EAGLE-3
#             draft (miss rate 0.3)
#             in /root (once per lease), then greedy equality of offload25+EAGLE-3 against stock
#             with CUDA graphs (tests/e2e/test_full_size.py -k eagle3)
#   guidellm "SYSTEMS" CONCURRENCIES [SECONDS [WAVES]]: benchmarks/guidellm_sweep.py
#             --side-by-side on that target (written first if missing), routing $ROUTING
#             (realistic by default: the walk target's routers; uniform: the simulator), WAVES
#             requests a stream per point (default 2; SECONDS bounds a point, default 300),
#             e.g. guidellm "offload,offload+eagle3" 1,8,32,64
#   serve   : `vllm serve --enable-expert-offload` answers a chat
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out"
bash .devicekit/kit/stage.sh
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
# A call the tool cut off leaves its servers running, holding GPU and pinned memory (15 GB
# seen): stop them, and wait until they are gone (the bracketed patterns never match this
# script's own command line).
stop_stale() {
  local stale="[v]llm.entrypoints|[E]ngineCore|[b]ench_e2e.py|[g]uidellm_sweep.py|[g]uidellm run"
  pkill -f "$stale" || return 0
  for _ in $(seq 30); do pgrep -f "$stale" >/dev/null || return 0; sleep 1; done
  pkill -9 -f "$stale"; sleep 2
}
with_vllm() {
  stop_stale
  cp /root/tuned/*.json vllm_moe_offload/offload/kernels/configs/ 2>/dev/null
  source .devicekit/kit/env.sh; export PYTHONPATH=$PWD:$PYTHONPATH
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
}
with_pytest() { python3 -m pip install -q --no-index --find-links .devicekit/wheels pytest 2>/dev/null; }
# full_size_test NAME TIMEOUT [PYTEST ARGS]: tests/e2e/test_full_size.py (its env set by the
# caller), the log as pytest-NAME.log and each engine's outputs as NAME-ENGINE.json
full_size_test() {
  local name=$1 limit=$2; shift 2
  with_pytest
  timeout "$limit" python3 -m pytest -q -rs -p no:cacheprovider --basetemp="/root/$name-test" \
    tests/e2e/test_full_size.py "$@" 2>&1 | tee "$out/pytest-$name.log" | tail -12
  find "/root/$name-test" -name "run_llm-*.out.json" | while read -r f; do
    cp "$f" "$out/$name-$(basename "$(dirname "$f")").json"; done
}
# the full-size --predictable target with realistic routers and its oracle draft (miss rate
# 0.3), once per lease
walk_model() {
  [ -f /root/walk/model.safetensors.index.json ] && [ -f /root/walk-draft/model.safetensors ] || \
    python3 -m vllm_moe_offload make-model \
    /root/walk --preset qwen3-30b-a3b-fp8 --routing realistic --draft /root/walk-draft \
    --draft-kind oracle --draft-miss-rate 0.3 2>&1 | tail -1
}
case "$1" in
kernels)
  with_pytest
  python3 -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tee "$out/pytest-kernels.log" | tail -3 ;;
tune-host)
  python3 benchmarks/tune_grouped_gemm.py --host 2>&1 | grep -v -i warn | tee "$out/tune-host.log" | tail -8
  mkdir -p /root/tuned && cp vllm_moe_offload/offload/kernels/configs/*,host.json /root/tuned/
  cp /root/tuned/*,host.json "$out/tuned-host.json" ;;
stage) ;;
bench)
  with_vllm  # the tuner needs vLLM's grouping and quantiser: they are part of the step it times
  python3 benchmarks/tune_grouped_gemm.py --dtype fp8 2>&1 | grep -v -i warn | tee "$out/tune.log" | tail -8
  mkdir -p /root/tuned && cp vllm_moe_offload/offload/kernels/configs/*.json /root/tuned/
  cp /root/tuned/*.json "$out/tuned-configs.json"
  python3 benchmarks/bench_kernels.py --out "$out/kernels.json" 2>&1 | grep -v -i "warn\|INFO" | tail -10 ;;
equality)
  with_vllm
  timeout 480 env OUT="$out" bash scripts/device-foundation.sh equality "${2:-not oracle and not inert}" | tail -4 ;;
fullsize)
  with_vllm
  model=/root/qwen3-30b-a3b-fp8
  [ -f "$model/model.safetensors.index.json" ] || \
    python3 -m vllm_moe_offload make-model "$model" --preset qwen3-30b-a3b-fp8 2>&1 | tail -1
  MOE_OFFLOAD_FULL_SIZE_MODEL=$model full_size_test fullsize 520 ;;
e2e)
  with_vllm
  systems=($2); barrier=/tmp/e2e-barrier-$$:${#systems[@]}; routing=${4:-realistic}
  for system in "${systems[@]}"; do
    stats=(); [[ -n "${ROUTING_STATS:-}" && "$system" != offload* ]] && stats=(--routing-stats "$ROUTING_STATS")
    name="e2e-$routing-${system//+/_}"
    python3 benchmarks/bench_e2e.py "$system" "$3" --routing "$routing" "${stats[@]}" --tp "${TP:-1}" \
      --barrier "$barrier" --out "$out/$name.json" > "$out/$name.log" 2>&1 &
  done
  wait
  for system in "${systems[@]}"; do
    echo "== $system ($routing)"; grep -E "RESULT|ROUTING|Error|error:|engine start" "$out/e2e-$routing-${system//+/_}.log" | cut -c1-400 | tail -7
  done ;;
walk)
  with_vllm
  walk_model
  MOE_OFFLOAD_FULL_SIZE_MODEL=/root/walk MOE_OFFLOAD_FULL_SIZE_DRAFT=/root/walk-draft \
    full_size_test walk 480 -k eagle3 ;;
guidellm)
  with_vllm
  walk_model
  dir=/root/guidellm-$(date +%s)
  # TERM before the call's 600 s (bash's SECONDS: this script's age, staging and the checkpoint
  # write included; KILL 30 s later): the sweep stops its servers, the copies below still run
  left=$((${GUIDELLM_DEADLINE_S:-520} - SECONDS))
  ((left > 60)) || { echo "guidellm: ${left} s of the call left, too few to start"; exit 1; }
  timeout -k 30 "$left" \
    python3 benchmarks/guidellm_sweep.py --model /root/walk --draft /root/walk-draft \
    --routing "${ROUTING:-realistic}" \
    --systems "$2" --concurrency "$3" --seconds "${4:-300}" --waves "${5:-2}" --side-by-side \
    --out "$dir" > "$out/guidellm.log" 2>&1
  rc=$?
  tail -22 "$out/guidellm.log"
  cp "$dir"/guidellm_sweep.json "$dir"/guidellm_sweep.png "$out/" 2>/dev/null
  (cd "$dir/raw" && tar -cJf "$out/serve-logs.tar.xz" serve-*.log
   tar -cJf "$out/guidellm-raw.tar.xz" guidellm-*.json) 2>/dev/null
  exit $rc ;;
trace)
  with_vllm
  dir=/root/trace-$(date +%s)
  python3 benchmarks/bench_e2e.py "$2" lat --routing "${ROUTING:-realistic}" \
    --trace "$dir" --out "$out/e2e-trace.json" > "$out/e2e-trace.log" 2>&1
  grep -E "RESULT|TRACE|Error" "$out/e2e-trace.log" | cut -c1-600
  # every trace: trace_summary.py picks the one that holds the op, not merely the newest
  cp "$dir"/*.pt.trace.json.gz "$out/" ;;
step)
  with_vllm  # vLLM's moe_align_block_size, as in the engine (torch ops stand in without it)
  python3 benchmarks/bench_step.py --tokens "${2:-1,2,4,8,32}" --trace /root/step-trace \
    --out "$out/bench_step.json" 2>&1 | grep -v -i warn | tee "$out/bench_step.log" | tail -12
  for d in /root/step-trace/*/; do
    echo "== $(basename "$d")"
    python3 benchmarks/trace_summary.py "$d" --op moe_offload_step --layers 8
  done > "$out/step-traces.txt"
  cat "$out/step-traces.txt" ;;
plan)
  with_vllm
  python3 -m vllm_moe_offload plan qwen3-30b-a3b-fp8 --out "$out/plan.json" 2>&1 | grep -v -i warn | tail -12 ;;
tp)
  with_vllm; with_pytest
  timeout 480 python3 -m pytest -q -rs -p no:cacheprovider tests/e2e/test_tp.py 2>&1 | tee "$out/pytest-tp.log" | tail -6 ;;
serve)
  with_vllm
  env OUT="$out" bash scripts/device-foundation.sh serve | tail -6 ;;
esac
