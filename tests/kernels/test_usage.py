"""Device-side routing counts (steps inside CUDA graphs): equal numpy's bincount, misses are
the routed experts without a slot, written into host memory that the host reads without any
CUDA call (pinned and mapped on CUDA)."""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vllm_moe_offload.kernels import usage  # noqa: E402
from vllm_moe_offload.stats import RoutingCounters  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def triton_count(ids, slot_map, c, layer):
    """The Triton kernel itself (count_routing takes torch ops on CPU)."""
    flat, sl = ids.reshape(-1), slice(layer, layer + 1)
    usage._count_kernel[(c.routed.shape[1],)](
        flat, flat.numel(), slot_map, c.routed[layer], c.steps[sl], c.device_lookups[layer],
        c.device_misses[layer], c.device_steps[sl], BLOCK=usage._BLOCK)


@pytest.mark.parametrize("count", [usage.count_routing, triton_count])
def test_counts_match_bincount_over_steps(count):
    e, k = 24, 4
    counters = RoutingCounters(num_layers=2, num_experts=e, pin=DEVICE == "cuda")
    slot_map = torch.full((e,), -1, dtype=torch.int32)
    slot_map[::3] = torch.arange(0, e, 3, dtype=torch.int32)  # every third expert has a slot
    gen = torch.Generator().manual_seed(0)
    routed, lookups, misses = (np.zeros(e, np.int64) for _ in range(3))
    for tokens in (1, 3, 300, 2000):
        ids = torch.rand(tokens, e, generator=gen).argsort(dim=1)[:, :k].to(torch.int32)
        count(ids.to(DEVICE), slot_map.to(DEVICE), counters, 1)
        counts = np.bincount(ids.numpy().reshape(-1), minlength=e)
        routed += counts
        lookups += counts > 0
        misses += (counts > 0) & (slot_map.numpy() < 0)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    assert counters.routed[1].tolist() == routed.tolist()
    assert counters.device_lookups[1].tolist() == lookups.tolist()
    assert counters.device_misses[1].tolist() == misses.tolist()
    assert counters.steps.tolist() == [0, 4] and counters.device_steps.tolist() == [0, 4]
    assert counters.routed[0].sum() == 0  # other layers untouched
    assert counters.device_totals() == (int(lookups.sum()), int(misses.sum()), 4)
