"""The expert cache's directory, updated on the device by one kernel per layer step: no host
sync, so decode steps run inside CUDA graphs and still change what the cache holds.

Per MoE layer the directory holds, as device tensors (rows of [L, E] tensors):
  slot  [E] int32  the expert's cache slot, -1 when it has none;
  score [E] int32  LFU with decay, in integers: score -= score >> DECAY_SHIFT, then + ONE if the
                   step routed to the expert (half-life 89 steps; integer arithmetic, so the
                   kernel, its torch twin and the host model agree bit for bit);
  last  [E] int32  the layer's clock when the expert was last routed (ties: least recent);
  clock []  int32  the layer's step count.
Every slot of a layer always holds an expert (the cache starts with experts 0..Q-1).

One step, given the routed ids [P] (P = T*K pairs):
  1. count the pairs per expert; routed = count > 0; update score, last, clock;
  2. hits: routed and in a slot; misses: routed without one;
  3. victims: the residents this step does not route to, lowest (score, last, expert) first;
     fill candidates: the misses, most pairs first (then lowest id);
  4. the i-th candidate takes the i-th victim's slot, for i < min(misses, victims): `fills`
     (expert, slot) pairs to copy from the host store; the misses left over are read in place
     from host memory this step (`reads`), their slots never taken;
  5. pass maps for the grouped GEMM ([E] int32): `first` = the hits' slots (computed while the
     fills land), `second` = the filled experts' new slots and HOST for the reads; SKIP
     elsewhere;
  6. counters (a pinned host row, written through its device address): hits, misses, fills,
     reads, evictions, steps; and the routed pairs per expert.
The ranks come from pairwise comparisons over [E, E] in one program (E = 128: 16k lanes).

`update_torch` is the same function in torch ops (the CPU path and the kernel's reference);
`tests/kernels/test_directory.py` checks both against a sequential host model of the rule
(policies.DirectoryModel).
"""

import torch
import triton
import triton.language as tl

DECAY_SHIFT = 7
ONE = 1 << 16
SKIP, HOST = -1, -2  # pass-map values: not in this pass; read from host memory
COUNTERS = ("hits", "misses", "fills", "reads", "evictions", "steps")
_BLOCK_P = 64


@triton.jit
def count_pairs(ids_ptr, num_pairs, E: tl.constexpr, BLOCK_P: tl.constexpr):
    """[E] int32: the step's (token, k) pairs per expert, from its num_pairs expert ids."""
    e = tl.arange(0, E)
    count = tl.zeros([E], dtype=tl.int32)
    for start in range(0, num_pairs, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        ids = tl.load(ids_ptr + p, mask=p < num_pairs, other=-1).to(tl.int32)
        count += tl.sum((ids[:, None] == e[None, :]).to(tl.int32), axis=0)
    return count


@triton.jit(do_not_specialize=["num_pairs"])
def _update_kernel(
    # the step's routing
    ids_ptr, num_pairs,
    # the layer's directory rows (updated in place)
    slot_ptr, score_ptr, last_ptr, clock_ptr,
    # outputs: fill list, pass maps
    fill_expert_ptr, fill_slot_ptr, num_fills_ptr, first_ptr, second_ptr,
    # counters (pinned host rows): per expert routed pairs, and COUNTERS
    routed_ptr, counters_ptr,
    # meta
    num_experts, E: tl.constexpr, BLOCK_P: tl.constexpr, SHIFT: tl.constexpr,
    ONE_: tl.constexpr, HOST_: tl.constexpr, SKIP_: tl.constexpr,
):
    e = tl.arange(0, E)
    valid = e < num_experts
    count = count_pairs(ids_ptr, num_pairs, E, BLOCK_P)
    routed = (count > 0) & valid  # ids outside [0, E) never count
    slot = tl.load(slot_ptr + e, mask=valid, other=-1)
    score = tl.load(score_ptr + e, mask=valid, other=0)
    last = tl.load(last_ptr + e, mask=valid, other=0)
    clock = tl.load(clock_ptr)
    score = score - (score >> SHIFT) + tl.where(routed, ONE_, 0)
    last = tl.where(routed, clock, last)
    resident = slot >= 0
    hit = routed & resident
    miss = routed & (slot < 0)
    evictable = resident & (count == 0)
    # victim rank: evictable experts with a smaller (score, last, id) key, [E_i, E_j]
    si, sj = score[:, None], score[None, :]
    li, lj = last[:, None], last[None, :]
    ei, ej = e[:, None], e[None, :]
    before = (sj < si) | ((sj == si) & ((lj < li) | ((lj == li) & (ej < ei))))
    rank = tl.sum((before & evictable[None, :]).to(tl.int32), axis=1)
    # candidate rank: misses with more pairs (then a lower id) first
    ci, cj = count[:, None], count[None, :]
    ahead = (cj > ci) | ((cj == ci) & (ej < ei))
    mrank = tl.sum((ahead & miss[None, :]).to(tl.int32), axis=1)
    num_misses = tl.sum(miss.to(tl.int32), axis=0)
    num_fills = tl.minimum(num_misses, tl.sum(evictable.to(tl.int32), axis=0))
    fill = miss & (mrank < num_fills)
    victim = evictable & (rank < num_fills)
    # the i-th candidate takes the slot of the i-th victim
    pair = fill[:, None] & victim[None, :] & (mrank[:, None] == rank[None, :])
    taken = tl.sum(tl.where(pair, slot[None, :], 0), axis=1)
    new_slot = tl.where(fill, taken, tl.where(victim, -1, slot))
    tl.store(slot_ptr + e, new_slot, mask=valid)
    tl.store(score_ptr + e, score, mask=valid)
    tl.store(last_ptr + e, last, mask=valid)
    tl.store(clock_ptr, clock + 1)
    tl.store(fill_expert_ptr + mrank, e, mask=fill)
    tl.store(fill_slot_ptr + mrank, new_slot, mask=fill)
    tl.store(num_fills_ptr, num_fills)
    tl.store(first_ptr + e, tl.where(hit, slot, SKIP_), mask=valid)
    tl.store(second_ptr + e, tl.where(fill, new_slot, tl.where(miss, HOST_, SKIP_)), mask=valid)
    old = tl.load(routed_ptr + e, mask=valid, other=0)
    tl.store(routed_ptr + e, old + count.to(tl.int64), mask=valid)
    # COUNTERS: hits, misses, fills, reads, evictions (every fill evicts), steps
    num_hits = tl.sum(hit.to(tl.int32), axis=0)
    tl.store(counters_ptr + 0, tl.load(counters_ptr + 0) + num_hits)
    tl.store(counters_ptr + 1, tl.load(counters_ptr + 1) + num_misses)
    tl.store(counters_ptr + 2, tl.load(counters_ptr + 2) + num_fills)
    tl.store(counters_ptr + 3, tl.load(counters_ptr + 3) + num_misses - num_fills)
    tl.store(counters_ptr + 4, tl.load(counters_ptr + 4) + num_fills)
    tl.store(counters_ptr + 5, tl.load(counters_ptr + 5) + 1)


def update(ids: torch.Tensor, slot: torch.Tensor, score: torch.Tensor, last: torch.Tensor,
           clock: torch.Tensor, fill_expert: torch.Tensor, fill_slot: torch.Tensor,
           num_fills: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
           routed: torch.Tensor, counters: torch.Tensor) -> None:
    """One layer step's directory update on the device (see the module doc). ids: the step's
    expert ids (any shape); slot, score, last [E] int32, clock [1] int32: the layer's rows,
    updated in place; fill_expert, fill_slot [E] int32 (the first num_fills rows written),
    num_fills [1] int32; first, second [E] int32 pass maps; routed [E] int64 and counters
    [len(COUNTERS)] int64 in pinned host memory (added to)."""
    num_experts = slot.numel()
    assert all(t.dtype == torch.int32 for t in (slot, score, last, clock, fill_expert,
                                                 fill_slot, num_fills, first, second))
    assert routed.dtype == torch.int64 and counters.dtype == torch.int64
    assert counters.numel() == len(COUNTERS) and routed.numel() == num_experts
    flat = ids.reshape(-1)
    _update_kernel[(1,)](
        flat, flat.numel(), slot, score, last, clock, fill_expert, fill_slot, num_fills,
        first, second, routed, counters, num_experts, E=triton.next_power_of_2(num_experts),
        BLOCK_P=_BLOCK_P, SHIFT=DECAY_SHIFT, ONE_=ONE, HOST_=HOST, SKIP_=SKIP, num_warps=8)


def update_torch(ids, slot, score, last, clock, fill_expert, fill_slot, num_fills, first,
                 second, routed, counters) -> None:
    """`update` in torch ops, same arguments and results (the CPU path, and the kernel's
    reference)."""
    num_experts = slot.numel()
    e = torch.arange(num_experts, device=slot.device, dtype=torch.int32)
    flat = ids.reshape(-1).long()
    flat = flat[(flat >= 0) & (flat < num_experts)]  # as the kernel: other ids never count
    count = torch.bincount(flat, minlength=num_experts).to(torch.int32)
    is_routed = count > 0
    new_score = score - (score >> DECAY_SHIFT) + torch.where(is_routed, ONE, 0).to(torch.int32)
    new_last = torch.where(is_routed, clock, last)
    resident = slot >= 0
    hit, miss = is_routed & resident, is_routed & ~resident
    evictable = resident & ~is_routed
    si, sj = new_score[:, None], new_score[None, :]
    li, lj = new_last[:, None], new_last[None, :]
    ei, ej = e[:, None], e[None, :]
    before = (sj < si) | ((sj == si) & ((lj < li) | ((lj == li) & (ej < ei))))
    rank = (before & evictable[None, :]).sum(dim=1, dtype=torch.int32)
    ci, cj = count[:, None], count[None, :]
    mrank = (((cj > ci) | ((cj == ci) & (ej < ei))) & miss[None, :]).sum(dim=1,
                                                                           dtype=torch.int32)
    n_miss = miss.sum(dtype=torch.int32)
    n_fill = torch.minimum(n_miss, evictable.sum(dtype=torch.int32))
    fill = miss & (mrank < n_fill)
    victim = evictable & (rank < n_fill)
    pair = fill[:, None] & victim[None, :] & (mrank[:, None] == rank[None, :])
    taken = torch.where(pair, slot[None, :], 0).sum(dim=1, dtype=torch.int32)
    new_slot = torch.where(fill, taken, torch.where(victim, -1, slot)).to(torch.int32)
    fill_expert[mrank[fill].long()] = e[fill]
    fill_slot[mrank[fill].long()] = new_slot[fill]
    num_fills.copy_(n_fill.view(1))
    first.copy_(torch.where(hit, slot, SKIP))
    second.copy_(torch.where(fill, new_slot, torch.where(miss, HOST, SKIP)))
    slot.copy_(new_slot)
    score.copy_(new_score)
    last.copy_(new_last)
    clock.add_(1)
    routed.add_(count.to(routed.device, torch.int64))
    n_hit = hit.sum()
    deltas = torch.stack([n_hit, n_miss, n_fill, n_miss - n_fill, n_fill,
                          torch.ones_like(n_hit)]).to(counters.device, torch.int64)
    counters.add_(deltas)
