"""ExpertStore: record layout, loading checkpoint tensors, completeness, memory checks."""

import pytest
import torch

from vllm_moe_offload.offload.store import (
    ExpertLayout,
    ExpertStore,
    available_host_bytes,
    check_host_memory,
)

FP8 = ExpertLayout(hidden=256, inter=128, weight_dtype=torch.float8_e4m3fn, block=(128, 128))


def test_fp8_record_matches_vllm_parameter_shapes():
    f = FP8.fields
    assert f["w13"][0] == (256, 256) and f["w2"][0] == (256, 128)
    assert f["s13"][0] == (2, 2) and f["s2"][0] == (2, 1)
    assert all(offset % 256 == 0 for _, _, offset in f.values())
    # Qwen3-30B-A3B: 3 x 2048 x 768 FP8 bytes + fp32 scales, padded to 256 B
    qwen = ExpertLayout(2048, 768, torch.float8_e4m3fn, (128, 128))
    assert qwen.record_bytes == 3 * 2048 * 768 + 768 + 512  # s2: 384 B, padded to 256


def test_load_places_gate_up_down_and_scales():
    store = ExpertStore(FP8, num_layers=2, num_experts=3, pin=False)
    parts = {
        "gate_proj.weight": torch.randn(128, 256).to(torch.float8_e4m3fn),
        "up_proj.weight": torch.randn(128, 256).to(torch.float8_e4m3fn),
        "down_proj.weight": torch.randn(256, 128).to(torch.float8_e4m3fn),
        "gate_proj.weight_scale_inv": torch.rand(1, 2, dtype=torch.bfloat16),
        "up_proj.weight_scale_inv": torch.rand(1, 2, dtype=torch.bfloat16),
        "down_proj.weight_scale_inv": torch.rand(2, 1, dtype=torch.bfloat16),
    }
    for name, t in parts.items():
        store.load(1, 2, name, t)
    v = store.views[1]
    as_bytes = lambda t: t.view(torch.uint8)  # noqa: E731
    assert torch.equal(as_bytes(v["w13"][2][:128]), as_bytes(parts["gate_proj.weight"]))
    assert torch.equal(as_bytes(v["w13"][2][128:]), as_bytes(parts["up_proj.weight"]))
    assert torch.equal(as_bytes(v["w2"][2]), as_bytes(parts["down_proj.weight"]))
    assert torch.equal(v["s13"][2][1:], parts["up_proj.weight_scale_inv"].float())
    assert torch.equal(v["s2"][2], parts["down_proj.weight_scale_inv"].float())
    missing = store.missing()
    assert len(missing) == 2 * 3 * 6 - 6
    assert (1, 2, "gate_proj.weight") not in missing and (0, 0, "up_proj.weight") in missing


def test_store_stays_on_the_host_under_a_default_device():
    """vLLM builds the model under `with torch.device("cuda")`: nothing of the store may follow
    that default (its load marks would become one kernel launch per checkpoint tensor). The
    meta device stands in for CUDA here: a tensor that follows it has no data to mark."""
    with torch.device("meta"):
        store = ExpertStore(FP8, num_layers=1, num_experts=1, pin=False)
    assert {store.loaded.device.type} | {r.device.type for r in store.records} == {"cpu"}
    store.load(0, 0, "down_proj.weight", torch.ones(256, 128, dtype=torch.float8_e4m3fn))
    assert (0, 0, "down_proj.weight") not in store.missing()


def test_wrong_shape_is_refused():
    store = ExpertStore(FP8, num_layers=1, num_experts=1, pin=False)
    with pytest.raises(ValueError, match="expected"):
        store.load(0, 0, "down_proj.weight", torch.zeros(128, 256, dtype=torch.float8_e4m3fn))


def test_fill_random_is_finite():
    store = ExpertStore(FP8, num_layers=1, num_experts=4, pin=False)
    store.fill_random()
    for view in store.views[0].values():
        assert torch.isfinite(view.float()).all()
    assert store.missing() == []


def test_more_than_the_machine_has_fails_before_allocating():
    layers = available_host_bytes() // (8 * FP8.record_bytes) + 1  # > available by design
    with pytest.raises(ValueError, match="of host memory but only .* is available; free host "
                                         "memory"):
        ExpertStore(FP8, num_layers=layers, num_experts=8, pin=False)


def test_pinned_limit_names_both_sizes():
    # 32 records of 98,816 bytes against a cap of one record
    with pytest.raises(ValueError) as error:
        ExpertStore(FP8, num_layers=4, num_experts=8, pin=False, limit_bytes=FP8.record_bytes)


    assert str(error.value) == (
        "expert offload: the expert store needs 3.0 MiB of host memory, more than the "
        "pinned_limit_gb (--expert-pinned-limit-gb) cap of 96.5 KiB; raise pinned_limit_gb or "
        "serve a smaller model")


def test_sizes_that_round_alike_are_shown_in_bytes():
    gib = 1 << 30  # 1.00 GiB both, rounded
    with pytest.raises(ValueError, match=r"needs 1,073,742,848 bytes of host memory, more than "
                                         r"the .* cap of 1,073,741,824 bytes"):
        check_host_memory(gib + 1024, gib)


def test_tensor_parallel_ranks_hold_their_shard_of_every_expert():
    """TP=2: rank r holds rows [r I/2, (r+1) I/2) of gate and up and those columns of down,
    with their FP8 scale blocks; the two shards' outputs sum to the whole expert's."""
    from vllm_moe_offload.offload.kernels.reference import expert_mlp
    full = ExpertLayout(hidden=256, inter=256, weight_dtype=torch.bfloat16)
    half = ExpertLayout(hidden=256, inter=128, weight_dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    parts = {"gate_proj.weight": torch.randn(256, 256, generator=gen) / 16,
             "up_proj.weight": torch.randn(256, 256, generator=gen) / 16,
             "down_proj.weight": torch.randn(256, 256, generator=gen) / 16}
    whole = ExpertStore(full, 1, 1, pin=False)
    ranks = [ExpertStore(half, 1, 1, pin=False, rank=r, tp_size=2) for r in (0, 1)]
    for store in [whole, *ranks]:
        for name, t in parts.items():
            store.load(0, 0, name, t.bfloat16())
    assert torch.equal(ranks[1].views[0]["w13"][0][:128], parts["gate_proj.weight"][128:]
                       .bfloat16())
    assert torch.equal(ranks[0].views[0]["w2"][0], parts["down_proj.weight"][:, :128]
                       .bfloat16())
    x = torch.randn(3, 256, generator=gen).bfloat16()
    ones = torch.ones(3)
    out = expert_mlp(x, whole.views[0], 0, ones, None).float()
    shards = sum(expert_mlp(x, s.views[0], 0, ones, None).float() for s in ranks)
    torch.testing.assert_close(shards, out, rtol=2e-2, atol=2e-2)
    # FP8: a rank's scale blocks are the rows (gate, up) and columns (down) of its shard
    fp8 = ExpertLayout(hidden=256, inter=128, weight_dtype=torch.float8_e4m3fn, block=(128, 128))
    store = ExpertStore(fp8, 1, 1, pin=False, rank=1, tp_size=2)
    scale = torch.arange(4, dtype=torch.bfloat16).view(2, 2)  # [I/128, H/128] of I = 256
    store.load(0, 0, "gate_proj.weight_scale_inv", scale)
    store.load(0, 0, "down_proj.weight_scale_inv", scale)  # [H/128, I/128]
    assert store.views[0]["s13"][0][0].tolist() == [2.0, 3.0]
    assert store.views[0]["s2"][0][:, 0].tolist() == [1.0, 3.0]


def test_tensor_parallel_size_must_split_the_fp8_blocks():
    import types

    from vllm_moe_offload.offload.geometry import MoeGeometry
    config = types.SimpleNamespace(
        num_experts=8, num_experts_per_tok=2, hidden_size=256, moe_intermediate_size=256,
        num_hidden_layers=2, quantization_config={"quant_method": "fp8",
                                                  "activation_scheme": "dynamic",
                                                  "weight_block_size": [128, 128]})
    assert MoeGeometry.from_hf_config(config, torch.bfloat16, "fp8", 2).layout.inter == 128
    with pytest.raises(ValueError, match="does not split into --tensor-parallel-size 4 "
                                         "shards of whole 128-row FP8 blocks"):
        MoeGeometry.from_hf_config(config, torch.bfloat16, "fp8", 4)
