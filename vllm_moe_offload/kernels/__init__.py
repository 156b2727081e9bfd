"""Expert compute over cache slots. Dispatch is by device: the pure-torch reference serves
every device until a Triton kernel covers it."""

from vllm_moe_offload.kernels.reference import grouped_experts, route

__all__ = ["grouped_experts", "route"]
