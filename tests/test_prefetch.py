"""Eviction policies and the correlation prefetcher on scripted traces: exact counts."""

import numpy as np
import torch

from tests.test_cache import LAYOUT, assert_slots_consistent
from vllm_moe_offload.cache import ExpertCache
from vllm_moe_offload.policies import CooccurrencePolicy, LFUPolicy, LRUPolicy
from vllm_moe_offload.prefetch import CorrelationPrefetcher
from vllm_moe_offload.store import ExpertStore


def make_cache(num_slots=6, policy="lru", num_layers=2, num_experts=8) -> ExpertCache:
    store = ExpertStore(LAYOUT, num_layers, num_experts, pin=False)
    for records in store.records:
        records.copy_(torch.randint(0, 256, records.shape, dtype=torch.uint8))
    return ExpertCache(store, num_slots, policy, device="cpu")


def step(cache, layer, experts):
    for group in cache.schedule(layer, experts):
        cache.fetch(layer, group)


def test_lfu_keeps_the_frequent_expert():
    policy = LFUPolicy(8, decay=1.0)
    for e in (1, 2, 3):
        policy.insert(e)
    for experts in ([1], [1], [2], [1, 3]):
        policy.observe(experts)
    assert policy.victim(protected=set()) == 2  # 1 used 3x, 3 used once but later, 2 once
    assert policy.victim(protected={2}) == 3


def test_cooccurrence_evicts_the_stranger():
    policy = CooccurrencePolicy(8)
    for e in (1, 2, 3):
        policy.insert(e)
    for experts in ([1, 4], [2, 4], [2, 4], [3, 5], [4]):
        policy.observe(experts)  # now protecting 4's step: 2 ran with 4 twice, 1 once, 3 never
    assert policy.victim(protected={4}) == 3


def test_prefetch_turns_a_miss_into_a_hit_and_is_protected():
    cache = make_cache(num_slots=6)  # 3 per layer
    step(cache, 1, [0, 1, 2])
    assert cache.prefetch(1, [5, 6]) == 2  # evicts 0 and 1 (LRU), never the other prefetch
    assert cache.prefetch(1, [7]) == 1  # evicts 2: 5 and 6 stay protected until layer 1 runs
    assert set(cache.resident(1)) == {5, 6, 7}
    hits, misses = cache.stats.hits, cache.stats.misses
    step(cache, 1, [5, 6])
    assert (cache.stats.hits - hits, cache.stats.misses - misses) == (2, 0)
    s = cache.stats
    assert (s.prefetches, s.prefetch_used) == (3, 2)
    assert s.prefetch_precision == 2 / 3 and s.prefetch_recall == 2 / (2 + s.misses)
    assert_slots_consistent(cache)


def test_a_wrong_prediction_costs_only_its_bytes():
    trace = [(0, [1, 2]), (1, [3]), (0, [1, 2]), (1, [3, 4])]
    plain, guessed = make_cache(), make_cache()
    for i, (layer, experts) in enumerate(trace):
        if i == 1:
            guessed.prefetch(1, [6])  # never used, takes a free slot
        step(plain, layer, experts)
        step(guessed, layer, experts)
    assert (guessed.stats.hits, guessed.stats.misses) == (plain.stats.hits, plain.stats.misses)
    assert guessed.stats.bytes_h2d - plain.stats.bytes_h2d == LAYOUT.record_bytes
    assert guessed.stats.prefetch_used == 0


def test_correlation_prefetcher_learns_a_transition():
    rng = np.random.default_rng(0)
    e, k = 16, 2
    prefetcher = CorrelationPrefetcher(num_layers=2, num_experts=e, threshold=0.5)
    for _ in range(50):  # layer 1 routes each token to (a + 1) mod E for each of its a
        ids0 = np.stack([rng.choice(e, k, replace=False) for _ in range(4)])
        prefetcher.observe(0, ids0)
        prefetcher.observe(1, (ids0 + 1) % e)
    ids0 = np.array([[3, 9], [3, 4]])
    assert sorted(prefetcher.predict(0, ids0, max_experts=8)) == [4, 5, 10]
    assert len(prefetcher.predict(0, ids0, max_experts=2)) == 2
    assert prefetcher.predict(1, ids0, max_experts=8) == []  # no layer after the last


def test_prediction_stays_finite_after_long_decay():
    prefetcher = CorrelationPrefetcher(num_layers=2, num_experts=8, decay=0.5)
    ids = np.array([[0, 1]])
    for _ in range(2000):  # counts of rows never seen decay far below any float
        prefetcher.observe(0, ids)
        prefetcher.observe(1, ids)
    with np.errstate(all="raise"):
        assert prefetcher.predict(0, np.array([[5, 6]]), max_experts=4) == []
    assert prefetcher.predict(0, ids, max_experts=4) == [0, 1]


def _two_way_prefetcher() -> CorrelationPrefetcher:
    """Layer 0's expert 0 leads to experts 1 or 2 of layer 1, half the time each."""
    prefetcher = CorrelationPrefetcher(num_layers=2, num_experts=8, decay=1.0)
    for b in (1, 2):  # a hundred tokens each
        prefetcher.observe(0, np.full((100, 1), 0))
        prefetcher.observe(1, np.full((100, 1), b))
    return prefetcher


def test_a_guess_must_beat_the_expert_it_displaces():
    prefetcher, ids = _two_way_prefetcher(), np.array([[0], [0]])  # two tokens: chance 0.75
    # the layer's residents are unlikely (chance ~0): both guesses displace them
    assert prefetcher.predict(0, ids, 8, resident=[3, 4], free_slots=0) == [1, 2]
    # expert 1 is resident and as likely as guess 2 (0.75 < 0.75 + margin): no swap
    assert prefetcher.predict(0, ids, 8, resident=[1], free_slots=0) == []
    # a free slot displaces nothing
    assert prefetcher.predict(0, ids, 8, resident=[1], free_slots=1) == [2]
    assert prefetcher.predict(0, ids, 8, resident=[1, 3], free_slots=0) == [2]


def test_no_prefetch_where_a_big_batch_uses_every_expert():
    """Uniform routing, 64 tokens x top-8 of 128: every expert is used with chance ~0.98, so
    swapping a resident for a guess gains nothing (seen on the H200: 376k prefetches, 98%
    used, hit rate unchanged, 32% more bytes)."""
    rng = np.random.default_rng(0)
    prefetcher = CorrelationPrefetcher(num_layers=2, num_experts=128)
    for _ in range(20):
        for layer in (0, 1):
            prefetcher.observe(layer, np.stack([rng.permutation(128)[:8] for _ in range(64)]))
    ids = np.stack([rng.permutation(128)[:8] for _ in range(64)])
    assert len(prefetcher.predict(0, ids, 32)) == 32  # confident guesses, all of them
    assert prefetcher.predict(0, ids, 32, resident=range(32), free_slots=0) == []


def test_policies_take_summed_uses_of_unseen_steps():
    lru = LRUPolicy(8)
    for e in (0, 1, 2, 3):
        lru.insert(e)
    lru.observe_counts(np.array([3, 0, 1, 0, 5, 0, 0, 0]), steps=4)  # 4 is not resident
    assert lru.candidates(set()) == [1, 3, 2, 0]  # unused first, the most used last
    lfu = LFUPolicy(8, decay=0.5)
    lfu.observe([0])
    lfu.observe_counts(np.array([0, 2, 0, 0, 0, 0, 0, 0]), steps=2)
    # expert 0: 1 x 0.5^2; expert 1: 2 uses x mean weight (1 - 0.25) / (2 x 0.5)
    np.testing.assert_allclose(lfu._score[:2], [0.25, 1.5])


def test_a_prefill_is_learned_and_predicted_from_a_sample_as_from_all_its_tokens(monkeypatch):
    import vllm_moe_offload.prefetch as prefetch
    rng = np.random.default_rng(0)
    tokens = 3000  # > MAX_TOKENS: the sampled path
    # half of the tokens route to 0..3 and then, each with chance 0.1, to 8..11; the rest
    # spread over 16..31 and then 32..63
    first = np.where(rng.random((tokens, 1)) < 0.5, np.arange(4), rng.integers(16, 32, (tokens, 4)))
    second = np.where((first < 4) & (rng.random((tokens, 4)) < 0.1), first + 8,
                      rng.integers(32, 64, (tokens, 4)))
    # 5% of a batch routes to 0..3: each of those tokens uses 8 with chance 0.1, so the batch
    # (~150 of them) surely does, while the ~13 of them in a sample of 256 would use it only
    # with chance 1 - 0.9^13 = 0.75, under the 0.95 threshold, were they not scaled to T
    batch = np.where(rng.random((tokens, 1)) < 0.05, np.arange(4), 16)

    def learn(max_tokens):
        monkeypatch.setattr(prefetch, "MAX_TOKENS", max_tokens)
        p = CorrelationPrefetcher(num_layers=2, num_experts=64, threshold=0.95)
        p.observe(0, first)
        p.observe(1, second)
        return p
    sample = prefetch.MAX_TOKENS
    learned = learn(sample).transitions(0)
    p = learn(tokens)
    assert learned.sum() == sample * 4 * 4  # K x K pairs of each sampled token
    # rows 0..3 (half of the tokens): from all tokens and from the sample, 10% of their pairs
    # go to 8..11 and the rest to 32..63 (the sample's ~512 pairs a row: sd 0.013)
    for table in (learned, p.transitions(0)):
        share = table[:4, 8:12].sum(1) / table[:4].sum(1)
        assert np.allclose(share, 0.1, atol=0.04), share
        assert np.allclose(table[:4, 32:].sum(1) / table[:4].sum(1), 1 - share)
    exact = p.predict(0, batch, max_experts=64)
    monkeypatch.setattr(prefetch, "MAX_TOKENS", sample)
    sampled = p.predict(0, batch, max_experts=64)
    assert set(exact) == set(range(8, 12)) | set(range(32, 64))
    assert sorted(sampled) == sorted(exact)
