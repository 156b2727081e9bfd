"""The layer step outside vLLM, on CPU: the graph step (no host sync; missing experts read
from the host store) computes what the host-synced step computes, and counts the same
lookups, hits and misses."""

import torch

from vllm_moe_offload import step
from vllm_moe_offload.cache import ExpertCache
from vllm_moe_offload.kernels.reference import route
from vllm_moe_offload.store import ExpertLayout, ExpertStore

LAYOUT = ExpertLayout(hidden=64, inter=32, weight_dtype=torch.bfloat16)
E, K = 8, 2


def make_cache() -> ExpertCache:
    store = ExpertStore(LAYOUT, num_layers=1, num_experts=E, pin=False)
    store.fill_random(seed=1)
    cache = ExpertCache(store, num_slots=4, policy="lfu", device="cpu", graph_decode=True)
    cache.preload()
    return cache


def test_graph_step_equals_synced_step():
    gen = torch.Generator().manual_seed(0)
    synced, graph = make_cache(), make_cache()
    counted = graph.routing
    for t in (3, 1, 5, 2, 4):
        hidden = torch.randn(t, LAYOUT.hidden, generator=gen).bfloat16()
        topk_w, topk_ids = route(torch.randn(t, E, generator=gen), K, True)
        out_synced, out_graph = torch.empty_like(hidden), torch.empty_like(hidden)
        resident = set(graph.resident(0))  # what its last host-synced step published
        lookups, misses = int(counted.device_lookups.sum()), int(counted.device_misses.sum())
        step.synced_step(synced, 0, hidden, topk_w, topk_ids, out_synced)
        step.graph_step(graph, 0, hidden, topk_w, topk_ids, out_graph)
        torch.testing.assert_close(out_graph, out_synced, rtol=1e-2, atol=1e-2)
        routed = set(topk_ids.flatten().tolist())
        assert int(counted.device_lookups.sum()) - lookups == len(routed)
        assert int(counted.device_misses.sum()) - misses == len(routed - resident)
        # the graph step never fetches; the next host-synced step does, and publishes
        step.synced_step(graph, 0, hidden, topk_w, topk_ids, out_graph)
        torch.testing.assert_close(out_graph, out_synced, rtol=0, atol=0)
    snap = graph.snapshot()
    assert snap.host_syncs == 5 and snap.layer_steps == 10
    assert snap.hits + snap.misses == 2 * int(counted.device_lookups.sum())


def test_decode_in_graphs_informs_the_next_eviction():
    """Zero-copy decode steps bring no routing to the host; the counts the device kept are
    folded into the policy at the layer's next host-synced step, so what decode used last is
    evicted last (LRU here: without the fold the victim would be expert 1)."""
    store = ExpertStore(LAYOUT, num_layers=1, num_experts=E, pin=False)
    store.fill_random(seed=1)
    cache = ExpertCache(store, num_slots=4, policy="lru", device="cpu", graph_decode=True)
    cache.preload()

    def run(layer_step, ids):
        ids = torch.tensor(ids, dtype=torch.int32)
        hidden = torch.randn(ids.shape[0], LAYOUT.hidden).bfloat16()
        weights = torch.full(ids.shape, 1.0 / K)
        layer_step(cache, 0, hidden, weights, ids, torch.empty_like(hidden))

    run(step.synced_step, [[0, 1], [2, 3]])  # loads 0, 1, 2, 3 (LRU order)
    for _ in range(3):
        run(step.graph_step, [[1, 0]])  # decode uses only 0 and 1
    run(step.synced_step, [[4, 0]])  # 4 misses: the victim is the least recent of 2, 3
    assert sorted(cache.resident(0)) == [0, 1, 3, 4]
