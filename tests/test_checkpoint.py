"""make-model: the full-size preset's layout (no weights written), a written tiny checkpoint, and
the predictable target's cycle."""

import json
import math

import torch
from safetensors import safe_open

from vllm_moe_offload.synthetic.checkpoint import PRESETS, hf_config, tensor_plan, write_checkpoint
from vllm_moe_offload.synthetic.predictable import cycle_for, target_tensor
from vllm_moe_offload.synthetic.tokenizer import SPECIAL_TOKENS


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


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def _layer_noise(config: dict, n: int, per_sublayer_rms: float, seed: int = 0) -> torch.Tensor:
    """What 2L sublayers that each add `per_sublayer_rms` per coordinate add to the residual."""
    gen = torch.Generator().manual_seed(seed)
    sd = per_sublayer_rms * math.sqrt(2 * config["num_hidden_layers"])
    return torch.randn(n, config["hidden_size"], generator=gen) * sd


def _greedy_successors(config, embed, lm_head, norm, noise_rms: float) -> torch.Tensor:
    """argmax of lm_head(norm(residual)) where the residual is each cycle token's embedding plus
    random-layer noise, rounded to bf16 as vLLM keeps it."""
    ids = cycle_for(config).ids
    residual = embed[ids].float() + _layer_noise(config, len(ids), noise_rms)
    residual = residual.to(torch.bfloat16).float()
    return (_rms_norm(residual, norm) @ lm_head.float().T).argmax(-1)


def test_predictable_target_walks_its_cycle(tmp_path):
    plain = write_checkpoint(tmp_path / "plain", "tiny", progress=False)
    out = write_checkpoint(tmp_path / "walk", "tiny", progress=False, predictable=True)
    config = json.loads((out / "config.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert index == json.loads((plain / "model.safetensors.index.json").read_text())["weight_map"]

    def tensor(root, name):
        with safe_open(root / index[name], "pt") as f:
            return f.get_tensor(name)

    for name in ("model.layers.0.mlp.experts.5.up_proj.weight", "model.norm.weight"):
        assert torch.equal(tensor(out, name), tensor(plain, name))  # only the cycle changed
    embed, lm_head, norm = (tensor(out, n) for n in
                            ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"))
    cycle = cycle_for(config)
    m = len(cycle.ids)
    assert m == 64 and len(set(cycle.ids.tolist()) | set(cycle.decoys.tolist())) == 2 * m
    assert min(cycle.ids.min(), cycle.decoys.min()) >= len(SPECIAL_TOKENS)
    for rms in (0.0, 1.0, 5.0):  # 5: the largest per-sublayer output the scale argument allows
        assert torch.equal(_greedy_successors(config, embed, lm_head, norm, rms),
                           cycle.ids.roll(-1)), rms
    # every token, on the cycle or not, is followed by a cycle token
    first = (_rms_norm(embed.float(), norm) @ lm_head.float().T).argmax(-1)
    assert torch.equal(first, cycle.ids[(cycle.positions + 1) % m])


def test_full_size_cycle_outweighs_48_random_layers():
    # the full-size preset's hidden size and depth, a vocabulary cut down to keep the test fast
    config = dict(hf_config(PRESETS["qwen3-30b-a3b-fp8"]), vocab_size=8192)
    cycle = cycle_for(config)
    assert len(cycle.ids) == 1024
    embed = target_tensor("model.embed_tokens.weight", cycle)
    lm_head = target_tensor("lm_head.weight", cycle)
    gen = torch.Generator().manual_seed(1)
    norm = 1.0 + 0.1 * torch.randn(config["hidden_size"], generator=gen)  # as make-model's
    for rms in (1.0, 5.0):
        assert torch.equal(_greedy_successors(config, embed, lm_head, norm, rms),
                           cycle.ids.roll(-1)), rms
