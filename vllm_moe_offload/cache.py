"""`ExpertCache`: one pool of device slots shared by all MoE layers, filled from the `ExpertStore`.

Decode visits layers 0..L-1 in the same order every step, so a single LRU over all layers is a
cyclic scan larger than the pool and would hit almost never once a step needs more experts than
fit. Each layer therefore owns a fixed quota of the pool's slots (an even split), and its
eviction policy decides only among its own residents: the hit rate never falls below the
share of experts a layer keeps resident.

Eviction policies live in `policies.py`. A step's routed experts are computed hot-first:
the resident ones form the first pass, which runs while the missing ones are copied (on the
copy stream of `transfer.py`); missing experts follow in passes of at most `quota` experts
(several when a long prefill routes to more experts than the quota). Experts of the current
pass are never evicted. `prefetch` loads a layer's predicted experts before its step (see
prefetch.py). A layer whose quota holds all its experts is loaded once (`preload`) and never
syncs again: `layer.py` runs it inside CUDA graphs.

Example:
    cache = ExpertCache(store, num_slots=96, policy="lru", device="cuda")
    for group in cache.schedule(layer, experts):
        slots = cache.fetch(layer, group)   # slot ids, in `group` order; copies queued
        ready = cache.take_ready(layer)     # event the pass's kernels wait on (CUDA)
"""

from collections.abc import Collection
from dataclasses import replace

import numpy as np
import torch

from vllm_moe_offload.policies import POLICIES
from vllm_moe_offload.stats import OffloadStats, RoutingCounters, RoutingLog
from vllm_moe_offload.store import ExpertStore
from vllm_moe_offload.transfer import SlotMaps, Transfers


def layer_quotas(num_slots: int, num_layers: int, num_experts: int) -> list[int]:
    """Even split of the pool; a layer never gets more slots than it has experts."""
    base, extra = divmod(num_slots, num_layers)
    return [min(num_experts, base + (i < extra)) for i in range(num_layers)]


class ExpertCache:
    def __init__(self, store: ExpertStore, num_slots: int, policy: str = "lru",
                 device: torch.device | str = "cpu", graph_decode: bool = False,
                 log_steps: int = 0):
        """graph_decode: decode steps of fetching layers run as graph steps (zero-copy), which
        read the maps `publish_map` uploads; without it only preloaded layers read theirs.
        log_steps: keep the expert ids of this many eager layer steps (`routing_log`)."""
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
        self._ready: list[torch.cuda.Event | None] = [None] * len(self.quotas)
        self._readers: dict[int, torch.cuda.Event] = {}  # slot -> pass of this step reading it
        self.transfers = Transfers(device)
        self.maps = SlotMaps(store.num_experts, store.num_experts + 1, device)
        self.resident_layers = [i for i, q in enumerate(self.quotas) if q == store.num_experts]
        self._preloaded = False
        # expert -> slot of every layer (-1: none), for the steps that run in CUDA graphs and
        # read it on the device: staged in pinned rows, uploaded after each host-synced step
        shape = (store.num_layers, store.num_experts)
        self._maps_host = torch.full(shape, -1, dtype=torch.int32, device="cpu",
                                     pin_memory=self.transfers.is_cuda)
        self.layer_maps = self._maps_host.to(device, copy=True)
        self._maps_dirty = [False] * store.num_layers
        self.graph_decode = graph_decode
        self.stats = OffloadStats()
        self.routing = RoutingCounters(store.num_layers, store.num_experts,
                                       pin=self.transfers.is_cuda)
        self.routing_log = RoutingLog(log_steps) if log_steps else None
        # per layer: the device lookups and steps already told to the policy
        self._graph_seen = [(np.zeros(store.num_experts, dtype=np.int64), 0)
                            for _ in range(store.num_layers)]

    @property
    def slot_bytes(self) -> int:
        return self.store.layout.record_bytes

    def resident(self, layer: int) -> dict[int, int]:
        """expert -> slot for `layer` (a copy)."""
        return dict(self._slot_of[layer])

    def resident_experts(self, layer: int) -> Collection[int]:
        """The experts `layer` holds (a live view: read it before the cache changes)."""
        return self._slot_of[layer].keys()

    def free_slots(self, layer: int) -> int:
        return len(self._free[layer])

    def schedule(self, layer: int, experts: list[int]) -> list[list[int]]:
        """Called once per layer step with all its experts, after the step's host sync:
        resolves that layer's prefetches, tells the policy, and splits the experts into
        passes: the resident ones first, then the missing ones, at most `quota` each."""
        used = self._prefetched[layer].intersection(experts)
        self.stats.prefetch_used += len(used)
        self._prefetched[layer].clear()
        self._observe_graph_steps(layer)
        self._policy[layer].observe(experts)
        self._readers.clear()
        self.maps.new_step()
        slot_of = self._slot_of[layer]
        hits = [e for e in experts if e in slot_of]
        misses = [e for e in experts if e not in slot_of]
        q = self.quotas[layer]
        return ([hits] if hits else []) + [misses[i:i + q] for i in range(0, len(misses), q)]

    def _observe_graph_steps(self, layer: int) -> None:
        """Tells the policy what the layer's steps inside CUDA graphs (zero-copy decode) used
        since its last host-synced step; the step's host sync has completed them."""
        lookups = self.routing.device_lookups.numpy()[layer].copy()
        steps = int(self.routing.device_steps.numpy()[layer])
        seen_lookups, seen_steps = self._graph_seen[layer]
        if steps > seen_steps:
            self._policy[layer].observe_counts(lookups - seen_lookups, steps - seen_steps)
            self._graph_seen[layer] = (lookups, steps)

    def fetch(self, layer: int, experts: list[int], keep: frozenset[int] = frozenset()
              ) -> list[int]:
        """Makes `experts` (distinct, at most the layer's quota) resident; returns their slots.
        keep: residents not to evict either (see `fits_beside`)."""
        assert len(experts) <= self.quotas[layer], (len(experts), self.quotas[layer])
        slot_of, policy = self._slot_of[layer], self._policy[layer]
        protected = set(experts) | keep
        for e in experts:
            if e in slot_of:
                self.stats.hits += 1
                policy.touch(e)
            else:
                self._load(layer, e, self._take_slot(layer, protected))
                self.stats.misses += 1
                self.stats.bytes_h2d += self.slot_bytes
        self._mark_ready(layer)
        return [slot_of[e] for e in experts]

    def fits_beside(self, layer: int, experts: list[int], keep: list[int]) -> bool:
        """Whether `experts` can be made resident without evicting `keep` (a pass still to be
        computed): then their copies can start before that pass is queued."""
        slot_of = self._slot_of[layer]
        missing = sum(e not in slot_of for e in experts)
        pinned = sum(e in slot_of for e in set(keep).union(experts))
        return missing <= self.quotas[layer] - pinned

    def fetch_pass(self, layer: int, experts: list[int], keep: list[int] = ()
                   ) -> tuple[list[int], "torch.cuda.Event | None"]:
        """`fetch` for one compute pass: (slots, the event its kernels must wait for: after
        its own copies, or after earlier copies into the layer, e.g. prefetches)."""
        earlier = self.take_ready(layer)
        slots = self.fetch(layer, experts, frozenset(keep))
        return slots, self.take_ready(layer) or earlier

    def take_ready(self, layer: int) -> "torch.cuda.Event | None":
        """The event after the latest copies into `layer`'s slots not yet waited for (CUDA),
        else None. The caller's compute stream waits on it before reading the slots."""
        event, self._ready[layer] = self._ready[layer], None
        return event

    def computed(self, slots: list[int], event: "torch.cuda.Event | None") -> None:
        """`slots` are read by compute queued before `event`: a copy into one of them later in
        this step waits for it."""
        if event is not None:
            self._readers.update(dict.fromkeys(slots, event))

    def _mark_ready(self, layer: int) -> None:
        event = self.transfers.mark_copied()
        if event is not None:
            self._ready[layer] = event

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
            self.stats.bytes_h2d += self.slot_bytes
            loaded += 1
        self._mark_ready(layer)
        return loaded

    def _take_slot(self, layer: int, protected: set[int]) -> int:
        if self._free[layer]:
            return self._free[layer].pop()
        slot = self._drop(layer, self._policy[layer].victim(protected))
        self.stats.evictions += 1
        self.transfers.copy_after(self._readers.pop(slot, None))
        return slot

    def _drop(self, layer: int, expert: int) -> int:
        """Forgets a resident expert; returns its slot."""
        self._policy[layer].remove(expert)
        self._prefetched[layer].discard(expert)
        slot = self._slot_of[layer].pop(expert)
        del self._owner[slot]
        self._maps_host.numpy()[layer, expert] = -1
        self._maps_dirty[layer] = True
        return slot

    def _load(self, layer: int, expert: int, slot: int) -> None:
        self.transfers.copy(self.pool[slot], self.store.record(layer, expert))
        self._slot_of[layer][expert] = slot
        self._owner[slot] = (layer, expert)
        self._policy[layer].insert(expert)
        self._maps_host.numpy()[layer, expert] = slot
        self._maps_dirty[layer] = True

    def is_resident(self, layer: int) -> bool:
        """The layer's quota holds all its experts: after `preload` it never fetches."""
        return self.quotas[layer] == self.store.num_experts

    def preload(self) -> None:
        """After the store is (re)filled: copies every expert of the layers that hold all
        theirs, builds their device slot maps, and empties the other layers' slots (a weight
        reload would leave them stale); waits for the copies."""
        experts = list(range(self.store.num_experts))
        for layer in range(len(self.quotas)):
            if not self.is_resident(layer):
                for e in list(self._slot_of[layer]):
                    self._free[layer].append(self._drop(layer, e))
                continue
            for e in experts:
                slot = self._slot_of[layer].get(e)
                if slot is None:
                    slot = self._take_slot(layer, set(experts))
                    self._load(layer, e, slot)
                else:
                    self.transfers.copy(self.pool[slot], self.store.record(layer, e))
            self.stats.preloaded += len(experts)
        self.transfers.synchronize()
        for layer in range(len(self.quotas)):
            self._upload_map(layer)
        self.transfers.synchronize_compute()
        self._preloaded = True

    def publish_map(self, layer: int) -> None:
        """Uploads the layer's expert->slot map for the device-side steps, if it changed, on
        the compute stream: call after the compute stream has waited for the copies it
        describes (a host-synced step's end). Its pinned row is rewritten only after a later
        host sync (this layer's step, or the previous layer's prefetch), when this upload has
        completed. Without graph decode nothing reads these maps: no upload."""
        if self.graph_decode:
            self._upload_map(layer)

    def _upload_map(self, layer: int) -> None:
        if self._maps_dirty[layer]:
            self.layer_maps[layer].copy_(self._maps_host[layer], non_blocking=True)
            self._maps_dirty[layer] = False

    def device_map(self, layer: int) -> tuple[list[int], list[int], torch.Tensor]:
        """(resident experts, their slots, the layer's [E] int32 expert->slot map on the
        device) for a step that runs without a host sync: the lists for the CPU reference,
        the map for the kernels (it changes only between such steps, in place)."""
        if not self._preloaded:
            raise RuntimeError("expert offload: a layer step ran before the experts were "
                               "loaded through load_weights (use a safetensors or dummy load "
                               "format)")
        slot_map = self.layer_maps[layer]
        if not slot_map.is_cuda:  # the CPU reference reads the published map too
            experts = (slot_map >= 0).nonzero().flatten().tolist()
            return experts, slot_map[experts].tolist(), slot_map
        resident = self._slot_of[layer]  # unread on CUDA: the kernels take the map
        return list(resident), list(resident.values()), slot_map

    def snapshot(self) -> OffloadStats:
        """The counters, with the steps counted on the device (CUDA graphs) folded in: their
        misses read the expert from host memory, counted as one record each (a lower bound:
        a zero-copy expert with more pairs than a block is read once per block of pairs).
        Reads host memory only."""
        lookups, misses, steps = self.routing.device_totals()
        s = self.stats
        return replace(s, hits=s.hits + lookups - misses, misses=s.misses + misses,
                       bytes_h2d=s.bytes_h2d + misses * self.slot_bytes,
                       layer_steps=s.layer_steps + steps)

    @property
    def slots_in_use(self) -> int:
        return len(self._owner)

    def owners(self) -> dict[int, tuple[int, int]]:
        """slot -> (layer, expert) of every occupied slot (a copy), for checks and metrics."""
        return dict(self._owner)
