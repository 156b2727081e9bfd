"""`ExpertCache`: one pool of device slots shared by all MoE layers, filled from the `ExpertStore`.

Decode visits layers 0..L-1 in the same order every step, so a single LRU over all layers is a
cyclic scan larger than the pool and would hit almost never once a step needs more experts than
fit. Each layer therefore owns a fixed quota of the pool's slots (an even split), and its
eviction policy decides only among its own residents: the hit rate never falls below the
share of experts a layer keeps resident.

Eviction policies live in `policies.py`. A step's routed experts are fetched hot-first
(already-resident experts form the first pass), and a step that routes to more experts than
a layer's quota (a long prefill) is computed in several passes of at most `quota` experts
each. Experts of the current pass are never evicted. `prefetch` loads a layer's predicted
experts before its step (see prefetch.py).

Example:
    cache = ExpertCache(store, num_slots=96, policy="lru", device="cuda")
    for group in cache.schedule(layer, experts):
        slots = cache.fetch(layer, group)   # slot ids, in `group` order
"""

import torch

from vllm_moe_offload.policies import POLICIES
from vllm_moe_offload.stats import OffloadStats
from vllm_moe_offload.store import ExpertStore


def layer_quotas(num_slots: int, num_layers: int, num_experts: int) -> list[int]:
    """Even split of the pool; a layer never gets more slots than it has experts."""
    base, extra = divmod(num_slots, num_layers)
    return [min(num_experts, base + (i < extra)) for i in range(num_layers)]


class ExpertCache:
    def __init__(self, store: ExpertStore, num_slots: int, policy: str = "lru",
                 device: torch.device | str = "cpu"):
        if policy not in POLICIES:
            raise ValueError(f"expert offload: unknown policy {policy!r}; choose one of "
                             f"{', '.join(POLICIES)}")
        self.store = store
        self.quotas = layer_quotas(num_slots, store.num_layers, store.num_experts)
        starts = [sum(self.quotas[:i]) for i in range(store.num_layers)]
        self.num_slots = sum(self.quotas)
        layout = store.layout
        # [S, record_bytes]: the GPU expert cache, every slot one expert record
        self.pool = torch.empty(self.num_slots, layout.record_bytes, dtype=torch.uint8,
                                device=device)
        self.weights = layout.views(self.pool)  # typed views [S, ...] for the kernels
        self._free = [list(range(s + q - 1, s - 1, -1))
                      for s, q in zip(starts, self.quotas, strict=True)]
        self._slot_of: list[dict[int, int]] = [{} for _ in self.quotas]
        self._owner: dict[int, tuple[int, int]] = {}  # slot -> (layer, expert)
        self._policy = [POLICIES[policy](store.num_experts) for _ in self.quotas]
        self._prefetched: list[set[int]] = [set() for _ in self.quotas]  # not yet resolved
        self.stats = OffloadStats()

    @property
    def slot_bytes(self) -> int:
        return self.store.layout.record_bytes

    def resident(self, layer: int) -> dict[int, int]:
        """expert -> slot for `layer` (a copy)."""
        return dict(self._slot_of[layer])

    def schedule(self, layer: int, experts: list[int]) -> list[list[int]]:
        """Called once per layer step with all its experts: resolves that layer's prefetches,
        tells the policy, and splits the experts into passes, resident ones first, at most
        `quota` each."""
        used = self._prefetched[layer].intersection(experts)
        self.stats.prefetch_used += len(used)
        self._prefetched[layer].clear()
        self._policy[layer].observe(experts)
        slot_of = self._slot_of[layer]
        ordered = [e for e in experts if e in slot_of] + [e for e in experts if e not in slot_of]
        q = self.quotas[layer]
        return [ordered[i:i + q] for i in range(0, len(ordered), q)]

    def fetch(self, layer: int, experts: list[int]) -> list[int]:
        """Makes `experts` (distinct, at most the layer's quota) resident; returns their slots."""
        assert len(experts) <= self.quotas[layer], (len(experts), self.quotas[layer])
        slot_of, policy = self._slot_of[layer], self._policy[layer]
        protected = set(experts)
        for e in experts:
            if e in slot_of:
                self.stats.hits += 1
                policy.touch(e)
            else:
                self._load(layer, e, self._take_slot(layer, protected))
                self.stats.misses += 1
        return [slot_of[e] for e in experts]

    def prefetch(self, layer: int, experts: list[int]) -> int:
        """Loads predicted experts of `layer` ahead of its step; returns how many were loaded.

        A prefetched expert stays protected from other prefetches until the layer's step
        resolves it (`schedule`); it may evict only the policy's victim among the rest, so a
        wrong prediction costs its own bytes and, at worst, that victim.
        """
        pending = self._prefetched[layer]
        loaded = 0
        for e in experts:
            if e in self._slot_of[layer] or len(pending) >= self.quotas[layer]:
                continue
            self._load(layer, e, self._take_slot(layer, pending | {e}))
            pending.add(e)
            self.stats.prefetches += 1
            loaded += 1
        return loaded

    def _take_slot(self, layer: int, protected: set[int]) -> int:
        if self._free[layer]:
            return self._free[layer].pop()
        victim = self._policy[layer].victim(protected)
        self._policy[layer].remove(victim)
        slot = self._slot_of[layer].pop(victim)
        del self._owner[slot]
        self.stats.evictions += 1
        return slot

    def _load(self, layer: int, expert: int, slot: int) -> None:
        # Pinned source: an asynchronous copy, ordered before the kernels on the same stream.
        self.pool[slot].copy_(self.store.record(layer, expert), non_blocking=True)
        self._slot_of[layer][expert] = slot
        self._owner[slot] = (layer, expert)
        self._policy[layer].insert(expert)
        self.stats.bytes_h2d += self.slot_bytes

    def owners(self) -> dict[int, tuple[int, int]]:
        """slot -> (layer, expert) of every occupied slot (a copy), for checks and metrics."""
        return dict(self._owner)
