"""`OffloadStats`: the counters every fetch decision updates; everything reported reads these."""

from dataclasses import asdict, dataclass


@dataclass
class OffloadStats:
    hits: int = 0  # expert needed by a layer's step and already in a slot
    misses: int = 0  # expert fetched from host memory (one record each)
    evictions: int = 0  # resident expert dropped to make room
    bytes_h2d: int = 0  # host->device bytes moved, misses x record size
    layer_steps: int = 0  # MoE layer forwards
    passes: int = 0  # compute passes: more than layer_steps when a step needs > quota experts
    host_syncs: int = 0  # device->host reads of the routed expert set, one per layer step

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate}

    def summary(self) -> str:
        return (f"hits={self.hits} misses={self.misses} hit_rate={self.hit_rate:.3f} "
                f"evictions={self.evictions} h2d={self.bytes_h2d / (1 << 20):.1f}MiB "
                f"layer_steps={self.layer_steps}")
