"""Copies the experts a directory update chose to fill (kernels/directory.py) from the pinned
host store into their cache slots, on the device: the count and the (expert, slot) pairs are
in device memory, so no host decision is needed and the copy can be captured in a CUDA graph.

Algorithm: the records are viewed as int64 words; a fixed grid of programs walks the
num_fills x chunks work items (one chunk: CHUNK words of one record), reading the host record
through its device address (UVA, ~51 GB/s on Hopper against the copy engine's ~55) and writing
the slot. The grid is sized for PCIe, not for the work: programs with no item return at once.

`fill_torch` is the same copy in torch (the CPU path, and the kernel's reference).
"""

import torch
import triton
import triton.language as tl

_CHUNK = 2048  # int64 words: 16 KiB per work item
_PROGRAMS = 64  # enough loads in flight to keep PCIe busy


@triton.jit
def _fill_kernel(src_ptr, dst_ptr, fill_expert_ptr, fill_slot_ptr, num_fills_ptr,
                 record_words, CHUNK: tl.constexpr):
    chunks = tl.cdiv(record_words, CHUNK)
    total = tl.load(num_fills_ptr) * chunks
    for item in range(tl.program_id(0), total, tl.num_programs(0)):
        fill = item // chunks
        offs = (item % chunks) * CHUNK + tl.arange(0, CHUNK)
        mask = offs < record_words
        expert = tl.load(fill_expert_ptr + fill).to(tl.int64)
        slot = tl.load(fill_slot_ptr + fill).to(tl.int64)
        words = tl.load(src_ptr + expert * record_words + offs, mask=mask)
        tl.store(dst_ptr + slot * record_words + offs, words, mask=mask)


def fill(store_records: torch.Tensor, pool: torch.Tensor, fill_expert: torch.Tensor,
         fill_slot: torch.Tensor, num_fills: torch.Tensor) -> None:
    """pool[fill_slot[i]] = store_records[fill_expert[i]] for i < num_fills, on the device.
    store_records [E, R] uint8 (the layer's pinned host records), pool [S, R] uint8 on the
    device; fill_expert, fill_slot [>= num_fills] int32, num_fills [1] int32 on the device."""
    assert store_records.dtype == pool.dtype == torch.uint8
    assert store_records.shape[1] == pool.shape[1] and pool.shape[1] % 8 == 0
    assert store_records.is_contiguous() and pool.is_contiguous()
    words = pool.shape[1] // 8
    _fill_kernel[(_PROGRAMS,)](store_records.view(torch.int64), pool.view(torch.int64),
                               fill_expert, fill_slot, num_fills, words, CHUNK=_CHUNK,
                               num_warps=4)


def fill_torch(store_records, pool, fill_expert, fill_slot, num_fills) -> None:
    """`fill` in torch ops (reads num_fills on the host)."""
    n = int(num_fills)
    if n:
        experts = fill_expert[:n].long().to(store_records.device)
        pool[fill_slot[:n].long()] = store_records[experts].to(pool.device)
