"""Routing counts of a layer step on the device, for layers that run inside CUDA graphs (they
hold all their experts, so nothing brings their routing to the host): one program per expert
adds its routed pairs, whether it was routed at all, and (program 0) the step."""

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _count_kernel(ids_ptr, num_pairs, routed_ptr, active_ptr, steps_ptr,
                  BLOCK: tl.constexpr):
    expert = tl.program_id(0)
    count = 0
    for start in range(0, num_pairs, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
        count += tl.sum((ids == expert).to(tl.int32))
    # one program per expert: plain read-modify-write, no atomics
    tl.store(routed_ptr + expert, tl.load(routed_ptr + expert) + count.to(tl.int64))
    tl.store(active_ptr + expert, tl.load(active_ptr + expert) + (count > 0).to(tl.int64))
    if expert == 0:
        tl.store(steps_ptr, tl.load(steps_ptr) + 1)


def count_routing(topk_ids: torch.Tensor, routed: torch.Tensor, active: torch.Tensor,
                  steps: torch.Tensor) -> None:
    """topk_ids [T, K] on the device; routed, active [E] and steps [1]: int64 rows of
    `RoutingCounters` (pinned host memory, written through the device mapping)."""
    if not topk_ids.is_cuda:
        counts = torch.bincount(topk_ids.reshape(-1), minlength=routed.numel())
        routed += counts
        active += counts > 0
        steps += 1
        return
    ids = topk_ids.reshape(-1)
    _count_kernel[(routed.numel(),)](ids, ids.numel(), routed, active, steps, BLOCK=_BLOCK)
