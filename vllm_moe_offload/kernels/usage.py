"""Routing counts of a layer step on the device, for steps that run inside CUDA graphs (a
layer holding all its experts, or zero-copy decode), where nothing brings the routing to the
host: one program per expert adds its routed pairs and, if it was routed at all, one lookup,
and one miss when it had no slot (its weights were read from host memory); program 0 adds
the step. The counters are `RoutingCounters` rows in pinned host memory."""

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _count_kernel(ids_ptr, num_pairs, slot_map_ptr, routed_ptr, steps_ptr, lookups_ptr,
                  misses_ptr, device_steps_ptr, BLOCK: tl.constexpr):
    expert = tl.program_id(0)
    count = 0
    for start in range(0, num_pairs, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
        count += tl.sum((ids == expert).to(tl.int32))
    used = (count > 0).to(tl.int64)
    missed = used * (tl.load(slot_map_ptr + expert) < 0).to(tl.int64)
    # one program per expert: plain read-modify-write, no atomics
    tl.store(routed_ptr + expert, tl.load(routed_ptr + expert) + count.to(tl.int64))
    tl.store(lookups_ptr + expert, tl.load(lookups_ptr + expert) + used)
    tl.store(misses_ptr + expert, tl.load(misses_ptr + expert) + missed)
    if expert == 0:
        tl.store(steps_ptr, tl.load(steps_ptr) + 1)
        tl.store(device_steps_ptr, tl.load(device_steps_ptr) + 1)


def count_routing(topk_ids: torch.Tensor, slot_map: torch.Tensor, counters, layer: int) -> None:
    """topk_ids [T, K] and slot_map [E] (int32, -1: no slot) on the device; counters: the
    `RoutingCounters` whose row `layer` is updated."""
    c, sl = counters, slice(layer, layer + 1)
    if not topk_ids.is_cuda:
        counts = torch.bincount(topk_ids.reshape(-1), minlength=c.routed.shape[1])
        used = (counts > 0).long()
        c.routed[layer] += counts
        c.device_lookups[layer] += used
        c.device_misses[layer] += used * (slot_map.cpu() < 0).long()
        c.steps[sl] += 1
        c.device_steps[sl] += 1
        return
    ids = topk_ids.reshape(-1)
    _count_kernel[(c.routed.shape[1],)](
        ids, ids.numel(), slot_map, c.routed[layer], c.steps[sl], c.device_lookups[layer],
        c.device_misses[layer], c.device_steps[sl], BLOCK=_BLOCK)
