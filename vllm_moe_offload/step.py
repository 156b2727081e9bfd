"""One MoE layer step over the expert cache, given the routing: what the custom ops of
`layer.py` run, and what the profiler times without a model.

`synced_step`: one host sync brings the routed expert set; the cache splits it into passes,
the resident experts first, and each pass's kernels wait only for the copies issued up to its
own, never for later ones (see transfer.py for the ordering). `graph_step`: no host sync, so
it runs inside CUDA graphs: layers whose quota holds all their experts, and (zero-copy
decode) the other layers' decode steps, which read missing experts from host memory.
"""

import numpy as np
import torch

from vllm_moe_offload import kernels
from vllm_moe_offload.cache import ExpertCache
from vllm_moe_offload.prefetch import CorrelationPrefetcher


def synced_step(cache: ExpertCache, layer: int, hidden: torch.Tensor,
                topk_weights: torch.Tensor, topk_ids: torch.Tensor, out: torch.Tensor,
                prefetcher: CorrelationPrefetcher | None = None) -> None:
    """hidden, out [T, H]; topk_weights, topk_ids [T, K]. The grouping and activation
    quantisation are queued before the sync, so the device works while the host waits."""
    if topk_ids.numel() == 0:
        return
    run = kernels.begin(hidden, topk_weights, topk_ids, cache.weights,
                        cache.store.layout.block, cache.store.num_experts)
    ids_host = topk_ids.cpu().numpy()  # the host sync: which experts this step needs
    stats, transfers = cache.stats, cache.transfers
    stats.stall_ms += transfers.collect_stall_ms()  # earlier waits are complete now
    cache.routing.add(layer, ids_host)
    experts = np.unique(ids_host).tolist()
    passes = cache.schedule(layer, experts)
    fetched = [cache.fetch_pass(layer, passes[0])]
    for i, group in enumerate(passes):
        following = passes[i + 1] if i + 1 < len(passes) else None
        if following and cache.fits_beside(layer, following, group):
            # its copies start now, while this pass computes
            fetched.append(cache.fetch_pass(layer, following, group))
        slots, ready = fetched[i]
        transfers.wait_copied(ready)
        kernels.run_pass(run, cache.weights, group, slots, cache.maps.upload(group, slots))
        if following:
            # later copies into these slots wait for this pass's kernels
            cache.computed(slots, transfers.mark_computed())
            if len(fetched) == i + 1:
                fetched.append(cache.fetch_pass(layer, following))
    kernels.finish(run, out)
    cache.publish_map(layer)  # for graph steps: the compute stream has waited for its copies
    if prefetcher is not None:
        prefetcher.prefetch_next(cache, layer, ids_host)
    stats.layer_steps += 1
    stats.passes += len(passes)
    stats.host_syncs += 1


def graph_step(cache: ExpertCache, layer: int, hidden: torch.Tensor,
               topk_weights: torch.Tensor, topk_ids: torch.Tensor, out: torch.Tensor) -> None:
    """A layer step without host sync or copies, so it can run inside CUDA graphs: experts
    with a slot (the layer's device map) are read from it, the others straight from the
    pinned host store (zero-copy); routing, lookups and misses are counted on the device."""
    run = kernels.begin(hidden, topk_weights, topk_ids, cache.weights,
                        cache.store.layout.block, cache.store.num_experts,
                        zero_copy=not cache.is_resident(layer))
    experts, slots, slot_map = cache.device_map(layer)
    kernels.run_pass(run, cache.weights, experts, slots, slot_map, cache.store.views[layer])
    kernels.finish(run, out)
    kernels.count_routing(topk_ids, slot_map, cache.routing, layer)

