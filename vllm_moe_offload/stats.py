"""`OffloadStats`: the counters every fetch decision updates; everything reported reads these."""

from dataclasses import asdict, dataclass


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
        return (f"hits={self.hits} misses={self.misses} hit_rate={self.hit_rate:.3f} "
                f"evictions={self.evictions} h2d={self.bytes_h2d / (1 << 20):.1f}MiB "
                f"layer_steps={self.layer_steps}")
