"""OffloadConfig parsing, CLI flag folding and the cache-size plan."""

import argparse
import types

import pytest
import torch

from vllm_moe_offload.cli import add_offload_args, fold_offload_args
from vllm_moe_offload.config import OffloadConfig
from vllm_moe_offload.geometry import MoeGeometry
from vllm_moe_offload.planner import plan_cache


def test_defaults_off():
    assert OffloadConfig.from_dict(None).enabled is False


@pytest.mark.parametrize("raw, match", [
    ({"enabled": True, "policy": "fifo"}, "unknown --expert-cache-policy 'fifo'"),
    ({"enabled": True, "cache_slot": 4}, r"unknown key\(s\) \['cache_slot'\]"),
    ({"enabled": True, "cache_gb": 1, "cache_slots": 4}, "not both"),
    ({"enabled": True, "cache_slots": 0}, "must be > 0"),
    ({"enabled": True, "cache_slots": True}, "must be a number"),
    ({"enabled": "yes"}, "wrong type"),
    ({"enabled": True, "decode": "async"}, "unknown --expert-decode 'async'"),
])
def test_bad_config(raw, match):
    with pytest.raises(ValueError, match=match):
        OffloadConfig.from_dict(raw)


def parse(argv):
    parser = argparse.ArgumentParser()
    add_offload_args(parser)
    args = parser.parse_args(argv)
    engine_args = types.SimpleNamespace(additional_config={"other": 1})
    fold_offload_args(args, engine_args)
    return engine_args.additional_config


def test_flags_fold_into_additional_config():
    assert parse([]) == {"other": 1}
    folded = parse(["--enable-expert-offload", "--expert-cache-slots", "12",
                    "--expert-cache-policy", "lru"])
    assert folded == {"other": 1, "expert_offload": {"enabled": True, "cache_slots": 12,
                                                     "policy": "lru"}}
    with pytest.raises(ValueError, match="without --enable-expert-offload"):
        parse(["--expert-cache-gb", "4"])


def test_flags_join_an_enabled_additional_config():
    parser = argparse.ArgumentParser()
    add_offload_args(parser)
    engine_args = types.SimpleNamespace(
        additional_config={"expert_offload": {"enabled": True, "cache_slots": 8}})
    fold_offload_args(parser.parse_args(["--expert-cache-policy", "lru"]), engine_args)
    assert engine_args.additional_config == {
        "expert_offload": {"enabled": True, "cache_slots": 8, "policy": "lru"}}


def geometry(layers=4, experts=16, top_k=4):
    config = types.SimpleNamespace(num_experts=experts, num_experts_per_tok=top_k,
                                   hidden_size=128, moe_intermediate_size=64,
                                   num_hidden_layers=layers, norm_topk_prob=True)
    return MoeGeometry.from_hf_config(config, torch.bfloat16, None)


def test_plan_sizes():
    g = geometry()
    assert plan_cache(OffloadConfig(True, cache_slots=20), g, None).num_slots == 20
    gb = 40 * g.layout.record_bytes / (1 << 30)
    assert plan_cache(OffloadConfig(True, cache_gb=gb), g, None).num_slots == 40
    assert plan_cache(OffloadConfig(True), g, None).num_slots == 32  # half of 4 x 16
    assert plan_cache(OffloadConfig(True, cache_slots=999), g, None).num_slots == 64


def test_cache_smaller_than_top_k_per_layer():
    with pytest.raises(ValueError, match=r"fewer than top-k=4.*--expert-cache-slots >= 16"):
        plan_cache(OffloadConfig(True, cache_slots=15), geometry(), None)


def test_unsupported_models():
    g = types.SimpleNamespace(num_experts=8, num_experts_per_tok=2, hidden_size=128,
                              moe_intermediate_size=64, num_hidden_layers=2,
                              shared_expert_intermediate_size=256)
    with pytest.raises(ValueError, match="shared expert"):
        MoeGeometry.from_hf_config(g, torch.bfloat16, None)
    g.shared_expert_intermediate_size = 0
    g.quantization_config = {"quant_method": "awq"}
    with pytest.raises(ValueError, match="unsupported quantization 'awq'"):
        MoeGeometry.from_hf_config(g, torch.bfloat16, "awq")


def test_zero_copy_decode_keeps_prefill_out_of_full_graphs():
    from vllm.config.compilation import CUDAGraphMode

    from vllm_moe_offload.hooks import require_eager_mixed_batches
    for ok in (None, CUDAGraphMode.FULL_AND_PIECEWISE, CUDAGraphMode.FULL_DECODE_ONLY,
               CUDAGraphMode.PIECEWISE, CUDAGraphMode.NONE):
        require_eager_mixed_batches(types.SimpleNamespace(cudagraph_mode=ok), "zero-copy")
    with pytest.raises(ValueError, match=r"--expert-decode auto runs decode in CUDA graphs.*"
                                         r"use FULL_AND_PIECEWISE.*-cc.cudagraph_mode=PIECEWISE"):
        require_eager_mixed_batches(types.SimpleNamespace(cudagraph_mode=CUDAGraphMode.FULL),
                                     "auto")


def engine_config(mode=None, enforce_eager=False, speculative_config=None, level=2,
                  pooler_config=None, kv_transfer_config=None):
    return types.SimpleNamespace(
        compilation_config=types.SimpleNamespace(cudagraph_mode=mode),
        model_config=types.SimpleNamespace(enforce_eager=enforce_eager,
                                           pooler_config=pooler_config),
        speculative_config=speculative_config, optimization_level=level,
        kv_transfer_config=kv_transfer_config)


def test_decode_auto_takes_graphs_only_where_they_exist(monkeypatch):
    from vllm.config.compilation import CUDAGraphMode
    from vllm.platforms import current_platform
    auto = OffloadConfig(True)
    assert auto.decode == "auto"
    assert auto.decode_path(engine_config()) == "synced"  # this CPU: no CUDA graphs
    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    # the hook sees no mode yet: vLLM's default at -O2 and -O3 has FULL decode graphs
    assert auto.decode_path(engine_config()) == "zero-copy"
    assert auto.decode_path(engine_config(level=3)) == "zero-copy"
    assert auto.decode_path(engine_config(CUDAGraphMode.FULL_AND_PIECEWISE)) == "zero-copy"
    spec = types.SimpleNamespace(method="eagle3")
    transfer = types.SimpleNamespace(is_kv_transfer_instance=True)
    for eager in (engine_config(CUDAGraphMode.PIECEWISE), engine_config(CUDAGraphMode.NONE),
                  engine_config(level=1), engine_config(level=0),
                  engine_config(enforce_eager=True), engine_config(speculative_config=spec),
                  engine_config(pooler_config=object()),
                  engine_config(kv_transfer_config=transfer)):
        assert auto.decode_path(eager) == "synced", eager
    # the worker reads the final mode: whatever vLLM settled on after the hook decides
    # (--kv-offloading-size adds a KV-transfer config only after the hook ran)
    assert auto.decode_path(engine_config(CUDAGraphMode.FULL_AND_PIECEWISE,
                                          kv_transfer_config=transfer)) == "zero-copy"
    offloading = types.SimpleNamespace(is_kv_transfer_instance=False)
    assert auto.decode_path(engine_config(kv_transfer_config=offloading)) == "zero-copy"
    assert OffloadConfig(True, decode="zero-copy").decode_path(
        engine_config(speculative_config=spec)) == "zero-copy"
    assert OffloadConfig(True, decode="synced").decode_path(engine_config()) == "synced"


def test_decode_auto_limits_graphs_to_small_batches():
    from vllm_moe_offload.config import AUTO_GRAPH_TOKENS
    from vllm_moe_offload.hooks import _limit_graph_batches

    def compilation(max_size=None, sizes=None):
        return types.SimpleNamespace(max_cudagraph_capture_size=max_size,
                                     cudagraph_capture_sizes=sizes)
    default = compilation()
    _limit_graph_batches(default)
    assert default.max_cudagraph_capture_size == AUTO_GRAPH_TOKENS == 2
    for given in (compilation(max_size=8), compilation(sizes=[1, 2, 4])):
        before = vars(given).copy()
        _limit_graph_batches(given)  # the user's sizes move the boundary
        assert vars(given) == before
