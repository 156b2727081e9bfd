"""Greedy equality at full size: the written `qwen3-30b-a3b-fp8` checkpoint (48 layers x 128
experts, FP8 block-scaled) with a cache of 25% of the experts equals stock vLLM, both with CUDA
graphs. Too big for CI: it runs on the device with the checkpoint built there first
(`vllm-moe-offload make-model DIR --preset qwen3-30b-a3b-fp8`, ~31 GB) and named by
MOE_OFFLOAD_FULL_SIZE_MODEL=DIR. With MOE_OFFLOAD_FULL_SIZE_DRAFT=DIR (an EAGLE-3 draft of that
model, e.g. `make-model DIR --preset qwen3-30b-a3b-fp8 --predictable --draft DRAFT --draft-kind
oracle --draft-miss-rate 0.3`) the offload engine also speculates, k = 3: greedy speculation is
lossless, so it must still equal stock without speculation."""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.conftest import PROMPTS, assert_greedy_close, generate

MODEL = os.environ.get("MOE_OFFLOAD_FULL_SIZE_MODEL")
DRAFT = os.environ.get("MOE_OFFLOAD_FULL_SIZE_DRAFT")
SLOTS = 1536  # 25% of 48 x 128 experts, 32 per layer
# Greedy output of 8 prompts needs batches of at most 8; fewer captured sizes start faster.
ENGINE = {"enforce_eager": False, "kv_cache_memory_bytes": 2 << 30,
          "compilation_config": {"cudagraph_capture_sizes": [1, 2, 4, 8]}}

pytestmark = [pytest.mark.e2e, pytest.mark.gpu,
              pytest.mark.skipif(not MODEL, reason="set MOE_OFFLOAD_FULL_SIZE_MODEL (device only)")]


def stock_and_offload25(tmp_path, offload_engine: dict) -> tuple[dict, dict]:
    """Greedy runs of stock and of offload at 25%. Both engines fit on one 80 GB card (31 + 10
    GB): they start side by side, which halves the minutes of compilation and graph capture."""
    assert len(PROMPTS) == 8
    offload_config = {"expert_offload": {"enabled": True, "cache_slots": SLOTS}}
    with ThreadPoolExecutor(2) as pool:
        runs = []
        for name, extra, engine in (("stock", None, ENGINE),
                                    ("offload", offload_config, offload_engine)):
            (tmp_path / name).mkdir()
            runs.append(pool.submit(generate, Path(MODEL), tmp_path / name, extra,
                                    max_tokens=64, llm_kwargs=engine))
        return tuple(r.result() for r in runs)


def test_full_size_offload25_equals_stock(tmp_path):
    stock, offload = stock_and_offload25(tmp_path, ENGINE)
    stats = offload["stats"]
    assert stats["slots_per_layer"] == [32] * 48
    assert stats["evictions"] > 0 and stats["misses"] > 0 and stats["hits"] > 0
    assert stats["bytes_h2d"] == (stats["fills"] + stats["reads"]) * stats["slot_bytes"]
    assert_greedy_close(stock, offload)  # both runs' outputs stay in tmp_path for the record


@pytest.mark.skipif(not DRAFT, reason="set MOE_OFFLOAD_FULL_SIZE_DRAFT (device only)")
def test_full_size_eagle3_with_offload25_equals_stock_without_speculation(tmp_path):
    k = 3
    # a verify step of 8 sequences routes 8 x (k + 1) tokens: capture graphs for them too
    engine = dict(ENGINE, disable_log_stats=False,
                  compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32]},
                  speculative_config={"method": "eagle3", "model": DRAFT,
                                      "num_speculative_tokens": k})
    stock, speculative = stock_and_offload25(tmp_path, engine)
    spec = speculative["spec_decode"]
    assert spec["spec_decode_num_draft_tokens"] == k * spec["spec_decode_num_drafts"] > 0, spec
    assert spec["spec_decode_num_accepted_tokens"] > 0, spec
    assert speculative["stats"]["misses"] > 0 and speculative["stats"]["evictions"] > 0
    assert_greedy_close(stock, speculative)
