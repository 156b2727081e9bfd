"""The fill kernel (kernels/fill.py), in Triton (the interpreter on CPU) and in torch, copies
exactly the listed host records into the listed slots and nothing else."""

import pytest
import torch

from vllm_moe_offload.offload.kernels import fill

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("copy", [fill.fill, fill.fill_torch], ids=["triton", "torch"])
@pytest.mark.parametrize("record_bytes,num_fills", [(256, 3), (8 * 2048 * 2 + 512, 5),
                                                    (1024, 0)])
def test_fills_the_listed_slots_only(copy, record_bytes, num_fills):
    gen = torch.Generator().manual_seed(record_bytes + num_fills)
    experts, slots = 9, 7
    store = torch.randint(0, 256, (experts, record_bytes), dtype=torch.uint8, generator=gen)
    if DEVICE == "cuda":
        store = store.pin_memory()
    pool = torch.randint(0, 256, (slots, record_bytes), dtype=torch.uint8,
                         generator=gen).to(DEVICE)
    before = pool.clone()
    chosen = torch.randperm(experts, generator=gen)[:num_fills].to(torch.int32)
    targets = torch.randperm(slots, generator=gen)[:num_fills].to(torch.int32)
    fill_expert = torch.full((experts,), -5, dtype=torch.int32)  # unused rows: never read
    fill_slot = torch.full((experts,), -5, dtype=torch.int32)
    fill_expert[:num_fills], fill_slot[:num_fills] = chosen, targets
    copy(store, pool, fill_expert.to(DEVICE), fill_slot.to(DEVICE),
         torch.tensor([num_fills], dtype=torch.int32, device=DEVICE))
    expected = before.cpu()
    for e, s in zip(chosen.tolist(), targets.tolist(), strict=True):
        expected[s] = store[e]
    assert torch.equal(pool.cpu(), expected)
