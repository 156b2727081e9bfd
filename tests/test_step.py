"""The layer steps outside vLLM, on the CPU: the device step (fills and reads in place) and the
staged step (large steps) compute what the reference computes with every expert at hand, and
leave the same cache behind; the resident step counts its hits."""

import torch

from vllm_moe_offload.offload import step
from vllm_moe_offload.offload.cache import ExpertCache
from vllm_moe_offload.offload.kernels.reference import grouped_experts, route
from vllm_moe_offload.offload.store import ExpertLayout, ExpertStore

LAYOUT = ExpertLayout(hidden=64, inter=32, weight_dtype=torch.bfloat16)
E, K = 8, 2


def make_cache(num_slots: int = 4) -> ExpertCache:
    store = ExpertStore(LAYOUT, num_layers=1, num_experts=E, pin=False)
    store.fill_random(seed=1)
    cache = ExpertCache(store, num_slots=num_slots, device="cpu")
    cache.preload()
    return cache


def expected(cache, hidden, topk_w, topk_ids) -> torch.Tensor:
    acc = torch.zeros(hidden.shape, dtype=torch.float32)
    experts = sorted(set(topk_ids.reshape(-1).tolist()))
    grouped_experts(hidden, topk_w, topk_ids, experts, experts, cache.store.views[0], None, acc)
    return acc.to(hidden.dtype)


def test_device_and_staged_steps_compute_the_reference_and_agree_on_the_cache():
    gen = torch.Generator().manual_seed(0)
    device, staged = make_cache(), make_cache()
    for t in (3, 1, 5, 2, 4, 1, 6):
        hidden = torch.randn(t, LAYOUT.hidden, generator=gen).bfloat16()
        topk_w, topk_ids = route(torch.randn(t, E, generator=gen), K, True)
        want = expected(device, hidden, topk_w, topk_ids)
        for cache, layer_step in ((device, step.device_step), (staged, step.staged_step)):
            out = torch.empty_like(hidden)
            layer_step(cache, 0, hidden, topk_w, topk_ids, out)
            torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)
        assert device.owners() == staged.owners()
    a, b = device.snapshot(), staged.snapshot()
    assert (a.hits, a.misses, a.fills, a.reads) == (b.hits, b.misses, b.fills, b.reads)
    assert a.reads > 0 and a.fills > 0 and a.hits > 0
    assert (a.staged_steps, b.staged_steps) == (0, 7)


def test_a_large_step_stages_its_reads_in_passes():
    cache = make_cache(num_slots=2)  # 2 slots, 2 staging slots, 8 experts routed
    hidden = torch.randn(8, LAYOUT.hidden).bfloat16()
    topk_ids = torch.arange(8).view(4, 2).repeat(2, 1)  # every expert, twice
    topk_w = torch.full(topk_ids.shape, 0.5)
    out = torch.empty_like(hidden)
    step.staged_step(cache, 0, hidden, topk_w, topk_ids, out)
    torch.testing.assert_close(out, expected(cache, hidden, topk_w, topk_ids), rtol=1e-2,
                               atol=1e-2)
    snap = cache.snapshot()
    assert (snap.hits, snap.reads, snap.fills) == (2, 6, 0)  # no slot was free of the step
    assert snap.bytes_h2d == 6 * LAYOUT.record_bytes  # each read crossed once


def test_a_resident_layer_counts_every_routed_expert_as_a_hit():
    cache = make_cache(num_slots=E)
    assert cache.resident_layers == [0]
    hidden = torch.randn(3, LAYOUT.hidden).bfloat16()
    topk_w, topk_ids = route(torch.randn(3, E), K, True)
    out = torch.empty_like(hidden)
    step.resident_step(cache, 0, hidden, topk_w, topk_ids, out)
    torch.testing.assert_close(out, expected(cache, hidden, topk_w, topk_ids), rtol=1e-2,
                               atol=1e-2)
    snap = cache.snapshot()
    assert snap.hits == len(set(topk_ids.reshape(-1).tolist())) and snap.misses == 0
    assert snap.layer_steps == 1 and snap.bytes_h2d == 0
