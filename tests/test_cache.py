"""ExpertCache on the CPU (the kernels' torch twins): what every slot holds, exact counters and
bytes, the directory against the host model of its rule, staging."""

import pytest
import torch

from vllm_moe_offload.offload.cache import ExpertCache, layer_quotas
from vllm_moe_offload.offload.kernels.directory import HOST, SKIP
from vllm_moe_offload.offload.policies import DirectoryModel
from vllm_moe_offload.offload.store import ExpertLayout, ExpertStore

LAYOUT = ExpertLayout(hidden=32, inter=16, weight_dtype=torch.bfloat16)


def make_cache(num_slots: int, num_layers: int = 2, num_experts: int = 8) -> ExpertCache:
    store = ExpertStore(LAYOUT, num_layers, num_experts, pin=False)
    for records in store.records:  # every record distinct, to check what a slot holds
        records.copy_(torch.randint(0, 256, records.shape, dtype=torch.uint8))
    cache = ExpertCache(store, num_slots, device="cpu")
    cache.preload()
    return cache


def assert_slots_hold_their_experts(cache: ExpertCache) -> None:
    owners = cache.owners()
    assert sorted(owners) == list(range(cache.num_slots)), "every quota slot, once"
    for slot, (layer, expert) in owners.items():
        start, quota = cache.starts[layer], cache.quotas[layer]
        assert start <= slot < start + quota, "a layer's experts stay in its own slots"
        assert torch.equal(cache.pool[slot], cache.store.record(layer, expert))


def step(cache: ExpertCache, layer: int, ids: list[list[int]]):
    maps = cache.update(layer, torch.tensor(ids))
    cache.fill(layer)
    return maps.first.tolist(), maps.second.tolist()


def test_quotas_split_evenly_and_cap_at_experts():
    assert layer_quotas(10, 3, 8) == [4, 3, 3]
    assert layer_quotas(30, 3, 8) == [8, 8, 8]


def test_preload_holds_the_first_experts_and_resident_layers_all():
    cache = make_cache(num_slots=3 + 8, num_layers=2)  # quotas [6, 5]: no layer resident
    assert cache.quotas == [6, 5] and cache.staging == 6 and cache.resident_layers == []
    assert_slots_hold_their_experts(cache)
    assert {e for (layer, e) in cache.owners().values() if layer == 1} == set(range(5))
    full = make_cache(num_slots=16, num_layers=2)
    assert full.resident_layers == [0, 1] and full.staging == 0
    assert full.snapshot().preloaded == 16 and full.snapshot().bytes_h2d == 0


def test_a_step_fills_misses_into_unrouted_slots_and_counts_exactly():
    cache = make_cache(num_slots=8, num_layers=2)  # 4 slots per layer, experts 0-3 resident
    first, second = step(cache, 0, [[0, 5], [6, 1]])  # hits 0, 1; misses 5, 6
    assert [first[e] >= 0 for e in range(8)] == [True, True] + [False] * 6
    assert second[5] >= 0 and second[6] >= 0 and second.count(SKIP) == 6
    # the victims: 2 and 3 (not routed), lowest (score, last use, id) first
    owners = {e for (layer, e) in cache.owners().values() if layer == 0}
    assert owners == {0, 1, 5, 6}
    assert_slots_hold_their_experts(cache)
    snap = cache.snapshot()
    assert (snap.hits, snap.misses, snap.fills, snap.reads, snap.evictions) == (2, 2, 2, 0, 2)
    assert snap.bytes_h2d == 2 * LAYOUT.record_bytes and snap.layer_steps == 1
    # a step routing to more new experts than it leaves unrouted slots reads the rest
    first, second = step(cache, 0, [[0, 1], [5, 6], [2, 3], [4, 7]])  # 4 misses, no victim
    assert second.count(HOST) == 4 and all(first[e] >= 0 for e in (0, 1, 5, 6))
    snap = cache.snapshot()
    assert (snap.hits, snap.misses, snap.fills, snap.reads) == (6, 6, 2, 4)
    assert snap.bytes_h2d == 6 * LAYOUT.record_bytes
    assert cache.counters.routed[0].tolist() == [2, 2, 1, 1, 1, 2, 2, 1]


def test_the_directory_follows_the_host_model_of_its_rule():
    cache = make_cache(num_slots=2 * 5, num_layers=2)
    models = [DirectoryModel(8, list(range(s, s + q)))
              for s, q in zip(cache.starts, cache.quotas, strict=True)]
    gen = torch.Generator().manual_seed(0)
    for i in range(60):
        layer = i % 2
        ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(1 + i % 5)])
        step(cache, layer, ids.tolist())
        fills, reads, hits = models[layer].step(ids.numpy())
        want = [-1] * 8
        for e, s in models[layer].slot.items():
            want[e] = s
        assert cache.directory.slot[layer].tolist() == want
        assert_slots_hold_their_experts(cache)


def test_staging_places_experts_after_the_quotas():
    cache = make_cache(num_slots=8, num_layers=2)
    pass_map, _ = cache.stage(1, [7, 4], after=None)
    assert pass_map.tolist() == [-1, -1, -1, -1, 9, -1, -1, 8]
    assert torch.equal(cache.pool[8], cache.store.record(1, 7))
    with pytest.raises(AssertionError):
        cache.stage(1, list(range(5)), after=None)


def test_a_step_before_the_experts_are_loaded_is_refused():
    store = ExpertStore(LAYOUT, 1, 8, pin=False)
    cache = ExpertCache(store, 4, device="cpu")
    with pytest.raises(RuntimeError, match="before the experts were loaded"):
        cache.update(0, torch.tensor([[1, 2]]))


def test_host_side_buffers_stay_on_the_host_under_a_default_device():
    """vLLM builds the model under `with torch.device("cuda")`: every host buffer of the cache
    (pinned on CUDA) must say device="cpu" (seen on an H200: "Only dense CPU tensors can be
    pinned"). A meta default device shows it here."""
    store = ExpertStore(LAYOUT, 2, 8, pin=False)
    with torch.device("meta"):
        cache = ExpertCache(store, 8, device="cpu")
    for t in (cache.counters.routed, cache.counters.counts, cache.second_map.host,
              cache.maps._host):
        assert t.device.type == "cpu", t


def test_tensor_parallel_ranks_decide_alike_and_a_divergence_stops_the_engine():
    """Each rank caches its shard of the experts; on the same routing their directories are
    the same (the rule is a function of the routing), and a rank that decided otherwise is
    caught at the next eager (staged) step."""
    half = ExpertLayout(hidden=32, inter=8, weight_dtype=torch.bfloat16)
    ranks = []
    for rank in (0, 1):
        store = ExpertStore(half, 2, 8, pin=False, rank=rank, tp_size=2)
        store.fill_random(seed=rank)  # other shards, other bytes
        cache = ExpertCache(store, 8, device="cpu")
        cache.preload()
        ranks.append(cache)
    gen = torch.Generator().manual_seed(0)
    for i in range(30):
        ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(1 + i % 4)])
        for cache in ranks:
            step(cache, i % 2, ids.tolist())
    assert torch.equal(ranks[0].directory.slot, ranks[1].directory.slot)
    seen = []

    def agree(t):  # stands in for the min/max all-reduce over the two ranks
        seen.append(t.clone())
        return torch.equal(seen[0], t) if len(seen) == 2 else True
    for cache in ranks:
        cache.check_ranks_agree = agree
        cache.verify_ranks()
    ranks[1].directory.slot[0, 0] += 100  # rank 1 placed an expert elsewhere
    seen.clear()
    ranks[0].verify_ranks()
    with pytest.raises(RuntimeError, match="ranks' expert caches disagree"):
        ranks[1].verify_ranks()
