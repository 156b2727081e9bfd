"""`OffloadStats`: the counters everything reported reads (`ExpertCache.snapshot`), and
`RoutingLog`: the routing an engine did, for tests."""

from dataclasses import asdict, dataclass


@dataclass
class OffloadStats:
    hits: int = 0  # expert a layer's step routed to and found in a slot
    misses: int = 0  # routed expert without a slot: filled, or read without one (below)
    fills: int = 0  # misses copied into a slot (the victim's), for later steps to hit
    reads: int = 0  # misses read without a slot: in place from host memory, or staged
    evictions: int = 0  # residents whose slot a fill took
    bytes_h2d: int = 0  # host->device bytes, (fills + reads) x record size
    layer_steps: int = 0  # MoE layer forwards
    staged_steps: int = 0  # large steps (prefill) that staged their reads, one host sync each
    stall_ms: float = 0.0  # time their compute stream waited for staged copies
    preloaded: int = 0  # experts copied once at start-up into layers that hold all theirs

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate}

    def summary(self) -> str:
        return (f"hits={self.hits} misses={self.misses} hit_rate={self.hit_rate:.3f} "
                f"fills={self.fills} reads={self.reads} evictions={self.evictions} "
                f"h2d={self.bytes_h2d / (1 << 20):.1f}MiB layer_steps={self.layer_steps} "
                f"staged_steps={self.staged_steps} stall={self.stall_ms:.1f}ms")


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
