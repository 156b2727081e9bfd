"""make-model: the full-size preset's layout (no weights written) and a written tiny checkpoint."""

import json

import torch
from safetensors import safe_open

from vllm_moe_offload.checkpoint import PRESETS, hf_config, tensor_plan, write_checkpoint


def test_qwen3_30b_a3b_fp8_layout():
    preset = PRESETS["qwen3-30b-a3b-fp8"]
    config = hf_config(preset)
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (config["num_hidden_layers"], config["num_experts"], config["num_experts_per_tok"],
            config["hidden_size"], config["moe_intermediate_size"], config["vocab_size"]) == (
        48, 128, 8, 2048, 768, 151936)
    q = config["quantization_config"]
    assert q["weight_block_size"] == [128, 128] and q["activation_scheme"] == "dynamic"
    assert "model.layers.0.self_attn.q_proj" not in q["modules_to_not_convert"]
    plan = {name: shape for name, shape, _ in tensor_plan(preset.config)}
    assert plan["model.layers.47.mlp.experts.127.gate_proj.weight"] == (768, 2048)
    assert plan["model.layers.0.mlp.experts.0.down_proj.weight"] == (2048, 768)
    assert plan["model.layers.0.mlp.gate.weight"] == (128, 2048)
    assert plan["model.layers.0.self_attn.k_proj.weight"] == (512, 2048)
    experts = [n for n in plan if ".experts." in n]
    assert len(experts) == 48 * 128 * 3


def test_tiny_fp8_checkpoint(tmp_path):
    out = write_checkpoint(tmp_path / "m", "tiny-fp8", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    name = "model.layers.0.mlp.experts.3.up_proj.weight"
    with safe_open(out / index["weight_map"][name], "pt") as f:
        assert f.get_tensor(name).dtype == torch.float8_e4m3fn
        assert f.get_tensor(name + "_scale_inv").dtype == torch.bfloat16
    gate = "model.layers.0.mlp.gate.weight"
    with safe_open(out / index["weight_map"][gate], "pt") as f:
        assert f.get_tensor(gate).dtype == torch.bfloat16
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    assert len(tokenizer["model"]["vocab"]) == json.loads(
        (out / "config.json").read_text())["vocab_size"]
