"""Grouped expert MLP over cache slots, in Triton: the GPU twin of `reference.grouped_experts`.

Algorithm. A step routes P = T*K (token, k) pairs. For one pass (a set of experts resident in
known slots), `plan_blocks` groups the pass's pairs by expert and pads each group to BLOCK_M
rows: for up to HOST_PLAN_MAX_PAIRS pairs on the host, from the expert ids that the op's one
sync already brought, shipped in one async copy; for more, on the device without a sync.
Kernel 1 computes, per block of pairs and tile of the intermediate dimension,
act = silu(x W_gate^T) * (x W_up^T) [P, I]; kernel 2 computes
y = w_topk * act W_2^T [P, H] and writes each pair's row, so out = y.view(T, K, H).sum(1).
Weights are read straight from the slot pool: the block's slot selects the expert.

FP8 (e4m3, 128x128 block scales): activations are quantised per token and 128-channel group
before each GEMM, by vLLM's own quantiser on CUDA (kernels/quant.py); each BLOCK_K step adds
dot(a_q, w_q) * a_scale * w_scale. Intermediates are rounded to the activation dtype where
vLLM's caches round them (after GEMM1, after SiLU*mul, after GEMM2's routed-weight multiply).

Assumptions (asserted in the wrappers): weights contiguous per slot with unit stride in K,
H and I multiples of BLOCK_K, FP8 groups of 128 with BLOCK_K dividing 128.
Dimensions: T tokens, K top-k, P = T*K pairs, E experts, H hidden, I intermediate, S slots.
"""

import functools
import json
import os
from pathlib import Path

import numpy as np
import torch
import triton
import triton.language as tl

from vllm_moe_offload.kernels.quant import quantize_fp8_groups

FP8_GROUP = 128
# Up to this many pairs the block plan is built on the host (numpy, a few microseconds per
# hundred pairs, no launches); above it the argsort costs more than a dozen device launches.
HOST_PLAN_MAX_PAIRS = 2048
# Triton's CPU interpreter (TRITON_INTERPRET=1, used by CI) multiplies bf16 dot operands
# wrongly (seen with Triton 3.9); it gets them upcast to fp32. Compiled kernels never do.
_UPCAST_BF16 = os.environ.get("TRITON_INTERPRET") == "1"


_CONFIG_DIR = Path(__file__).with_name("configs")


@functools.cache
def _tuned_configs(device_name: str, weight_bytes: int) -> list[tuple[int, dict]]:
    """(max pairs, config) rows from configs/<device>,w<bytes>.json, written by
    benchmarks/tune_grouped_gemm.py; empty when this device was never tuned."""
    path = _CONFIG_DIR / f"{device_name.replace(' ', '_')},w{weight_bytes}.json"
    if not path.exists():
        return []
    table = json.loads(path.read_text())["configs"]
    return sorted((int(pairs), cfg) for pairs, cfg in table.items())


@functools.cache
def _device_name(index: int | None) -> str:
    """Queried once per device, not on every layer step."""
    return torch.cuda.get_device_name(index)


def pick_config(num_pairs: int, weight_bytes: int, device_name: str = "") -> dict:
    """Tile sizes for a pass over `num_pairs` pairs: the tuned row for the smallest tuned size
    at or above it, else a heuristic. Two-byte weights take BLOCK_K=64 so kernel 1's three
    tiles x 3 stages fit in shared memory."""
    for max_pairs, cfg in _tuned_configs(device_name, weight_bytes):
        if num_pairs <= max_pairs:
            return dict(cfg)
    bk = 128 if weight_bytes == 1 else 64
    if num_pairs <= 64:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=bk, num_warps=4, num_stages=3)
    if num_pairs <= 2048:
        return dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=bk, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=bk, num_warps=8, num_stages=3)


@triton.jit
def _w13_silu_kernel(
    # tensors
    x_ptr, x_scale_ptr, w13_ptr, s13_ptr, act_ptr,
    sorted_pairs_ptr, block_group_ptr, group_slot_ptr,
    # sizes
    num_pairs, top_k, hidden, inter,
    # strides
    stride_xt, stride_xst, stride_ws, stride_wn, stride_ss, stride_sn, stride_sk, stride_ap,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, IS_FP8: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.load(block_group_ptr + pid_m)
    if group < 0:  # past the last block (device plans bound the grid from above)
        return
    slot = tl.load(group_slot_ptr + group).to(tl.int64)
    pair = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pair < num_pairs
    token = tl.where(row_ok, pair // top_k, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of I
    col_ok = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    w_gate = w13_ptr + slot * stride_ws + offs_n[None, :] * stride_wn + offs_k[:, None]
    w_up = w_gate + inter * stride_wn
    a_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :]
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, hidden, BLOCK_K):
        a = tl.load(a_ptrs + k, mask=row_ok[:, None], other=0.0)  # [BM, BK]
        wg = tl.load(w_gate + k, mask=col_ok[None, :], other=0.0)  # [BK, BN]
        wu = tl.load(w_up + k, mask=col_ok[None, :], other=0.0)
        if IS_FP8:
            a_s = tl.load(x_scale_ptr + token * stride_xst + k // GROUP)  # [BM]
            s_base = s13_ptr + slot * stride_ss + (k // GROUP) * stride_sk
            sg = tl.load(s_base + (offs_n // GROUP) * stride_sn, mask=col_ok, other=0.0)
            su = tl.load(s_base + ((offs_n + inter) // GROUP) * stride_sn, mask=col_ok,
                         other=0.0)
            acc_gate += tl.dot(a, wg) * a_s[:, None] * sg[None, :]
            acc_up += tl.dot(a, wu) * a_s[:, None] * su[None, :]
        elif UPCAST:
            acc_gate += tl.dot(a.to(tl.float32), wg.to(tl.float32))
            acc_up += tl.dot(a.to(tl.float32), wu.to(tl.float32))
        else:
            acc_gate += tl.dot(a, wg)
            acc_up += tl.dot(a, wu)
    out_ty = act_ptr.dtype.element_ty
    gate = acc_gate.to(out_ty).to(tl.float32)
    up = acc_up.to(out_ty).to(tl.float32)
    act = (gate * tl.sigmoid(gate) * up).to(out_ty)
    tl.store(act_ptr + pair[:, None] * stride_ap + offs_n[None, :], act,
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _w2_kernel(
    # tensors
    a_ptr, a_scale_ptr, w2_ptr, s2_ptr, y_ptr, topk_weight_ptr,
    sorted_pairs_ptr, block_group_ptr, group_slot_ptr,
    # sizes
    num_pairs, hidden, inter,
    # strides
    stride_ap, stride_asp, stride_ws, stride_wn, stride_ss, stride_sn, stride_sk, stride_yp,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, IS_FP8: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.load(block_group_ptr + pid_m)
    if group < 0:
        return
    slot = tl.load(group_slot_ptr + group).to(tl.int64)
    pair = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pair < num_pairs
    safe_pair = tl.where(row_ok, pair, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of H
    col_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w2_ptr + slot * stride_ws + offs_n[None, :] * stride_wn + offs_k[:, None]
    a_ptrs = a_ptr + safe_pair[:, None] * stride_ap + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, inter, BLOCK_K):
        a = tl.load(a_ptrs + k, mask=row_ok[:, None], other=0.0)  # [BM, BK]
        w = tl.load(w_ptrs + k, mask=col_ok[None, :], other=0.0)  # [BK, BN]
        if IS_FP8:
            a_s = tl.load(a_scale_ptr + safe_pair * stride_asp + k // GROUP)
            s = tl.load(s2_ptr + slot * stride_ss + (offs_n // GROUP) * stride_sn
                        + (k // GROUP) * stride_sk, mask=col_ok, other=0.0)
            acc += tl.dot(a, w) * a_s[:, None] * s[None, :]
        elif UPCAST:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32))
        else:
            acc += tl.dot(a, w)
    routed = tl.load(topk_weight_ptr + safe_pair, mask=row_ok, other=0.0)  # [BM] fp32
    y = (acc * routed[:, None]).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + safe_pair[:, None] * stride_yp + offs_n[None, :], y,
             mask=row_ok[:, None] & col_ok[None, :])


def plan_blocks(ids: np.ndarray, experts: list[int], num_experts: int,
                block_m: int) -> tuple[np.ndarray, np.ndarray]:
    """Groups the pairs routed to `experts` by expert, each group padded to block_m rows.

    ids: the step's expert ids per pair, [P] on the host (the op's one sync brought them).
    Returns sorted_pairs [R] (pair ids; P marks padding) and block_group [R / block_m] (the
    index into `experts` of each block's expert).
    """
    num_pairs = ids.size
    group_of = np.full(num_experts, -1, dtype=np.int64)
    group_of[experts] = np.arange(len(experts))
    group = group_of[ids]  # [P]
    chosen = np.flatnonzero(group >= 0)
    order = chosen[np.argsort(group[chosen], kind="stable")]  # pairs, grouped by expert
    counts = np.bincount(group[chosen], minlength=len(experts))  # [G]
    padded = -(-counts // block_m) * block_m
    rank = np.arange(order.size) - np.repeat(np.cumsum(counts) - counts, counts)
    dest = np.repeat(np.cumsum(padded) - padded, counts) + rank
    sorted_pairs = np.full(int(padded.sum()), num_pairs, dtype=np.int32)
    sorted_pairs[dest] = order
    block_group = np.repeat(np.arange(len(experts), dtype=np.int32), padded // block_m)
    return sorted_pairs, block_group


def plan_blocks_device(topk_ids: torch.Tensor, group_of_expert: torch.Tensor,
                       num_groups: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups this pass's pairs by expert group, each padded to block_m rows. No host sync.

    topk_ids [T, K]; group_of_expert [E] int32: the pass's group (0..num_groups-1) or -1.
    Returns sorted_pairs [R] (pair ids, P marks padding) and block_group [R / block_m]
    (the group of each block, -1 past the end), with R a bound known on the host.
    """
    flat = topk_ids.flatten()  # [P]
    num_pairs = flat.numel()
    group = group_of_expert[flat].long()  # [P]
    valid = group >= 0
    key = torch.where(valid, group, num_groups)  # invalid pairs sort last
    order = torch.argsort(key, stable=True)  # [P]
    counts = torch.zeros(num_groups + 1, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_groups]  # [G]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)  # [G]
    start, padded_start = torch.cumsum(counts, 0) - counts, padded_end - padded
    rows = num_pairs + num_groups * (block_m - 1)
    rows = (rows + block_m - 1) // block_m * block_m
    sorted_key = key[order]  # [P]
    rank = torch.arange(num_pairs, device=flat.device) - start.index_select(
        0, sorted_key.clamp(max=num_groups - 1))
    dest = padded_start.index_select(0, sorted_key.clamp(max=num_groups - 1)) + rank
    dest = torch.where(sorted_key < num_groups, dest, rows)  # invalid pairs: dropped below
    sorted_pairs = torch.full((rows + 1,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_pairs.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(0, rows, block_m, device=flat.device)
    block_group = torch.searchsorted(padded_end, block_start, right=True)  # [R / block_m]
    block_group = torch.where(block_group < num_groups, block_group, -1).to(torch.int32)
    return sorted_pairs[:rows], block_group


def _to_device(arrays: list[np.ndarray], device) -> list[torch.Tensor]:
    """One pinned, asynchronous host->device copy for several small int32 arrays."""
    host = torch.from_numpy(np.concatenate(arrays).astype(np.int32))
    if host.numel() and torch.cuda.is_available():
        host = host.pin_memory()
    flat = host.to(device, non_blocking=True)
    return list(torch.split(flat, [a.size for a in arrays]))


def grouped_experts_triton(hidden: torch.Tensor, topk_weights: torch.Tensor,
                           topk_ids: torch.Tensor, experts: list[int], slots: list[int],
                           weights: dict[str, torch.Tensor], block: tuple[int, int] | None,
                           y: torch.Tensor, num_experts: int,
                           topk_ids_host: np.ndarray | None = None,
                           config: dict | None = None) -> None:
    """Writes into y [T*K, H] the routed-weighted outputs of the pairs routed to `experts`
    (held in `slots`); other rows are left as they are. out = y.view(T, K, H).sum(1).

    hidden [T, H]; topk_weights (fp32), topk_ids [T, K]; weights: typed slot views;
    config: tile sizes (BLOCK_M/N/K, num_warps, num_stages) instead of `pick_config`'s.
    """
    t, h = hidden.shape
    k = topk_ids.shape[1]
    w13, w2 = weights["w13"], weights["w2"]  # [S, 2I, H], [S, H, I]
    inter = w2.shape[2]
    is_fp8 = block is not None
    cfg = dict(config) if config else pick_config(
        t * k, w13.element_size(), _device_name(hidden.device.index) if hidden.is_cuda else "")
    bm, bn, bk = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    assert w13.stride(2) == 1 and w2.stride(2) == 1, "weights need unit stride along K"
    assert h % bk == 0 and inter % bk == 0, (h, inter, bk)
    assert not is_fp8 or (tuple(block) == (FP8_GROUP, FP8_GROUP) and FP8_GROUP % bk == 0)
    device = hidden.device
    if t * k <= HOST_PLAN_MAX_PAIRS:
        ids = (topk_ids_host if topk_ids_host is not None
               else topk_ids.cpu().numpy()).reshape(-1)
        sorted_pairs, block_group = plan_blocks(ids, experts, num_experts, bm)
        if block_group.size == 0:
            return
        sorted_pairs, block_group, group_slot = _to_device(
            [sorted_pairs, block_group, np.asarray(slots)], device)
    else:
        group_of_expert = np.full(num_experts, -1, dtype=np.int32)
        group_of_expert[experts] = np.arange(len(experts))
        group_of_expert, group_slot = _to_device([group_of_expert, np.asarray(slots)], device)
        sorted_pairs, block_group = plan_blocks_device(topk_ids, group_of_expert, len(experts),
                                                       bm)
    num_pairs = t * k
    hidden = hidden.contiguous()
    x, x_scale = quantize_fp8_groups(hidden, FP8_GROUP) if is_fp8 else (hidden, hidden)
    dummy = w13  # scale pointers are unused without FP8
    s13 = weights["s13"] if is_fp8 else dummy
    s2 = weights["s2"] if is_fp8 else dummy
    act = torch.empty(num_pairs, inter, dtype=hidden.dtype, device=device)  # [P, I]
    grid1 = (block_group.numel(), triton.cdiv(inter, bn))
    _w13_silu_kernel[grid1](
        x, x_scale, w13, s13, act, sorted_pairs, block_group, group_slot,
        num_pairs, k, h, inter,
        x.stride(0), x_scale.stride(0), w13.stride(0), w13.stride(1),
        s13.stride(0), s13.stride(1), s13.stride(2) if is_fp8 else 0, act.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=FP8_GROUP, IS_FP8=is_fp8,
        UPCAST=_UPCAST_BF16, **cfg)
    a, a_scale = quantize_fp8_groups(act, FP8_GROUP) if is_fp8 else (act, act)
    grid2 = (block_group.numel(), triton.cdiv(h, bn))
    _w2_kernel[grid2](
        a, a_scale, w2, s2, y, topk_weights.contiguous(), sorted_pairs, block_group, group_slot,
        num_pairs, h, inter,
        a.stride(0), a_scale.stride(0), w2.stride(0), w2.stride(1),
        s2.stride(0), s2.stride(1), s2.stride(2) if is_fp8 else 0, y.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=FP8_GROUP, IS_FP8=is_fp8,
        UPCAST=_UPCAST_BF16, **cfg)
