"""Resident layers' routing counts (steps inside CUDA graphs): routed pairs equal numpy's
bincount and every routed expert is one hit, in host memory that the host reads without any
CUDA call (pinned and mapped on CUDA)."""

import numpy as np
import pytest
import torch

from vllm_moe_offload.offload.kernels import usage
from vllm_moe_offload.offload.kernels.directory import COUNTERS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def triton_count(ids, routed, counts):
    """The Triton kernel itself (count_routing takes torch ops on CPU)."""
    flat = ids.reshape(-1)
    usage._count_kernel[(1,)](flat, flat.numel(), routed, counts, routed.numel(),
                              E=32, HITS=usage._HITS, STEPS=usage._STEPS, BLOCK=usage._BLOCK)


@pytest.mark.parametrize("count", [usage.count_routing, triton_count])
def test_counts_match_bincount_over_steps(count):
    e, k = 24, 4
    gen = torch.Generator().manual_seed(0)
    pin = DEVICE == "cuda"
    routed = torch.zeros(e, dtype=torch.int64, pin_memory=pin)
    counts = torch.zeros(len(COUNTERS), dtype=torch.int64, pin_memory=pin)
    want_routed, want_hits = np.zeros(e, dtype=np.int64), 0
    for t in (1, 3, 300, 7):
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
        count(ids.to(DEVICE), routed, counts)
        per_expert = np.bincount(ids.reshape(-1).numpy(), minlength=e)
        want_routed += per_expert
        want_hits += int((per_expert > 0).sum())
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    assert routed.numpy().tolist() == want_routed.tolist()
    got = dict(zip(COUNTERS, counts.tolist(), strict=True))
    assert got == dict.fromkeys(COUNTERS, 0) | {"hits": want_hits, "steps": 4}
