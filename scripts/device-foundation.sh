#!/usr/bin/env bash
# On the GPU machine (device tool), after the kit is staged: the foundation's device checks.
#   part 1: greedy equality of offload vs stock vLLM with vLLM's CUDA graphs (GPU tests), one
#           engine at a time: engines started side by side broke vLLM's start-up memory
#           profiling on the H200 ("Error in memory profiling": another engine freed memory)
#   part 2: `vllm serve` with the literal flag answers a chat request and logs counters
# usage: scripts/device-foundation.sh {equality|serve}   (writes logs to $OUT)
set -uo pipefail
source .devicekit/kit/env.sh
python3 -m pip install -q --no-index --find-links .devicekit/wheels pytest 2>/dev/null
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
case "$1" in
equality)
  python3 -m pytest -q -rs -p no:cacheprovider \
    tests/e2e/test_equality.py tests/e2e/test_spec.py ${2:+-k "$2"} \
    2>&1 | tee "$out/pytest-gpu.log" | tail -15
  for f in /tmp/pytest-of-root/pytest-*/test_*/run_llm-*.out.json; do
    [ -f "$f" ] && cp "$f" "$out/$(basename "$(dirname "$f")")-$(basename "$f")"
  done ;;
serve)
  python3 -m vllm_moe_offload make-model /root/tiny-fp8 --preset tiny-fp8 2>&1 | tail -1
  MOE_OFFLOAD_LOG_INTERVAL_S=1 vllm serve /root/tiny-fp8 --enable-expert-offload \
    --expert-cache-slots 12 --port 8000 --max-model-len 512 --gpu-memory-utilization 0.3 \
    > "$out/serve.log" 2>&1 &
  for _ in $(seq 240); do curl -sf localhost:8000/health >/dev/null && break; sleep 1; done
  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
    -d '{"model": "/root/tiny-fp8", "max_tokens": 32, "temperature": 0,
         "messages": [{"role": "user", "content": "Tell me a story."}]}' | tee "$out/chat.json"
  echo; sleep 3
  grep -E "expert offload|cudagraph_mode|Capturing CUDA graphs|Graph capturing finished" \
    "$out/serve.log" | cut -c1-300 | tail -8
  kill %1; wait ;;
esac
