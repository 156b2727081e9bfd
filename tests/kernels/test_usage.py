"""Device-side routing counts (layers inside CUDA graphs): equal numpy's bincount, written
into host memory that the host reads without any CUDA call (pinned and mapped on CUDA)."""

import os

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vllm_moe_offload.kernels import usage  # noqa: E402
from vllm_moe_offload.stats import RoutingCounters  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def triton_count(ids, routed, active, steps):
    """The Triton kernel itself (count_routing takes torch ops on CPU)."""
    flat = ids.reshape(-1)
    usage._count_kernel[(routed.numel(),)](flat, flat.numel(), routed, active, steps,
                                           BLOCK=usage._BLOCK)


@pytest.mark.parametrize("count", [usage.count_routing, triton_count])
def test_counts_match_bincount_over_steps(count):
    e, k = 24, 4
    counters = RoutingCounters(num_layers=2, num_experts=e, pin=DEVICE == "cuda")
    gen = torch.Generator().manual_seed(0)
    expected_routed, expected_active = np.zeros(e, np.int64), np.zeros(e, np.int64)
    for tokens in (1, 3, 300, 2000):
        ids = torch.rand(tokens, e, generator=gen).argsort(dim=1)[:, :k].to(torch.int32)
        count(ids.to(DEVICE), counters.routed[1], counters.active[1],
                      counters.steps[1:2])
        counts = np.bincount(ids.numpy().reshape(-1), minlength=e)
        expected_routed += counts
        expected_active += counts > 0
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    assert counters.routed[1].tolist() == expected_routed.tolist()
    assert counters.active[1].tolist() == expected_active.tolist()
    assert counters.steps.tolist() == [0, 4]
    assert counters.routed[0].sum() == 0  # other layers untouched
    assert counters.lookups([1]) == int(expected_active.sum())
