"""make-model --draft: speculators-format EAGLE-3 drafts that match their target."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from vllm_moe_offload.cli import main
from vllm_moe_offload.synthetic.checkpoint import PRESETS, hf_config, write_checkpoint
from vllm_moe_offload.synthetic.draft import aux_layer_ids, draft_config, tensor_plan, write_draft
from vllm_moe_offload.synthetic.predictable import (
    cycle_for,
    missed_positions,
    oracle_tensor,
    target_tensor,
)


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(path / "model.safetensors", "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.mark.parametrize("preset", ["tiny", "tiny-fp8"])
def test_random_draft_matches_its_target(tmp_path, preset):
    main(["make-model", str(tmp_path / "t"), "--preset", preset, "--draft",
          str(tmp_path / "d"), "--draft-tokens", "4"])
    target = json.loads((tmp_path / "t" / "config.json").read_text())
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    layer = config["transformer_layer_config"]
    assert config["speculators_model_type"] == "eagle3" and layer["model_type"] == "llama"
    assert "model_type" not in config  # else vLLM would not read it as a speculators config
    assert (layer["hidden_size"], layer["vocab_size"], layer["head_dim"]) == (
        target["hidden_size"], target["vocab_size"], target["head_dim"])
    assert config["draft_vocab_size"] == target["vocab_size"] == 1024
    assert config["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    assert config["norm_before_residual"] is False
    spec = config["speculators_config"]
    assert spec["proposal_methods"][0]["speculative_tokens"] == 4
    assert spec["verifier"]["name_or_path"] == str((tmp_path / "t").resolve())
    tensors = _tensors(tmp_path / "d")
    assert {n: tuple(t.shape) for n, t in tensors.items()} == dict(tensor_plan(config))
    h = target["hidden_size"]
    assert tensors["fc.weight"].shape == (h, 3 * h)
    assert tensors["layers.0.self_attn.q_proj.weight"].shape == (
        target["num_attention_heads"] * target["head_dim"], 2 * h)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert "d2t" not in tensors and "embed_tokens.weight" not in tensors


def test_copy_draft_repeats_the_targets_prediction(tmp_path):
    target_dir = write_checkpoint(tmp_path / "t", "tiny", progress=False)
    draft = write_draft(tmp_path / "d", target_dir, kind="copy", progress=False)
    config = json.loads((draft / "config.json").read_text())
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]  # 3 = the last layer's output
    tensors = _tensors(draft)
    index = json.loads((target_dir / "model.safetensors.index.json").read_text())["weight_map"]
    for ours, theirs in [("lm_head.weight", "lm_head.weight"),
                         ("norm.weight", "model.norm.weight")]:
        with safe_open(target_dir / index[theirs], "pt") as f:
            assert torch.equal(tensors[ours], f.get_tensor(theirs))
    h = config["target_hidden_size"]
    hidden = torch.randn(5, 3 * h, dtype=torch.bfloat16)
    assert torch.equal(hidden @ tensors["fc.weight"].T, hidden[:, 2 * h:])
    assert not tensors["layers.0.self_attn.o_proj.weight"].any()
    assert not tensors["layers.0.mlp.down_proj.weight"].any()


def test_full_size_draft_layout(tmp_path):
    target = hf_config(PRESETS["qwen3-30b-a3b-fp8"])
    config = draft_config(target, tmp_path, "random", 3)
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 24, 45]  # vLLM's default for 48
    assert config["draft_vocab_size"] == 32000 and config["target_hidden_size"] == 2048
    plan = dict(tensor_plan(config))
    assert plan["fc.weight"] == (2048, 3 * 2048)
    assert plan["lm_head.weight"] == (32000, 2048)
    assert plan["layers.0.self_attn.k_proj.weight"] == (4 * 128, 2 * 2048)
    assert aux_layer_ids(48, "copy") == aux_layer_ids(48, "oracle") == [2, 24, 48]


def test_vllm_reads_the_draft_config(tmp_path):
    from vllm.transformers_utils.configs.speculators.base import SpeculatorsConfig

    target = hf_config(PRESETS["tiny"])
    config = draft_config(target, tmp_path, "random", 3)
    hf = SpeculatorsConfig.extract_transformers_pre_trained_config(json.loads(json.dumps(config)))
    assert hf["architectures"] == ["Eagle3LlamaForCausalLM"]
    assert hf["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    assert hf["norm_before_residual"] is False and hf["draft_vocab_size"] == 1024
    assert SpeculatorsConfig.extract_vllm_speculative_config(config) == {
        "method": "eagle3", "num_speculative_tokens": 3}


def test_draft_vocab_maps(tmp_path):
    config_dir = tmp_path / "t"
    config_dir.mkdir()
    target = dict(hf_config(PRESETS["tiny"]), vocab_size=40000)
    (config_dir / "config.json").write_text(json.dumps(target))
    tensors = _tensors(write_draft(tmp_path / "d", config_dir, progress=False))
    assert tensors["lm_head.weight"].shape == (32000, target["hidden_size"])
    assert tensors["d2t"].dtype == torch.int64 and tensors["d2t"].shape == (32000,)
    assert tensors["t2d"].sum() == 32000 and tensors["t2d"].shape == (40000,)


def test_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="draft kind"):
        write_draft(tmp_path / "d", tmp_path, kind="ngram")


def _draft_proposals(tensors: dict, aux: torch.Tensor, steps: int, feed: str) -> torch.Tensor:
    """[n, steps] token ids the draft proposes from target aux states [n, 3h], run as vLLM's
    Eagle3 Llama runs it (norm_before_residual False, attention adding nothing: o_proj is zero);
    each step gets the last one's `feed` ("prenorm" or "postnorm") hidden state."""
    t = {name: w.float() for name, w in tensors.items()}
    assert not t["layers.0.self_attn.o_proj.weight"].any()
    hidden = aux @ t["fc.weight"].T
    proposals = []
    for _ in range(steps):
        residual = hidden
        x = _rms_norm(residual, t["layers.0.post_attention_layernorm.weight"])
        gate, up = x @ t["layers.0.mlp.gate_proj.weight"].T, x @ t["layers.0.mlp.up_proj.weight"].T
        prenorm = residual + (torch.nn.functional.silu(gate) * up) @ t[
            "layers.0.mlp.down_proj.weight"].T
        postnorm = _rms_norm(prenorm, t["norm.weight"])
        proposals.append((postnorm @ t["lm_head.weight"].T).argmax(-1))
        hidden = prenorm if feed == "prenorm" else postnorm
    return torch.stack(proposals, dim=1)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _check_oracle(config: dict, embed: torch.Tensor, tensors: dict, missed: torch.Tensor,
                  stride: int = 1):
    """At the position of s_j, for every `stride`-th j (target state: its embedding plus what
    the layers add, at the size the scale argument allows), the draft proposes s_{j+2}, s_{j+3},
    s_{j+4}, but a decoy where that position is missed."""
    cycle = cycle_for(config)
    m, h = len(cycle.ids), config["hidden_size"]
    j = torch.arange(0, m, stride)
    gen = torch.Generator().manual_seed(2)
    noise = 5.0 * math.sqrt(2 * config["num_hidden_layers"])
    last = (embed[cycle.ids[j]].float() + noise * torch.randn(len(j), h, generator=gen))
    aux = torch.cat([torch.randn(len(j), 2 * h, generator=gen), last.to(torch.bfloat16).float()],
                    dim=1)
    ahead = (j[:, None] + torch.arange(2, 5)) % m
    expected = torch.where(missed[ahead], cycle.decoys[ahead], cycle.ids[ahead])
    for feed in ("prenorm", "postnorm"):
        assert torch.equal(_draft_proposals(tensors, aux, 3, feed), expected), feed


@pytest.mark.parametrize("miss_rate", [0.0, 0.3])
def test_oracle_draft_proposes_the_walk(tmp_path, miss_rate):
    target_dir = write_checkpoint(tmp_path / "t", "tiny", progress=False, predictable=True)
    draft = write_draft(tmp_path / "d", target_dir, kind="oracle", miss_rate=miss_rate, seed=3,
                        progress=False)
    config = json.loads((draft / "config.json").read_text())
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]  # 3 = the last layer's output
    target = json.loads((target_dir / "config.json").read_text())
    missed = missed_positions(64, miss_rate, seed=3)
    assert missed.sum() == round(miss_rate * 64)
    index = json.loads((target_dir / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(target_dir / index["model.embed_tokens.weight"], "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    _check_oracle(target, embed, _tensors(draft), missed)


def test_full_size_oracle_draft(tmp_path):
    # the full-size preset's hidden size, depth and FFN width; a vocabulary cut down for speed
    target = dict(hf_config(PRESETS["qwen3-30b-a3b-fp8"]), vocab_size=8192)
    cycle = cycle_for(target)
    missed = missed_positions(len(cycle.ids), 0.5, seed=0)
    config = draft_config(target, tmp_path, "oracle", 3)
    tensors = {name: oracle_tensor(name, shape, cycle, missed) for name, shape in
               tensor_plan(config) if "self_attn" not in name or "o_proj" in name}
    tensors = {name: t.to(torch.bfloat16) for name, t in tensors.items()}
    # every third position: their proposals still cover the whole cycle
    _check_oracle(target, target_tensor("model.embed_tokens.weight", cycle), tensors, missed,
                  stride=3)


def test_oracle_needs_a_predictable_target(tmp_path):
    target_dir = write_checkpoint(tmp_path / "t", "tiny", progress=False)
    with pytest.raises(ValueError, match="predictable"):
        write_draft(tmp_path / "d", target_dir, kind="oracle", progress=False)
    with pytest.raises(ValueError, match="miss rate"):
        write_draft(tmp_path / "d", target_dir, kind="copy", miss_rate=0.5, progress=False)
    for flags in (["--draft", str(tmp_path / "d2"), "--draft-kind", "oracle"],
                  ["--predictable", "--draft", str(tmp_path / "d2"), "--draft-miss-rate", "0.3"],
                  ["--predictable", "--draft-kind", "oracle", "--draft-miss-rate", "0.3"],
                  ["--predictable", "--draft", str(tmp_path / "d2"), "--draft-kind", "oracle",
                   "--draft-miss-rate", "1.5"]):
        with pytest.raises(SystemExit):
            main(["make-model", str(tmp_path / "t2"), *flags])
        assert not (tmp_path / "t2").exists()  # refused before the target is written
