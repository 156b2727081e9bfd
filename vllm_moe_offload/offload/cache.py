"""`ExpertCache`: one pool of device slots shared by all MoE layers, filled from the
`ExpertStore`, with its directory on the device.

Decode visits layers 0..L-1 in the same order every step, so a single LRU over all layers is a
cyclic scan larger than the pool and would hit almost never once a step needs more experts than
fit. Each layer therefore owns a fixed quota of the pool's slots (an even split), and its rule
decides only among its own residents: the hit rate never falls below the share of experts a
layer keeps resident.

A layer whose quota holds all its experts is loaded once (`preload`) and never changes. Every
other layer keeps a directory on the device (kernels/directory.py: expert -> slot, integer LFU
scores, last use), updated by one kernel per layer step without a host sync, so the step runs
inside CUDA graphs: the misses take the slots of the residents the step does not route to
(`update`, then `fill` copies them from the pinned store on the device), and misses beyond
those are read in place from host memory. Its slots start holding experts 0..Q-1, so every
slot always holds an expert.

Steps of many tokens (prefill) use the same update, then stage the misses the update could not
place through `staging` slots after the quotas (`stage`, on the copy engine, in passes), so
that each crosses PCIe once rather than once per block of tokens.

Example:
    cache = ExpertCache(store, num_slots=96, device="cuda")
    cache.preload()
    maps = cache.update(layer, topk_ids)   # [E] pass maps: hits, then fills and reads
    cache.fill(layer)                      # on the copy stream (see step.py)
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from vllm_moe_offload.offload.kernels import directory, fill
from vllm_moe_offload.offload.kernels.directory import COUNTERS
from vllm_moe_offload.offload.kernels.usage import count_routing
from vllm_moe_offload.offload.stats import OffloadStats, RoutingLog
from vllm_moe_offload.offload.store import ExpertStore
from vllm_moe_offload.offload.transfer import HostCopy, SlotMaps, Transfers


def layer_quotas(num_slots: int, num_layers: int, num_experts: int) -> list[int]:
    """Even split of the pool; a layer never gets more slots than it has experts."""
    base, extra = divmod(num_slots, num_layers)
    return [min(num_experts, base + (i < extra)) for i in range(num_layers)]


@dataclass
class StepMaps:
    """A layer step's pass maps ([E] int32, device): `first` places the hits in their slots;
    `second` the filled experts in theirs and marks the misses left over HOST."""

    first: torch.Tensor
    second: torch.Tensor


class Directory:
    """The device tensors of kernels/directory.py: per layer rows of slot, score, last, clock;
    one step's outputs (fill list, pass maps), reused by every layer step in turn."""

    def __init__(self, num_layers: int, num_experts: int, device: torch.device | str):
        def i32(*shape, value=0):
            return torch.full(shape, value, dtype=torch.int32, device=device)
        self.slot = i32(num_layers, num_experts, value=-1)
        self.score, self.last = i32(num_layers, num_experts), i32(num_layers, num_experts)
        self.clock = i32(num_layers, 1)
        self.fill_expert, self.fill_slot = i32(num_experts), i32(num_experts)
        self.num_fills = i32(1)
        self.first, self.second = i32(num_experts), i32(num_experts)


class DeviceCounters:
    """Per MoE layer: routed (token, k) pairs per expert and the COUNTERS of
    kernels/directory.py, in host memory (pinned with CUDA: the kernels add to them through
    their device addresses; readers never call into CUDA, so the stats thread cannot disturb a
    graph capture)."""

    def __init__(self, num_layers: int, num_experts: int, pin: bool):
        # explicitly on the host: vLLM builds the model under a CUDA default device
        host = dict(dtype=torch.int64, device="cpu", pin_memory=pin)
        self.routed = torch.zeros(num_layers, num_experts, **host)
        self.counts = torch.zeros(num_layers, len(COUNTERS), **host)

    def totals(self) -> dict[str, int]:
        return dict(zip(COUNTERS, self.counts.numpy().sum(axis=0).tolist(), strict=True))


class ExpertCache:
    def __init__(self, store: ExpertStore, num_slots: int, device: torch.device | str = "cpu",
                 log_steps: int = 0):
        """num_slots: the quotas' slots, summed over layers (the staging slots come on top).
        log_steps: keep the expert ids of this many eager layer steps (`routing_log`)."""
        self.store = store
        num_layers, num_experts = store.num_layers, store.num_experts
        self.quotas = layer_quotas(num_slots, num_layers, num_experts)
        self.starts = [sum(self.quotas[:i]) for i in range(num_layers)]
        self.num_slots = sum(self.quotas)
        fetching = [q for q in self.quotas if q < num_experts]
        self.staging = max(fetching, default=0)  # slots after the quotas, for large steps
        # [S, record_bytes]: the GPU expert cache, every slot one expert record
        self.pool = torch.empty(self.num_slots + self.staging, store.layout.record_bytes,
                                dtype=torch.uint8, device=device)
        self.weights = store.layout.views(self.pool)  # typed views [S, ...] for the kernels
        self.transfers = Transfers(device)
        self.directory = Directory(num_layers, num_experts, device)
        self.counters = DeviceCounters(num_layers, num_experts, pin=self.transfers.is_cuda)
        self.maps = SlotMaps(num_experts, -(-num_experts // max(self.staging, 1)), device)
        self.second_map = HostCopy(num_experts, device)  # a staged step's one host read
        self.stats = OffloadStats()  # what the host sees: staged steps, their stall, preloads
        self.routing_log = RoutingLog(log_steps) if log_steps else None
        # tensor parallelism: a function telling whether a tensor is the same on every rank
        # (each rank caches its shard of the experts, and all must hold the same experts)
        self.check_ranks_agree: Callable[[torch.Tensor], bool] | None = None
        self._preloaded = False
        cuda = self.transfers.is_cuda
        self._update = directory.update if cuda else directory.update_torch
        self._fill = fill.fill if cuda else fill.fill_torch

    @property
    def slot_bytes(self) -> int:
        return self.store.layout.record_bytes

    def is_resident(self, layer: int) -> bool:
        """The layer's quota holds all its experts: after `preload` it never changes."""
        return self.quotas[layer] == self.store.num_experts

    @property
    def resident_layers(self) -> list[int]:
        return [layer for layer in range(len(self.quotas)) if self.is_resident(layer)]

    def preload(self) -> None:
        """After the store is (re)filled: copies experts 0..Q-1 of every layer into its Q slots
        (all of a resident layer's) and resets every directory; waits for the copies."""
        d = self.directory
        d.slot.fill_(-1)
        for t in (d.score, d.last, d.clock):
            t.zero_()
        for layer, (start, quota) in enumerate(zip(self.starts, self.quotas, strict=True)):
            slots = torch.arange(start, start + quota, dtype=torch.int32, device="cpu")
            self.transfers.copy(self.pool[start:start + quota], self.store.records[layer][:quota])
            d.slot[layer, :quota] = slots.to(d.slot.device)
            if self.is_resident(layer):
                self.stats.preloaded += quota
        self.transfers.synchronize()
        self.transfers.synchronize_compute()
        self._preloaded = True

    def layer_map(self, layer: int) -> torch.Tensor:
        """The layer's expert -> slot row ([E] int32, device): a resident layer's pass map."""
        self._check_loaded()
        return self.directory.slot[layer]

    def update(self, layer: int, topk_ids: torch.Tensor) -> StepMaps:
        """One layer step's directory update (on the device, no host sync), its counters
        included; the fills it chose wait for `fill`."""
        self._check_loaded()
        d = self.directory
        self._update(topk_ids, d.slot[layer], d.score[layer], d.last[layer], d.clock[layer],
                     d.fill_expert, d.fill_slot, d.num_fills, d.first, d.second,
                     self.counters.routed[layer], self.counters.counts[layer])
        return StepMaps(d.first, d.second)

    def fill(self, layer: int) -> None:
        """Copies the experts of the last `update` (of `layer`) into their slots, on the
        current stream, from the device's view of the fill list."""
        d = self.directory
        self._fill(self.store.records[layer], self.pool, d.fill_expert, d.fill_slot,
                   d.num_fills)

    def stage(self, layer: int, experts: list[int], after: "torch.cuda.Event | None"
              ) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
        """Copies `experts` (at most `staging`) into the staging slots on the copy stream,
        once the compute stream has passed `after` (its last pass reading them). Returns the
        pass map placing them there and the event its kernels wait for."""
        assert len(experts) <= self.staging, (len(experts), self.staging)
        self.transfers.copy_after(after)
        slots = list(range(self.num_slots, self.num_slots + len(experts)))
        for expert, slot in zip(experts, slots, strict=True):
            self.transfers.copy(self.pool[slot], self.store.record(layer, expert))
        return self.maps.upload(experts, slots), self.transfers.mark_copied()

    def count_resident(self, layer: int, topk_ids: torch.Tensor) -> None:
        """A resident layer's step: routed pairs, hits (every routed expert) and the step, on
        the device, into the counters."""
        count_routing(topk_ids, self.counters.routed[layer], self.counters.counts[layer])

    def verify_ranks(self) -> None:
        """With tensor parallelism: every rank's directory must be the same (same routing, same
        rule); eager steps check it, since a rank that decided otherwise would compute another
        shard set than its peers and their sum would be wrong."""
        if self.check_ranks_agree is not None and not self.check_ranks_agree(
                self.directory.slot):
            raise RuntimeError("expert offload: the tensor-parallel ranks' expert caches "
                               "disagree (their routing differed); please report this")

    def _check_loaded(self) -> None:
        if not self._preloaded:
            raise RuntimeError("expert offload: a layer step ran before the experts were "
                               "loaded through load_weights (use a safetensors or dummy load "
                               "format)")

    def snapshot(self) -> OffloadStats:
        """The counters: the device's (read from host memory, without a CUDA call) and the
        host's. Bytes: one record per fill and per miss read without a slot (a lower bound
        for reads in place: a block of pairs reads its expert once)."""
        c = self.counters.totals()
        return replace(self.stats, hits=c["hits"], misses=c["misses"], fills=c["fills"],
                       reads=c["reads"], evictions=c["evictions"], layer_steps=c["steps"],
                       bytes_h2d=(c["fills"] + c["reads"]) * self.slot_bytes)

    @property
    def slots_in_use(self) -> int:
        """Every quota slot holds an expert once the experts are loaded."""
        return self.num_slots if self._preloaded else 0

    def owners(self) -> dict[int, tuple[int, int]]:
        """slot -> (layer, expert) of every quota slot (reads the device; checks, tests)."""
        slot = self.directory.slot.cpu().numpy()
        layers, experts = np.nonzero(slot >= 0)
        return {int(slot[la, e]): (int(la), int(e)) for la, e in zip(layers, experts,
                                                                     strict=True)}
