"""Routing counts of a resident layer's step (a layer holding all its experts, inside CUDA
graphs: nothing brings its routing to the host): one program counts the step's pairs per
expert (as kernels/directory.py does) and adds them, one hit per routed expert and the step to
a layer's rows of `cache.DeviceCounters` in pinned host memory (plain read-modify-writes from
one program: atomics on host memory over PCIe are not to be relied on)."""

import torch
import triton
import triton.language as tl

from vllm_moe_offload.offload.kernels.directory import COUNTERS, count_pairs

_BLOCK = 64
_HITS, _STEPS = COUNTERS.index("hits"), COUNTERS.index("steps")


@triton.jit(do_not_specialize=["num_pairs"])
def _count_kernel(ids_ptr, num_pairs, routed_ptr, counts_ptr, num_experts,
                  E: tl.constexpr, HITS: tl.constexpr, STEPS: tl.constexpr,
                  BLOCK: tl.constexpr):
    e = tl.arange(0, E)
    valid = e < num_experts
    count = count_pairs(ids_ptr, num_pairs, E, BLOCK)
    old = tl.load(routed_ptr + e, mask=valid, other=0)
    tl.store(routed_ptr + e, old + count.to(tl.int64), mask=valid)
    hits = tl.sum((count > 0).to(tl.int32), axis=0)
    tl.store(counts_ptr + HITS, tl.load(counts_ptr + HITS) + hits)
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
    _count_kernel[(1,)](ids, ids.numel(), routed, counts, routed.numel(),
                        E=triton.next_power_of_2(routed.numel()), HITS=_HITS, STEPS=_STEPS,
                        BLOCK=_BLOCK, num_warps=8)
