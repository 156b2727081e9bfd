"""OffloadConfig parsing, CLI flag folding and the cache-size plan."""

import argparse
import types

import pytest
import torch

from vllm_moe_offload.config import OffloadConfig
from vllm_moe_offload.integration.flags import add_offload_args, fold_offload_args
from vllm_moe_offload.offload.budget import plan_cache
from vllm_moe_offload.offload.geometry import MoeGeometry


def test_defaults_off():
    assert OffloadConfig.from_dict(None).enabled is False


@pytest.mark.parametrize("raw, match", [
    ({"enabled": True, "cache_slot": 4}, r"unknown key\(s\) \['cache_slot'\]"),
    ({"enabled": True, "cache_gb": 1, "cache_slots": 4}, "not both"),
    ({"enabled": True, "cache_slots": 0}, "--expert-cache-slots must be > 0"),
    ({"enabled": True, "pinned_limit_gb": -2}, "--expert-pinned-limit-gb must be > 0"),
    ({"enabled": True, "cache_slots": True}, r"cache_slots must be a whole number of slots, "
                                             r"got True \(bool\)"),
    ({"enabled": True, "cache_gb": "0.5"}, r"cache_gb must be a number of GiB, got '0.5' "
                                           r"\(str\)"),
    ({"enabled": "yes"}, r"enabled must be true or false, got 'yes'"),
    (True, r"additional_config\['expert_offload'\] must be an object such as "
           r"\{\"enabled\": true"),
    ({"enabled": True, "decode": "auto"}, "'decode' is no longer a setting: decode now always "
                                          "updates the expert cache on the GPU"),
    ({"enabled": True, "policy": "lru"}, "'policy' is no longer a setting"),
    ({"enabled": True, "prefetch": "off"}, "'prefetch' is no longer a setting"),
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
                    "--expert-pinned-limit-gb", "40"])
    assert folded == {"other": 1, "expert_offload": {"enabled": True, "cache_slots": 12,
                                                     "pinned_limit_gb": 40.0}}
    with pytest.raises(ValueError, match="without --enable-expert-offload"):
        parse(["--expert-cache-gb", "4"])


def test_flags_join_an_enabled_additional_config():
    parser = argparse.ArgumentParser()
    add_offload_args(parser)
    engine_args = types.SimpleNamespace(
        additional_config={"expert_offload": {"enabled": True, "cache_slots": 8}})
    fold_offload_args(parser.parse_args(["--expert-pinned-limit-gb", "40"]), engine_args)
    assert engine_args.additional_config == {
        "expert_offload": {"enabled": True, "cache_slots": 8, "pinned_limit_gb": 40.0}}


@pytest.mark.parametrize("value, message", [
    ('{"expert_offload": {"enabled": true', "not valid JSON (Expecting ',' delimiter"),
    ('{"expert_offload": {"enabled": true,}}', "not valid JSON (Expecting property name"),
    ("[1, 2]", "must be a JSON object such as"),
])
def test_malformed_additional_config_names_the_json_error(value, message, capsys):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_moe_offload.integration.flags import install_flags
    install_flags()  # what register() does in every vLLM process
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    assert parser.parse_args(["--additional-config", '{"a": 1}']).additional_config == {"a": 1}
    with pytest.raises(SystemExit):
        parser.parse_args(["--additional-config", value])
    assert f"argument --additional-config: {message}" in capsys.readouterr().err


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


def test_expert_data_and_pipeline_parallelism_are_refused_tensor_parallelism_is_not():
    from vllm_moe_offload.integration.hooks import refuse_unsupported_parallelism

    def parallel(**kw):
        base = dict(enable_expert_parallel=False, data_parallel_size=1,
                    pipeline_parallel_size=1, tensor_parallel_size=2)
        return types.SimpleNamespace(**{**base, **kw})
    refuse_unsupported_parallelism(parallel())
    for kw, name in ((dict(enable_expert_parallel=True), "--enable-expert-parallel"),
                     (dict(data_parallel_size=2), "--data-parallel-size > 1"),
                     (dict(pipeline_parallel_size=2), "--pipeline-parallel-size > 1")):
        with pytest.raises(ValueError, match=f"{name} is not supported with "
                                             "--enable-expert-offload; use "
                                             "--tensor-parallel-size"):
            refuse_unsupported_parallelism(parallel(**kw))
