"""Turns the user's budget into a concrete expert-cache size (`CachePlan`).

Example:
    plan = plan_cache(OffloadConfig(enabled=True, cache_gb=8), geometry, device_bytes=None)
"""

import math
from dataclasses import dataclass

from vllm_moe_offload.config import OffloadConfig
from vllm_moe_offload.offload.geometry import MoeGeometry
from vllm_moe_offload.units import GIB, format_bytes

# Without a budget, experts may take this share of the memory vLLM may use on the device;
# the rest stays for activations and a useful KV cache.
DEFAULT_EXPERT_SHARE = 0.5


@dataclass(frozen=True)
class CachePlan:
    num_slots: int  # summed over MoE layers
    slot_bytes: int
    reason: str  # how the size was chosen, for the start-up log

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.slot_bytes

    def describe(self, geometry: MoeGeometry) -> str:
        share = self.num_slots / geometry.total_experts
        return (f"{self.num_slots} slots ({format_bytes(self.nbytes)}, {share:.0%} of "
                f"{geometry.total_experts} experts, ~{self.num_slots // geometry.num_moe_layers} "
                f"per layer); {self.reason}")


def plan_cache(config: OffloadConfig, geometry: MoeGeometry,
               device_bytes: int | None) -> CachePlan:
    """device_bytes: memory vLLM may use on the device (total x gpu_memory_utilization)."""
    slot_bytes = geometry.layout.record_bytes
    total = geometry.total_experts
    if config.cache_slots is not None:
        slots, reason = config.cache_slots, "set by --expert-cache-slots"
    elif config.cache_gb is not None:
        slots, reason = int(config.cache_gb * GIB // slot_bytes), "set by --expert-cache-gb"
    elif device_bytes is not None:
        slots = int(device_bytes * DEFAULT_EXPERT_SHARE // slot_bytes)
        reason = (f"default: {DEFAULT_EXPERT_SHARE:.0%} of the device memory vLLM may use; "
                  "set --expert-cache-gb to choose")
    else:
        slots, reason = total // 2, "default without a device: half of the experts"
    if slots > total:
        slots, reason = total, reason + "; capped at all experts"
    minimum = geometry.top_k * geometry.num_moe_layers
    minimum_gb = math.ceil(minimum * slot_bytes / GIB * 1000) / 1000  # rounded up: sufficient
    if slots < minimum:
        raise ValueError(
            f"expert offload: a cache of {slots} slots gives {slots // geometry.num_moe_layers} "
            f"per MoE layer, fewer than top-k={geometry.top_k}: no token's experts could be "
            f"resident together, so every step would read some from host memory; use "
            f"--expert-cache-slots "
            f">= {minimum} (or --expert-cache-gb >= {minimum_gb:.3f})")
    return CachePlan(slots, slot_bytes, reason)
