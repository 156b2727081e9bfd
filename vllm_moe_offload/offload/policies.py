"""Eviction rules of one layer's share of the expert cache.

`DirectoryModel` is the rule the cache runs (on the device, kernels/directory.py), written as a
plain sequential host model: what tests check the kernels against, and what
benchmarks/cache_sim.py replays. The classes below it are the host policies the cache ran
before its directory moved to the device, kept for the simulator's comparison (the device rule
must stay within a point of LFU's hit rate on the real trace and the calibrated generator).

A policy sees the layer's resident experts (`insert`, `remove`), every use of one (`touch`),
the set each step routes to (`observe`), and picks a `victim` outside a protected set.

- `lru`: least recently used first.
- `lfu`: least frequently used, with exponential decay per layer step so that old popularity
  fades (half-life of about 70 steps at decay 0.99); ties go to the least recently used.
"""

from collections import Counter, OrderedDict

import numpy as np

from vllm_moe_offload.offload.kernels.directory import DECAY_SHIFT, ONE


class DirectoryModel:
    """One layer's directory and its rule, step by step (kernels/directory.py runs the same
    on the device): experts 0..Q-1 start in the layer's Q slots; each step ages every score
    (score -= score >> DECAY_SHIFT) and adds ONE to the routed experts'; the misses, most
    pairs first, take the slots of the residents the step does not route to, lowest (score,
    last use, id) first; misses beyond those are read in place."""

    def __init__(self, num_experts: int, slots: list[int]):
        self.slot = {e: s for e, s in enumerate(slots)}  # expert -> slot
        self.score = [0] * num_experts
        self.last = [0] * num_experts
        self.clock = 0

    def step(self, ids) -> tuple[list[tuple[int, int]], list[int], list[int]]:
        """ids: the step's expert ids (any iterable). Returns (fills as (expert, slot) in
        order, misses read in place, hits)."""
        count = Counter(int(e) for e in np.asarray(ids).reshape(-1))
        for e in range(len(self.score)):
            self.score[e] -= self.score[e] >> DECAY_SHIFT
            if count[e]:
                self.score[e] += ONE
                self.last[e] = self.clock
        self.clock += 1
        hits = sorted(e for e in count if e in self.slot)
        misses = sorted((e for e in count if e not in self.slot), key=lambda e: (-count[e], e))
        victims = sorted((e for e in self.slot if e not in count),
                         key=lambda e: (self.score[e], self.last[e], e))
        fills = []
        for expert, victim in zip(misses, victims, strict=False):
            fills.append((expert, self.slot.pop(victim)))
            self.slot[expert] = fills[-1][1]
        return fills, misses[len(fills):], hits


class LRUPolicy:
    """Evicts the layer's least recently used resident expert."""

    def __init__(self, num_experts: int) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()  # oldest first

    def insert(self, expert: int) -> None:
        self._order[expert] = None

    def touch(self, expert: int) -> None:
        self._order.move_to_end(expert)

    def remove(self, expert: int) -> None:
        del self._order[expert]

    def observe(self, experts: list[int]) -> None:
        """The experts one layer step routes to (before any insert or touch of that step)."""

    def candidates(self, protected: set[int]) -> list[int]:
        """Evictable residents, least recently used first."""
        return [e for e in self._order if e not in protected]

    def victim(self, protected: set[int]) -> int:
        candidates = self.candidates(protected)
        if not candidates:
            raise RuntimeError("expert offload: every resident expert is in use by this pass")
        return self._choose(candidates)

    def _choose(self, candidates: list[int]) -> int:
        return candidates[0]


class LFUPolicy(LRUPolicy):
    def __init__(self, num_experts: int, decay: float = 0.99) -> None:
        super().__init__(num_experts)
        self.decay = decay
        self._score = np.zeros(num_experts)  # decayed use counts

    def observe(self, experts: list[int]) -> None:
        self._score *= self.decay
        self._score[experts] += 1.0

    def _choose(self, candidates: list[int]) -> int:
        scores = self._score[candidates]
        return candidates[int(np.argmin(scores))]  # argmin keeps the first (LRU) on ties


POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy}
