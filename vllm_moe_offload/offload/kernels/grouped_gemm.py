"""Grouped expert MLP over cache slots, in Triton: the GPU twin of `reference.grouped_experts`.

Algorithm. A layer step routes P = T*K (token, k) pairs. `plan_step` groups them by expert once
per step, each group padded to BLOCK_M rows (vLLM's `moe_align_block_size` on CUDA, one launch
and no host sync; a torch version elsewhere), and quantises the activations once. A step may
run in several passes (the experts resident at once); `run_pass` takes the pass's expert->slot
map on the device, and blocks whose expert maps to -1 return at once, so every pass reuses the
step's grouping. Kernel 1 computes, per block of pairs and tile of the intermediate dimension,
act = silu(x W_gate^T) * (x W_up^T) [P, I]; kernel 2 computes y = w_topk * act W_2^T [P, H]
and writes each pair's row; `combine` sums the top-k rows of each token.
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
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from vllm_moe_offload.offload.kernels.quant import quantize_fp8_groups

FP8_GROUP = 128
# Triton's CPU interpreter (TRITON_INTERPRET=1, used by CI) multiplies bf16 dot operands
# wrongly (seen with Triton 3.9); it gets them upcast to fp32. Compiled kernels never do.
_UPCAST_BF16 = os.environ.get("TRITON_INTERPRET") == "1"


_CONFIG_DIR = Path(__file__).with_name("configs")
logger = logging.getLogger("vllm.moe_offload")  # vLLM formats and prints its children


@functools.cache
def _tuned_configs(device_name: str, capability: tuple[int, int], weight_bytes: int,
                   host: bool) -> list[tuple[int, dict]]:
    """(max pairs, config) rows from configs/<device>,w<bytes>[,host].json, written by
    benchmarks/tune_grouped_gemm.py (`,host`: passes reading missing experts from pinned host
    memory, zero-copy, where PCIe latency and not HBM sets the best tiles). A device never
    tuned takes the table of a tuned one of the same compute capability (an H200 the
    H100's: same SMs, other memory); empty when there is none."""
    suffix = f",w{weight_bytes}{',host' if host else ''}.json"
    path = _CONFIG_DIR / (device_name.replace(" ", "_") + suffix)
    if not path.exists():
        same_arch = [f for f in sorted(_CONFIG_DIR.glob("*" + suffix))
                     if tuple(json.loads(f.read_text()).get("capability", ())) == capability]
        if not same_arch:
            return []
        path = same_arch[0]
        logger.info("grouped GEMM: no tiles tuned on %s; using %s (same architecture); "
                    "python benchmarks/tune_grouped_gemm.py tunes them", device_name, path.name)
    table = json.loads(path.read_text())["configs"]
    return sorted((int(pairs), cfg) for pairs, cfg in table.items())


@functools.cache
def _device(index: int | None) -> tuple[str, tuple[int, int]]:
    """Name and compute capability, queried once per device, not on every layer step."""
    return torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index)


def pick_config(num_pairs: int, weight_bytes: int,
                device: tuple[str, tuple[int, int]] = ("", (0, 0)), host: bool = False) -> dict:
    """Tile sizes for a pass over `num_pairs` pairs: the tuned row for the smallest tuned size
    at or above it (host: the zero-copy table), else a heuristic. Two-byte weights take
    BLOCK_K=64 so kernel 1's three tiles x 3 stages fit in shared memory."""
    for max_pairs, cfg in _tuned_configs(*device, weight_bytes, host):
        if num_pairs <= max_pairs:
            return dict(cfg)
    bk = 128 if weight_bytes == 1 else 64
    if num_pairs <= 64:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=bk, num_warps=4, num_stages=3)
    if num_pairs <= 2048:
        return dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=bk, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=bk, num_warps=8, num_stages=3)


@triton.jit
def _tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid`. GROUP_M = 0: every M-block of an N-block before the
    next N-block, so an expert's weight columns stay in L2 across its M-blocks (decode, few
    pairs); GROUP_M > 0: GROUP_M M-blocks across all N-blocks, so their activation rows stay
    in L2 (prefill, many M-blocks per expert), as vLLM's fused_moe orders its tiles."""
    if GROUP_M == 0:
        return pid % num_m, pid // num_m
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _block_source(pid_m, block_expert_ptr, num_padded_ptr, slot_map_ptr, w_ptr, s_ptr,
                  hw_ptr, hs_ptr, stride_ws, stride_ss, BLOCK_M: tl.constexpr,
                  ZERO_COPY: tl.constexpr):
    """(skip, weights base, scales base) of block pid_m. The pass map gives the expert's slot
    in the pool, HOST (-2: zero-copy) for its record in the pinned host store, read through
    the UVA mapping (the two share one record layout, hence the strides), or SKIP (-1: not
    in this pass; also past the padded end)."""
    in_range = pid_m * BLOCK_M < tl.load(num_padded_ptr)
    expert = tl.load(block_expert_ptr + pid_m, mask=in_range, other=-1).to(tl.int64)
    slot = tl.load(slot_map_ptr + expert, mask=expert >= 0, other=-1).to(tl.int64)
    if ZERO_COPY:
        skip = slot == -1
    else:
        skip = slot < 0  # no host store given: HOST cannot be read
    if slot >= 0:
        w = w_ptr + slot * stride_ws
        s = s_ptr + slot * stride_ss
    else:
        w = hw_ptr + expert * stride_ws
        s = hs_ptr + expert * stride_ss
    return skip, w, s


@triton.jit(do_not_specialize=["num_m"])  # the grid's M-blocks vary with every step
def _w13_silu_kernel(
    # tensors
    x_ptr, x_scale_ptr, w13_ptr, s13_ptr, hw13_ptr, hs13_ptr, act_ptr,
    sorted_pairs_ptr, block_expert_ptr, num_padded_ptr, slot_map_ptr,
    # sizes
    num_pairs, top_k, hidden, inter, num_m,
    # strides
    stride_xt, stride_xst, stride_ws, stride_wn, stride_ss, stride_sn, stride_sk, stride_ap,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    GROUP: tl.constexpr, IS_FP8: tl.constexpr, UPCAST: tl.constexpr, ZERO_COPY: tl.constexpr,
):
    pid_m, pid_n = _tile(tl.program_id(0), num_m, tl.cdiv(inter, BLOCK_N), GROUP_M)
    skip, w_base, s_base = _block_source(pid_m, block_expert_ptr, num_padded_ptr, slot_map_ptr,
                                         w13_ptr, s13_ptr, hw13_ptr, hs13_ptr, stride_ws, stride_ss,
                                         BLOCK_M, ZERO_COPY)
    if skip:
        return
    pair = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pair < num_pairs
    token = tl.where(row_ok, pair // top_k, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of I
    col_ok = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    w_gate = w_base + offs_n[None, :] * stride_wn + offs_k[:, None]
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
            s_k = s_base + (k // GROUP) * stride_sk
            sg = tl.load(s_k + (offs_n // GROUP) * stride_sn, mask=col_ok, other=0.0)
            su = tl.load(s_k + ((offs_n + inter) // GROUP) * stride_sn, mask=col_ok,
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


@triton.jit(do_not_specialize=["num_m"])  # the grid's M-blocks vary with every step
def _w2_kernel(
    # tensors
    a_ptr, a_scale_ptr, w2_ptr, s2_ptr, hw2_ptr, hs2_ptr, y_ptr, topk_weight_ptr,
    sorted_pairs_ptr, block_expert_ptr, num_padded_ptr, slot_map_ptr,
    # sizes
    num_pairs, hidden, inter, num_m,
    # strides
    stride_ap, stride_asp, stride_ws, stride_wn, stride_ss, stride_sn, stride_sk, stride_yp,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    GROUP: tl.constexpr, IS_FP8: tl.constexpr, UPCAST: tl.constexpr, ZERO_COPY: tl.constexpr,
):
    pid_m, pid_n = _tile(tl.program_id(0), num_m, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    skip, w_base, s_base = _block_source(pid_m, block_expert_ptr, num_padded_ptr, slot_map_ptr,
                                         w2_ptr, s2_ptr, hw2_ptr, hs2_ptr, stride_ws, stride_ss,
                                         BLOCK_M, ZERO_COPY)
    if skip:
        return
    pair = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pair < num_pairs
    safe_pair = tl.where(row_ok, pair, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of H
    col_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_base + offs_n[None, :] * stride_wn + offs_k[:, None]
    a_ptrs = a_ptr + safe_pair[:, None] * stride_ap + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, inter, BLOCK_K):
        a = tl.load(a_ptrs + k, mask=row_ok[:, None], other=0.0)  # [BM, BK]
        w = tl.load(w_ptrs + k, mask=col_ok[None, :], other=0.0)  # [BK, BN]
        if IS_FP8:
            a_s = tl.load(a_scale_ptr + safe_pair * stride_asp + k // GROUP)
            s = tl.load(s_base + (offs_n // GROUP) * stride_sn + (k // GROUP) * stride_sk,
                        mask=col_ok, other=0.0)
            acc += tl.dot(a, w) * a_s[:, None] * s[None, :]
        elif UPCAST:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32))
        else:
            acc += tl.dot(a, w)
    routed = tl.load(topk_weight_ptr + safe_pair, mask=row_ok, other=0.0)  # [BM] fp32
    y = (acc * routed[:, None]).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + safe_pair[:, None] * stride_yp + offs_n[None, :], y,
             mask=row_ok[:, None] & col_ok[None, :])


def _vllm_align():
    try:
        from vllm.model_executor.layers.fused_moe.moe_align_block_size import (
            moe_align_block_size,
        )
    except ImportError:
        return None
    return moe_align_block_size


def align_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`moe_align_block_size` in torch ops, without a host sync: the pairs grouped by expert,
    each group padded to block_m rows.

    Returns sorted_pairs [R] (pair ids; P marks padding), block_expert [R / block_m] (the
    expert of each block, -1 past the end) and num_padded [1] (rows in use), R a bound.
    """
    flat = topk_ids.flatten().long()  # [P]
    num_pairs = flat.numel()
    order = torch.argsort(flat, stable=True)  # [P]: pairs grouped by expert
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    start, padded_start = torch.cumsum(counts, 0) - counts, padded_end - padded
    rows = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    sorted_expert = flat[order]
    dest = padded_start[sorted_expert] + torch.arange(num_pairs, device=flat.device) \
        - start[sorted_expert]
    sorted_pairs = torch.full((rows,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_pairs[dest] = order.to(torch.int32)
    block_start = torch.arange(0, rows, block_m, device=flat.device)
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_pairs, block_expert, padded_end[-1:].to(torch.int32)


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's `moe_align_block_size` on CUDA (the grouping stock vLLM's fused MoE uses), else
    `align_torch`. Same contract: pair ids grouped by expert and padded with P up to
    num_padded rows; past num_padded neither the ids nor the block experts are read (vLLM
    leaves them unset and its sorted ids need not be a multiple of BLOCK_M long)."""
    if topk_ids.is_cuda and (vllm_align := _vllm_align()) is not None:
        return vllm_align(topk_ids.to(torch.int32), block_m, num_experts)
    return align_torch(topk_ids, num_experts, block_m)


@dataclass
class StepPlan:
    """One layer step's pairs grouped by expert and its quantised activations, shared by the
    step's passes. y [P, H] holds each pair's routed-weighted output row."""

    x: torch.Tensor  # [T, H] (FP8 when is_fp8)
    x_scale: torch.Tensor  # [T, H / 128] fp32 (FP8), else x again
    topk_weights: torch.Tensor  # [P] fp32
    sorted_pairs: torch.Tensor
    block_expert: torch.Tensor
    num_padded: torch.Tensor
    act: torch.Tensor  # [P, I]
    y: torch.Tensor  # [P, H]
    top_k: int
    is_fp8: bool
    config: dict

    @property
    def num_pairs(self) -> int:
        return self.y.shape[0]


def plan_step(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              weights: dict[str, torch.Tensor], block: tuple[int, int] | None,
              num_experts: int, y: torch.Tensor | None = None,
              config: dict | None = None, zero_copy: bool = False) -> StepPlan:
    """hidden [T, H]; topk_weights, topk_ids [T, K]; weights: typed slot views (for the shape
    and dtype); y: the output rows [P, H] if the caller keeps them, else allocated;
    config: tiles and their order (BLOCK_M/N/K, GROUP_M, num_warps, num_stages) instead of
    `pick_config`'s;
    zero_copy: the step's pass reads missing experts from host memory (tiles tuned for it)."""
    t, h = hidden.shape
    k = topk_ids.shape[1]
    w13, w2 = weights["w13"], weights["w2"]
    inter = w2.shape[2]
    is_fp8 = block is not None
    device = _device(hidden.device.index) if hidden.is_cuda else ("", (0, 0))
    cfg = dict(config) if config else pick_config(t * k, w13.element_size(), device, zero_copy)
    assert w13.stride(2) == 1 and w2.stride(2) == 1, "weights need unit stride along K"
    assert h % cfg["BLOCK_K"] == 0 and inter % cfg["BLOCK_K"] == 0, (h, inter, cfg)
    assert not is_fp8 or (tuple(block) == (FP8_GROUP, FP8_GROUP)
                          and FP8_GROUP % cfg["BLOCK_K"] == 0)
    sorted_pairs, block_expert, num_padded = align(topk_ids, num_experts, cfg["BLOCK_M"])
    hidden = hidden.contiguous()
    x, x_scale = quantize_fp8_groups(hidden, FP8_GROUP) if is_fp8 else (hidden, hidden)
    if y is None:
        y = torch.empty(t * k, h, dtype=hidden.dtype, device=hidden.device)
    act = torch.empty(t * k, inter, dtype=hidden.dtype, device=hidden.device)
    return StepPlan(x, x_scale, topk_weights.reshape(-1).float().contiguous(), sorted_pairs,
                    block_expert, num_padded, act, y, k, is_fp8, cfg)


def run_pass(plan: StepPlan, weights: dict[str, torch.Tensor], slot_map: torch.Tensor,
             host_weights: dict[str, torch.Tensor] | None = None) -> None:
    """Writes plan.y's rows of the pairs whose expert the pass map slot_map ([E] int32 on the
    device) places in a slot, or marks HOST (-2) when host_weights are given; SKIP (-1) rows
    are left as they are.

    host_weights (zero-copy): the layer's typed views of the pinned host store ([E, ...], the
    pool's record layout); HOST experts are read from there, over PCIe."""
    cfg = dict(plan.config)
    bm, bn, bk = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    group_m = cfg.pop("GROUP_M", 0)  # tables tuned before GROUP_M existed: order 0
    w13, w2 = weights["w13"], weights["w2"]  # [S, 2I, H], [S, H, I]
    is_fp8, act, y = plan.is_fp8, plan.act, plan.y
    num_pairs, h = y.shape
    inter = act.shape[1]
    s13 = weights["s13"] if is_fp8 else w13  # scale pointers are unused without FP8
    s2 = weights["s2"] if is_fp8 else w13
    zero_copy = host_weights is not None
    host = host_weights if zero_copy else weights  # unread unless zero-copy
    hw13, hw2 = host["w13"], host["w2"]
    hs13 = host["s13"] if is_fp8 else hw13
    hs2 = host["s2"] if is_fp8 else hw13
    assert not zero_copy or (hw13.stride() == w13.stride() and hw2.stride() == w2.stride()
                             and hs13.stride() == s13.stride() and hs2.stride() == s2.stride()
                             ), "store and pool layouts differ"
    grid_m = min(plan.block_expert.numel(), plan.sorted_pairs.numel() // bm)
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, GROUP=FP8_GROUP,
                IS_FP8=is_fp8, UPCAST=_UPCAST_BF16, ZERO_COPY=zero_copy, **cfg)
    x, xs = plan.x, plan.x_scale
    _w13_silu_kernel[(grid_m * triton.cdiv(inter, bn),)](
        x, xs, w13, s13, hw13, hs13, act, plan.sorted_pairs, plan.block_expert,
        plan.num_padded, slot_map, num_pairs, plan.top_k, h, inter, grid_m,
        x.stride(0), xs.stride(0), w13.stride(0), w13.stride(1),
        s13.stride(0), s13.stride(1), s13.stride(2) if is_fp8 else 0, act.stride(0), **meta)
    a, a_scale = quantize_fp8_groups(act, FP8_GROUP) if is_fp8 else (act, act)
    _w2_kernel[(grid_m * triton.cdiv(h, bn),)](
        a, a_scale, w2, s2, hw2, hs2, y, plan.topk_weights, plan.sorted_pairs, plan.block_expert,
        plan.num_padded, slot_map, num_pairs, h, inter, grid_m,
        a.stride(0), a_scale.stride(0), w2.stride(0), w2.stride(1),
        s2.stride(0), s2.stride(1), s2.stride(2) if is_fp8 else 0, y.stride(0), **meta)


def combine(plan: StepPlan, out: torch.Tensor) -> None:
    """out [T, H] = the sum of each token's top-k rows, accumulated in fp32 (as vLLM's
    moe_sum, which is this same reduction for top-k > 4)."""
    torch.sum(plan.y.view(out.shape[0], plan.top_k, -1), dim=1, out=out)


def slot_map_of(experts: list[int], slots: list[int], num_experts: int,
                device) -> torch.Tensor:
    """[E] int32 on `device`: slots[i] for experts[i], -1 elsewhere (tests and benchmarks;
    the layer keeps its maps in reusable pinned buffers)."""
    host = torch.full((num_experts,), -1, dtype=torch.int32)
    host[torch.tensor(experts, dtype=torch.long)] = torch.tensor(slots, dtype=torch.int32)
    return host.to(device)


def grouped_experts_triton(hidden: torch.Tensor, topk_weights: torch.Tensor,
                           topk_ids: torch.Tensor, experts: list[int], slots: list[int],
                           weights: dict[str, torch.Tensor], block: tuple[int, int] | None,
                           y: torch.Tensor, num_experts: int,
                           config: dict | None = None) -> None:
    """One pass in one call: writes into y [T*K, H] the routed-weighted outputs of the pairs
    routed to `experts` (held in `slots`); other rows are left as they are."""
    plan = plan_step(hidden, topk_weights, topk_ids, weights, block, num_experts, y, config)
    run_pass(plan, weights, slot_map_of(experts, slots, num_experts, hidden.device))
