"""The directory update (kernels/directory.py), in Triton (the interpreter on CPU) and in torch,
leaves the same cache state as the sequential host model of the rule (policies.DirectoryModel)
after every step of random traces: slots, scores, last uses, clock, the fill list, the pass
maps and the counters."""

import pytest
import torch

from vllm_moe_offload.offload.kernels import directory
from vllm_moe_offload.offload.kernels.directory import COUNTERS, HOST, SKIP
from vllm_moe_offload.offload.policies import DirectoryModel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def state(num_experts: int, slots: list[int]) -> dict[str, torch.Tensor]:
    slot = torch.full((num_experts,), -1, dtype=torch.int32)
    slot[:len(slots)] = torch.tensor(slots, dtype=torch.int32)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    return dict(slot=slot.to(DEVICE), score=torch.zeros(num_experts, **i32),
                last=torch.zeros(num_experts, **i32), clock=torch.zeros(1, **i32),
                fill_expert=torch.full((num_experts,), -7, **i32),
                fill_slot=torch.full((num_experts,), -7, **i32),
                num_fills=torch.zeros(1, **i32), first=torch.zeros(num_experts, **i32),
                second=torch.zeros(num_experts, **i32),
                routed=torch.zeros(num_experts, dtype=torch.int64,
                                   pin_memory=DEVICE == "cuda"),
                counters=torch.zeros(len(COUNTERS), dtype=torch.int64,
                                     pin_memory=DEVICE == "cuda"))


def expected_maps(model: DirectoryModel, before: dict, fills, reads, hits, num_experts):
    first = [SKIP] * num_experts
    second = [SKIP] * num_experts
    for e in hits:
        first[e] = before[e]
    for e, slot in fills:
        second[e] = slot
    for e in reads:
        second[e] = HOST
    return first, second


@pytest.mark.parametrize("num_experts,quota,top_k", [(16, 6, 4), (128, 32, 8), (100, 20, 6)])
@pytest.mark.parametrize("update", [directory.update, directory.update_torch],
                         ids=["triton", "torch"])
def test_update_matches_the_host_model(num_experts, quota, top_k, update):
    gen = torch.Generator().manual_seed(num_experts + quota)
    slots = [1000 + 3 * i for i in range(quota)]  # the layer's slots: any ids
    model = DirectoryModel(num_experts, slots)
    st = state(num_experts, slots)
    counters = dict.fromkeys(COUNTERS, 0)
    routed = torch.zeros(num_experts, dtype=torch.int64)
    # skewed routing so that experts come back, with batches from 1 token to a prefill
    weights = torch.rand(num_experts, generator=gen) ** 4 + 0.01
    for tokens in [1, 1, 2, 3, 1, 8, 1, 1, 64, 1, 4, 2, 1, 1, 16, 1, 300, 1, 1, 2] * 3:
        ids = torch.stack([torch.multinomial(weights, top_k, generator=gen)
                           for _ in range(tokens)])  # [T, K], distinct per token
        before = dict(model.slot)
        fills, reads, hits = model.step(ids.numpy())
        update(ids.to(DEVICE), **st)
        n = int(st["num_fills"])
        assert n == len(fills)
        got = list(zip(st["fill_expert"][:n].tolist(), st["fill_slot"][:n].tolist(),
                       strict=True))
        assert got == fills
        first, second = expected_maps(model, before, fills, reads, hits, num_experts)
        assert st["first"].tolist() == first and st["second"].tolist() == second
        want_slot = [-1] * num_experts
        for e, s in model.slot.items():
            want_slot[e] = s
        assert st["slot"].tolist() == want_slot
        assert st["score"].tolist() == model.score and st["last"].tolist() == model.last
        assert int(st["clock"]) == model.clock
        for key, value in zip(COUNTERS, (len(hits), len(fills) + len(reads), len(fills),
                                         len(reads), len(fills), 1), strict=True):
            counters[key] += value
        routed += torch.bincount(ids.reshape(-1), minlength=num_experts)
    assert dict(zip(COUNTERS, st["counters"].tolist(), strict=True)) == counters
    assert torch.equal(st["routed"].cpu(), routed)
    assert counters["fills"] > 0 and counters["reads"] > 0 and counters["hits"] > 0


def test_a_slot_is_never_shared_and_routed_experts_are_never_evicted():
    num_experts, quota = 32, 8
    model = DirectoryModel(num_experts, list(range(quota)))
    gen = torch.Generator().manual_seed(3)
    for _ in range(200):
        ids = torch.randint(num_experts, (int(torch.randint(1, 6, (1,), generator=gen)), 2),
                            generator=gen)
        before = dict(model.slot)
        fills, reads, hits = model.step(ids.numpy())
        assert sorted(model.slot.values()) == list(range(quota))  # every slot held, once
        routed = set(ids.reshape(-1).tolist())
        assert all(e in model.slot and model.slot[e] == before[e] for e in hits)
        assert set(before) - set(model.slot) <= set(before) - routed
        assert {e for e, _ in fills} | set(reads) == routed - set(before)


@pytest.mark.parametrize("update", [directory.update, directory.update_torch],
                         ids=["triton", "torch"])
def test_ids_outside_the_experts_never_count(update):
    """Rows that are not real tokens may carry any id: -1, or one past the experts (which in
    the kernel falls in the padding lanes of its power-of-two width)."""
    slots = [10, 11, 12]
    clean, noisy = state(6, slots), state(6, slots)
    ids = torch.tensor([[0, 4], [5, 1]])
    update(ids.to(DEVICE), **clean)
    update(torch.tensor([[0, 4], [5, 1], [-1, 6], [7, -1]]).to(DEVICE), **noisy)
    for key in ("slot", "score", "last", "first", "second", "routed", "counters"):
        assert torch.equal(clean[key].cpu(), noisy[key].cpu()), key
