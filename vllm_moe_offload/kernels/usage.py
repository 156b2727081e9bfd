"""Routing counts of a resident layer's step (a layer holding all its experts, inside CUDA
graphs: nothing brings its routing to the host): one program per expert adds its routed pairs
and, if it was routed at all, one hit; program 0 adds the step. The counters are a layer's
rows of `cache.DeviceCounters` in pinned host memory (the COUNTERS of kernels/directory.py)."""

import torch
import triton
import triton.language as tl

from vllm_moe_offload.kernels.directory import COUNTERS

_BLOCK = 1024
_HITS, _STEPS = COUNTERS.index("hits"), COUNTERS.index("steps")


@triton.jit
def _count_kernel(ids_ptr, num_pairs, routed_ptr, counts_ptr, HITS: tl.constexpr,
                  STEPS: tl.constexpr, BLOCK: tl.constexpr):
    expert = tl.program_id(0)
    count = 0
    for start in range(0, num_pairs, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
        count += tl.sum((ids == expert).to(tl.int32))
    # one program per expert: plain read-modify-write, no atomics for the routed row
    tl.store(routed_ptr + expert, tl.load(routed_ptr + expert) + count.to(tl.int64))
    tl.atomic_add(counts_ptr + HITS, (count > 0).to(tl.int64))
    if expert == 0:
        tl.store(counts_ptr + STEPS, tl.load(counts_ptr + STEPS) + 1)


def count_routing(topk_ids: torch.Tensor, routed: torch.Tensor, counts: torch.Tensor) -> None:
    """topk_ids [T, K] on the device; routed [E] and counts [len(COUNTERS)] (int64): the
    layer's counter rows, added to."""
    if not topk_ids.is_cuda:
        per_expert = torch.bincount(topk_ids.reshape(-1), minlength=routed.numel())
        routed += per_expert
        counts[_HITS] += int((per_expert > 0).sum())
        counts[_STEPS] += 1
        return
    ids = topk_ids.reshape(-1)
    _count_kernel[(routed.numel(),)](ids, ids.numel(), routed, counts, HITS=_HITS,
                                     STEPS=_STEPS, BLOCK=_BLOCK)
