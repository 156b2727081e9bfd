"""Greedy equality at full size: the written `qwen3-30b-a3b-fp8` checkpoint (48 layers x 128
experts, FP8 block-scaled) with a cache of 25% of the experts equals stock vLLM, both with CUDA
graphs. Too big for CI: it runs on the device with the checkpoint built there first
(`vllm-moe-offload make-model DIR --preset qwen3-30b-a3b-fp8`, ~31 GB) and named by
MOE_OFFLOAD_FULL_SIZE_MODEL=DIR."""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.conftest import PROMPTS, assert_greedy_close, generate

MODEL = os.environ.get("MOE_OFFLOAD_FULL_SIZE_MODEL")
SLOTS = 1536  # 25% of 48 x 128 experts, 32 per layer
# Greedy output of 8 prompts needs batches of at most 8; fewer captured sizes start faster.
ENGINE = {"enforce_eager": False, "kv_cache_memory_bytes": 2 << 30,
          "compilation_config": {"cudagraph_capture_sizes": [1, 2, 4, 8]}}

pytestmark = [pytest.mark.e2e, pytest.mark.gpu,
              pytest.mark.skipif(not MODEL, reason="set MOE_OFFLOAD_FULL_SIZE_MODEL (device only)")]


def test_full_size_offload25_equals_stock(tmp_path):
    assert len(PROMPTS) == 8
    model, offload_config = Path(MODEL), {"expert_offload": {"enabled": True, "cache_slots": SLOTS}}
    # Both engines fit on one 80 GB card (31 + 10 GB): they start side by side, which halves
    # the minutes of compilation and graph capture.
    with ThreadPoolExecutor(2) as pool:
        runs = []
        for name, extra in (("stock", None), ("offload", offload_config)):
            (tmp_path / name).mkdir()
            runs.append(pool.submit(generate, model, tmp_path / name, extra, max_tokens=64,
                                    llm_kwargs=ENGINE))
        stock, offload = (r.result() for r in runs)
    stats = offload["stats"]
    assert stats["slots_per_layer"] == [32] * 48
    assert stats["evictions"] > 0 and stats["misses"] > 0 and stats["hits"] > 0
    assert stats["bytes_h2d"] == (stats["misses"] + stats["prefetches"]) * stats["slot_bytes"]
    assert_greedy_close(stock, offload)  # both runs' outputs stay in tmp_path for the record
