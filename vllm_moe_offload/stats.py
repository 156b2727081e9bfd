"""`OffloadStats`: the counters every fetch decision updates, and `RoutingCounters`: how often
each layer routes to each expert. Everything reported reads these."""

from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass
class OffloadStats:
    hits: int = 0  # expert needed by a layer's step and already in a slot
    misses: int = 0  # expert fetched from host memory (one record each)
    evictions: int = 0  # resident expert dropped to make room
    bytes_h2d: int = 0  # host->device bytes moved, (misses + prefetches) x record size
    layer_steps: int = 0  # MoE layer forwards
    passes: int = 0  # compute passes: more than layer_steps when a step needs > quota experts
    host_syncs: int = 0  # device->host reads of the routed expert set, one per layer step
    prefetches: int = 0  # experts loaded ahead of their layer's step (bytes in bytes_h2d)
    prefetch_used: int = 0  # prefetched experts that their layer's step then routed to
    stall_ms: float = 0.0  # time the compute stream waited for expert copies
    preloaded: int = 0  # experts copied once at start-up into layers that hold all theirs

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    @property
    def prefetch_precision(self) -> float:
        return self.prefetch_used / self.prefetches if self.prefetches else 0.0

    @property
    def prefetch_recall(self) -> float:
        """Share of the would-be misses that prefetching turned into hits."""
        would_miss = self.prefetch_used + self.misses
        return self.prefetch_used / would_miss if would_miss else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate,
                "prefetch_precision": self.prefetch_precision,
                "prefetch_recall": self.prefetch_recall}

    def summary(self) -> str:
        line = (f"hits={self.hits} misses={self.misses} hit_rate={self.hit_rate:.3f} "
                f"evictions={self.evictions} h2d={self.bytes_h2d / (1 << 20):.1f}MiB "
                f"stall={self.stall_ms:.1f}ms layer_steps={self.layer_steps}")
        if self.prefetches:
            line += (f" prefetches={self.prefetches} precision={self.prefetch_precision:.2f}"
                     f" recall={self.prefetch_recall:.2f}")
        return line


class RoutingCounters:
    """Per MoE layer and expert: routed (token, k) pairs and steps, over all layer steps (the
    router statistics); and for the steps counted on the device (inside CUDA graphs: layers
    holding all their experts, zero-copy decode) the lookups, the misses (experts read from
    host memory) and the steps, which the host never sees.

    Kept in host memory, pinned with CUDA: kernels/usage.py writes here through the mapping,
    the host-synced path with numpy; readers never call into CUDA, so the stats thread cannot
    disturb a graph capture.
    """

    def __init__(self, num_layers: int, num_experts: int, pin: bool = False):
        def zeros(*shape):
            return torch.zeros(*shape, dtype=torch.int64, device="cpu", pin_memory=pin)
        self.routed, self.steps = zeros(num_layers, num_experts), zeros(num_layers)
        self.device_lookups = zeros(num_layers, num_experts)
        self.device_misses = zeros(num_layers, num_experts)
        self.device_steps = zeros(num_layers)

    def add(self, layer: int, ids: np.ndarray) -> None:
        """One host-synced layer step's expert ids (any shape)."""
        self.routed.numpy()[layer] += np.bincount(ids.reshape(-1),
                                                  minlength=self.routed.shape[1])
        self.steps.numpy()[layer] += 1

    def device_totals(self) -> tuple[int, int, int]:
        """(lookups, misses, layer steps) counted on the device, over all layers."""
        return (int(self.device_lookups.numpy().sum()), int(self.device_misses.numpy().sum()),
                int(self.device_steps.numpy().sum()))


class RoutingLog:
    """The expert ids of the first `max_steps` eager layer steps, in order: (MoE layer, ids
    [T, K]) each. What an engine routed, read back by tests (collective_rpc
    "expert_offload_routing_log"); steps inside CUDA graphs are not seen."""

    def __init__(self, max_steps: int):
        self.max_steps = max_steps
        self.steps: list[tuple[int, list[list[int]]]] = []

    def record(self, layer: int, ids) -> None:
        if len(self.steps) < self.max_steps:
            self.steps.append((layer, ids.tolist()))
