"""One MoE layer step over the expert cache, given the routing: what the custom ops of
`integration/layer.py` run, and what the profiler times without a model.

`device_step`, every step of up to DEVICE_STEP_MAX_TOKENS tokens (all decode, inside CUDA
graphs or not): no host sync. The directory update (one kernel, cache.update) picks the hits,
the fills and the misses left over; the fills are copied on the copy stream (a fork) while the
hits' pass computes; after the join, the second pass computes the filled experts from their new
slots and reads the rest in place from host memory.

`staged_step`, larger steps (prefill chunks, which route to nearly every expert with many
tokens each): the same update and fills, then one host sync on the second pass map to learn
which misses have no slot; those are copied into the staging slots on the copy engine, a
staging's worth per pass, so each crosses PCIe once, not once per block of tokens as a read in
place would. Ordering: a pass's kernels wait for its copies (`wait_copied`, timed as stall);
the next pass's copies wait for it (`copy_after`); earlier steps' work is complete once the
host sync returns.

`resident_step`: a layer holding all its experts, captured in CUDA graphs like stock vLLM's.
"""

import numpy as np
import torch

from vllm_moe_offload.offload import kernels
from vllm_moe_offload.offload.cache import ExpertCache
from vllm_moe_offload.offload.kernels.directory import HOST

# Above this many tokens an eager step stages its reads: a read in place costs a PCIe transfer
# per block of pairs (BLOCK_M rows), a staged one a single transfer, and from ~512 tokens
# (4,096 pairs: 32 per expert, BLOCK_M 32-64) an expert's pairs span more than one block. A
# step inside a CUDA graph cannot sync, so it takes the device step at any size (vLLM's
# largest graph is 512 tokens by default).
DEVICE_STEP_MAX_TOKENS = 512


def device_step(cache: ExpertCache, layer: int, hidden: torch.Tensor,
                topk_weights: torch.Tensor, topk_ids: torch.Tensor, out: torch.Tensor) -> None:
    """hidden, out [T, H]; topk_weights, topk_ids [T, K]. No host sync: capturable."""
    run = kernels.begin(hidden, topk_weights, topk_ids, cache.weights,
                        cache.store.layout.block, cache.store.num_experts, zero_copy=True)
    maps = cache.update(layer, topk_ids)
    _hits_while_filling(cache, layer, run, maps.first)
    kernels.run_pass(run, cache.weights, maps.second, cache.store.views[layer])
    kernels.finish(run, out)


def staged_step(cache: ExpertCache, layer: int, hidden: torch.Tensor,
                topk_weights: torch.Tensor, topk_ids: torch.Tensor, out: torch.Tensor) -> None:
    """As device_step, but the misses without a slot are staged, not read in place (one host
    sync, on the update's second pass map)."""
    run = kernels.begin(hidden, topk_weights, topk_ids, cache.weights,
                        cache.store.layout.block, cache.store.num_experts)
    maps = cache.update(layer, topk_ids)
    cache.second_map.start(maps.second)
    _hits_while_filling(cache, layer, run, maps.first)
    kernels.run_pass(run, cache.weights, maps.second)  # no host views: the fills only
    reads = np.flatnonzero(cache.second_map.wait() == HOST).tolist()  # the host sync
    transfers = cache.transfers
    cache.stats.stall_ms += transfers.collect_stall_ms()  # earlier waits are complete now
    cache.maps.new_step()
    computed = None
    for i in range(0, len(reads), cache.staging):
        pass_map, ready = cache.stage(layer, reads[i:i + cache.staging], computed)
        transfers.wait_copied(ready)
        kernels.run_pass(run, cache.weights, pass_map)
        computed = transfers.mark_computed()  # the next pass's copies reuse these slots
    kernels.finish(run, out)
    cache.stats.staged_steps += 1
    cache.verify_ranks()


def resident_step(cache: ExpertCache, layer: int, hidden: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor, out: torch.Tensor) -> None:
    """A layer whose slots hold all its experts: one pass over its map, counted on the
    device."""
    run = kernels.begin(hidden, topk_weights, topk_ids, cache.weights,
                        cache.store.layout.block, cache.store.num_experts)
    kernels.run_pass(run, cache.weights, cache.layer_map(layer))
    kernels.finish(run, out)
    cache.count_resident(layer, topk_ids)


def _hits_while_filling(cache: ExpertCache, layer: int, run, first: torch.Tensor) -> None:
    """The fills on the copy stream, beside the hits' pass on the compute stream."""
    transfers = cache.transfers
    transfers.fork()
    with transfers.on_copy_stream():
        cache.fill(layer)
    kernels.run_pass(run, cache.weights, first)
    transfers.join()
