"""ExpertCache on scripted routing: exact hits, misses, bytes, LRU order, slot exclusivity."""

import random

import pytest
import torch

from vllm_moe_offload.cache import ExpertCache, layer_quotas
from vllm_moe_offload.store import ExpertLayout, ExpertStore

LAYOUT = ExpertLayout(hidden=32, inter=16, weight_dtype=torch.bfloat16)


def make_cache(num_slots: int, num_layers: int = 2, num_experts: int = 8,
               graph_decode: bool = False) -> ExpertCache:
    store = ExpertStore(LAYOUT, num_layers, num_experts, pin=False)
    for records in store.records:  # every record distinct, to check what a slot holds
        records.copy_(torch.randint(0, 256, records.shape, dtype=torch.uint8))
    return ExpertCache(store, num_slots, "lru", device="cpu", graph_decode=graph_decode)


def assert_slots_consistent(cache: ExpertCache) -> None:
    owners = cache.owners()
    seen = set()
    for layer in range(cache.store.num_layers):
        for expert, slot in cache.resident(layer).items():
            assert owners[slot] == (layer, expert)
            assert slot not in seen, f"slot {slot} serves two experts"
            seen.add(slot)
            assert torch.equal(cache.pool[slot], cache.store.record(layer, expert))
    assert seen == set(owners)


def test_scripted_trace_counts_and_lru_order():
    cache = make_cache(num_slots=6)  # 3 slots per layer
    trace = [  # (layer, experts of one step)
        (0, [1, 2]), (1, [5]), (0, [2, 3]), (0, [1, 4]), (0, [3]), (1, [5, 6, 7]), (0, [2]),
    ]
    expected_hits = [0, 0, 1, 1, 1, 1, 0]
    # LRU of layer 0 after each step, oldest first
    expected_lru = {0: [1, 2], 2: [1, 2, 3], 3: [3, 1, 4], 4: [1, 4, 3], 6: [4, 3, 2]}
    for step, (layer, experts) in enumerate(trace):
        hits_before = cache.stats.hits
        for group in cache.schedule(layer, experts):
            cache.fetch(layer, group)
        assert cache.stats.hits - hits_before == expected_hits[step], step
        if step in expected_lru:
            assert list(cache._policy[0]._order) == expected_lru[step], step
        assert_slots_consistent(cache)
    assert cache.stats.hits == 4
    assert cache.stats.misses == 8
    assert cache.stats.evictions == 2  # step 3 evicts expert 2, step 6 evicts expert 1
    assert cache.stats.bytes_h2d == 8 * LAYOUT.record_bytes


def test_hot_first_and_passes_bounded_by_quota():
    cache = make_cache(num_slots=6)
    cache.fetch(0, [6, 7])
    passes = cache.schedule(0, [1, 2, 3, 6, 4, 7, 5])
    # the resident experts form the first pass (computed while the others are copied)
    assert passes == [[6, 7], [1, 2, 3], [4, 5]]
    for group in passes:
        slots = cache.fetch(0, group)
        assert len(set(slots)) == len(group)
        assert_slots_consistent(cache)


def test_random_traces_never_share_a_slot():
    rng = random.Random(0)
    cache = make_cache(num_slots=7, num_layers=3, num_experts=10)
    lookups = 0
    for _ in range(300):
        layer = rng.randrange(3)
        experts = rng.sample(range(10), rng.randint(1, 6))
        lookups += len(experts)
        for group in cache.schedule(layer, experts):
            cache.fetch(layer, group)
        assert_slots_consistent(cache)
    s = cache.stats
    assert s.hits + s.misses == lookups
    assert s.bytes_h2d == s.misses * cache.slot_bytes
    assert s.evictions == s.misses - len(cache.owners())


def test_quotas_split_evenly_and_cap_at_experts():
    assert layer_quotas(10, 3, 8) == [4, 3, 3]
    assert layer_quotas(100, 2, 8) == [8, 8]


def test_fetch_more_than_quota_is_refused():
    cache = make_cache(num_slots=4)
    with pytest.raises(AssertionError):
        cache.fetch(0, [0, 1, 2])


class RecordingTransfers:
    """Transfers' interface on CPU, recording the ordering calls the cache makes."""

    is_cuda = False

    def __init__(self):
        self.waited, self.copies, self.marks, self._unmarked = [], 0, 0, 0

    def copy(self, dst, src):
        dst.copy_(src)
        self.copies += 1
        self._unmarked += 1

    def copy_after(self, event):
        if event is not None:
            self.waited.append(event)

    def mark_copied(self):
        if not self._unmarked:
            return None
        self._unmarked = 0
        self.marks += 1
        return f"copied-{self.marks}"

    def synchronize(self):
        pass


def test_copy_into_a_slot_an_earlier_pass_reads_waits_for_that_pass():
    cache = make_cache(num_slots=6)  # 3 slots per layer
    cache.transfers = transfers = RecordingTransfers()
    for group in cache.schedule(0, [0, 1, 2]):
        cache.fetch(0, group)
    passes = cache.schedule(0, [0, 1, 2, 3, 4])
    assert passes == [[0, 1, 2], [3, 4]]
    slots = cache.fetch(0, passes[0])
    assert cache.take_ready(0) == f"copied-{transfers.marks}"  # a no-copy pass: last copies
    assert cache.take_ready(0) is None  # taken once
    cache.computed(slots, "pass-0-done")
    cache.fetch(0, passes[1])  # evicts two experts that pass 0 is still reading
    assert transfers.waited == ["pass-0-done", "pass-0-done"]
    cache.schedule(0, [3])  # a new step: earlier passes are complete after its sync
    cache.fetch(1, [5])
    assert len(transfers.waited) == 2


def test_preloaded_layers_hold_every_expert_and_count_lookups_as_hits():
    cache = make_cache(num_slots=16, num_layers=2, num_experts=8)  # all resident
    assert cache.resident_layers == [0, 1]
    cache.preload()
    assert cache.stats.preloaded == 16 and cache.stats.bytes_h2d == 0
    assert_slots_consistent(cache)
    experts, slots, slot_map = cache.device_map(1)
    assert experts == list(range(8)) and slot_map.tolist() == slots
    from vllm_moe_offload.kernels import count_routing
    count_routing(torch.tensor([[0, 3], [3, 5]]), slot_map, cache.routing, 1)
    snap = cache.snapshot()
    assert snap.hits == 3 and snap.misses == 0 and snap.layer_steps == 1
    assert cache.routing.routed[1].tolist() == [1, 0, 0, 2, 0, 1, 0, 0]


def test_device_maps_follow_residency_once_published():
    cache = make_cache(num_slots=6, num_layers=2, num_experts=8, graph_decode=True)
    cache.preload()  # 3 slots per layer
    assert cache.layer_maps.tolist() == [[-1] * 8, [-1] * 8]
    for group in cache.schedule(0, [1, 2, 3]):
        cache.fetch(0, group)
    for group in cache.schedule(0, [4]):
        cache.fetch(0, group)  # evicts one of 1, 2, 3
    assert cache.layer_maps[0].tolist() == [-1] * 8  # not before publish
    cache.publish_map(0)
    resident = cache.resident(0)
    assert cache.layer_maps[0].tolist() == [resident.get(e, -1) for e in range(8)]
    # a graph step's misses (routed, no slot) count as misses with their bytes
    from vllm_moe_offload.kernels import count_routing
    missing = next(e for e in range(8) if e not in resident)
    count_routing(torch.tensor([[4, missing]]), cache.layer_maps[0], cache.routing, 0)
    snap = cache.snapshot()
    assert snap.misses - cache.stats.misses == 1 and snap.hits - cache.stats.hits == 1
    assert snap.bytes_h2d - cache.stats.bytes_h2d == cache.slot_bytes


def test_without_graph_decode_a_synced_step_uploads_no_map():
    cache = make_cache(num_slots=6, num_layers=2, num_experts=8)
    cache.preload()
    for group in cache.schedule(0, [1, 2]):
        cache.fetch(0, group)
    cache.publish_map(0)  # nothing reads it: the hot path skips the upload
    assert cache.layer_maps[0].tolist() == [-1] * 8


def test_a_pass_that_fits_beside_the_resident_one_is_fetched_first():
    cache = make_cache(num_slots=16, num_experts=16)  # 8 slots per layer
    cache.transfers = transfers = RecordingTransfers()
    for group in cache.schedule(0, [0, 1, 2, 3, 4, 5, 6, 7]):
        cache.fetch(0, group)  # layer 0 full
    hits, misses = cache.schedule(0, [0, 1, 8, 9])
    assert cache.fits_beside(0, misses, hits)  # 2 misses, 6 evictable residents
    slots, ready = cache.fetch_pass(0, misses, hits)
    assert ready == f"copied-{transfers.marks}"  # its own copies
    assert set(cache.resident(0)) >= {0, 1, 8, 9}  # the resident pass was kept
    hit_slots, hit_ready = cache.fetch_pass(0, hits)
    assert hit_ready is None  # nothing copied for it, nothing pending
    assert not cache.fits_beside(0, list(range(10, 16)) + [8], [0, 1])  # 7 misses, 6 free


def test_preload_again_after_a_weight_reload_refreshes_every_slot():
    cache = make_cache(num_slots=15, num_layers=2, num_experts=8)  # 8 + 7: layer 0 resident
    assert cache.resident_layers == [0]
    cache.preload()
    for group in cache.schedule(1, [0, 1, 2]):
        cache.fetch(1, group)
    for records in cache.store.records:  # new weights in the store, as a reload leaves them
        records.copy_(torch.randint(0, 256, records.shape, dtype=torch.uint8))
    cache.preload()
    assert cache.resident(1) == {}  # stale residents of a fetching layer are dropped
    assert_slots_consistent(cache)  # every resident slot equals the store's new record
    assert cache.stats.preloaded == 16
    for group in cache.schedule(1, [0, 1]):
        cache.fetch(1, group)
    assert_slots_consistent(cache)
