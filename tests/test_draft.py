"""make-model --draft: speculators-format EAGLE-3 drafts that match their target."""

import json

import pytest
import torch
from safetensors import safe_open

from vllm_moe_offload.checkpoint import PRESETS, hf_config, write_checkpoint
from vllm_moe_offload.cli import main
from vllm_moe_offload.draft import aux_layer_ids, draft_config, tensor_plan, write_draft


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
    assert aux_layer_ids(48, "copy") == [2, 24, 48]


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
