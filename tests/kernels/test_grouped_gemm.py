"""The Triton grouped GEMM against the pure-torch reference on fresh random inputs.

CPU: runs under TRITON_INTERPRET=1 (set before Triton is imported) at small shapes; CUDA: the
same tests, plus the Qwen3-30B-A3B expert shape.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vllm_moe_offload.offload.kernels import grouped_gemm
from vllm_moe_offload.offload.kernels.directory import HOST, SKIP  # noqa: E402
from vllm_moe_offload.offload.kernels.grouped_gemm import grouped_experts_triton  # noqa: E402
from vllm_moe_offload.offload.kernels.reference import grouped_experts, route  # noqa: E402
from vllm_moe_offload.offload.store import ExpertLayout  # noqa: E402
from vllm_moe_offload.synthetic.checkpoint import quantize_fp8_block  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's interpreter truncates fp32 -> bf16 instead of rounding to nearest (seen with Triton
# 3.9): about 0.4% per rounding, four roundings per expert. Compiled kernels round to nearest.
REL_TOL = 1e-2 if DEVICE == "cuda" else 2.5e-2
SHAPES = [(256, 128, 12, 4)]  # H, I, E, K
if DEVICE == "cuda":
    SHAPES.append((2048, 768, 128, 8))


def random_pool(layout: ExpertLayout, slots: int, gen: torch.Generator) -> torch.Tensor:
    pool = torch.empty(slots, layout.record_bytes, dtype=torch.uint8)
    views = layout.views(pool)
    h, inter = layout.hidden, layout.inter
    for s in range(slots):
        w13 = torch.randn(2 * inter, h, generator=gen) / h ** 0.5
        w2 = torch.randn(h, inter, generator=gen) / inter ** 0.5
        if layout.is_fp8:
            (g, gs), (u, us) = quantize_fp8_block(w13[:inter]), quantize_fp8_block(w13[inter:])
            q2, s2 = quantize_fp8_block(w2)
            views["w13"][s].copy_(torch.cat([g, u]))
            views["s13"][s].copy_(torch.cat([gs, us]))
            views["w2"][s].copy_(q2)
            views["s2"][s].copy_(s2)
        else:
            views["w13"][s].copy_(w13)
            views["w2"][s].copy_(w2)
    return pool.to(DEVICE)


ALIGNS = ["torch", "vllm"] if DEVICE == "cuda" else ["torch"]


@pytest.mark.parametrize("align", ALIGNS)
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, tokens, fp8, align, monkeypatch):
    if align == "torch":
        monkeypatch.setattr(grouped_gemm, "_vllm_align", lambda: None)
    h, inter, e, k = shape
    gen = torch.Generator().manual_seed(tokens * 2 + fp8)
    layout = ExpertLayout(h, inter, torch.float8_e4m3fn if fp8 else torch.bfloat16,
                          (128, 128) if fp8 else None)
    slots_total = e + 3
    pool = random_pool(layout, slots_total, gen)
    weights = layout.views(pool)
    hidden = torch.randn(tokens, h, generator=gen).bfloat16().to(DEVICE)
    topk_w, topk_ids = route(torch.randn(tokens, e, generator=gen).to(DEVICE), k, True)
    routed = torch.unique(topk_ids).tolist()
    # an expert map with holes: this pass holds every other routed expert, in shuffled slots
    experts = routed[::2]
    slot_ids = torch.randperm(slots_total, generator=gen)[:len(experts)].tolist()
    y = torch.full((tokens * k, h), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    grouped_experts_triton(hidden, topk_w, topk_ids, experts, slot_ids, weights,
                           layout.block, y, num_experts=e)
    in_pass = torch.isin(topk_ids.flatten(), torch.tensor(experts, device=DEVICE))
    assert torch.isnan(y[~in_pass].float()).all(), "rows of other experts must stay untouched"
    assert torch.isfinite(y[in_pass].float()).all(), "every row of the pass must be written"
    out = y.float().nan_to_num(0.0).view(tokens, k, h).sum(1)
    ref = torch.zeros(tokens, h, dtype=torch.float32, device=DEVICE)
    grouped_experts(hidden, topk_w, topk_ids, experts, slot_ids, weights, layout.block, ref)
    rel = (out - ref).norm() / ref.norm()
    assert rel < REL_TOL, rel


@pytest.mark.parametrize("tokens", [1, 5, 300])
def test_align_torch_groups_every_pair_once(tokens):
    e, k, bm = 12, 4, 16
    gen = torch.Generator().manual_seed(tokens)
    topk_ids = torch.rand(tokens, e, generator=gen).argsort(dim=1)[:, :k].to(DEVICE)
    sorted_pairs, block_expert, num_padded = grouped_gemm.align_torch(topk_ids, e, bm)
    p, rows = tokens * k, int(num_padded)
    assert rows % bm == 0 and rows <= sorted_pairs.numel()
    used = sorted_pairs[:rows].cpu()
    assert sorted(used[used < p].tolist()) == list(range(p))  # each pair exactly once
    assert (sorted_pairs[rows:].cpu() == p).all()  # padding past the rows in use
    flat = topk_ids.flatten().cpu()
    for b in range(rows // bm):
        pairs = used[b * bm:(b + 1) * bm]
        pairs = pairs[pairs < p]
        assert (flat[pairs] == int(block_expert[b])).all()  # a block holds one expert's pairs


def test_passes_share_one_plan():
    """Two passes over one step (as the layer runs hot-first) equal one pass over all."""
    h, inter, e, k, tokens = 256, 128, 12, 4, 9
    gen = torch.Generator().manual_seed(3)
    layout = ExpertLayout(h, inter, torch.bfloat16)
    weights = layout.views(random_pool(layout, e, gen))
    hidden = torch.randn(tokens, h, generator=gen).bfloat16().to(DEVICE)
    topk_w, topk_ids = route(torch.randn(tokens, e, generator=gen).to(DEVICE), k, True)
    routed = torch.unique(topk_ids).tolist()
    both = []
    for groups in ([routed], [routed[::2], routed[1::2]]):
        plan = grouped_gemm.plan_step(hidden, topk_w, topk_ids, weights, None, e)
        for group in groups:
            grouped_gemm.run_pass(plan, weights,
                                  grouped_gemm.slot_map_of(group, group, e, DEVICE))
        out = torch.empty(tokens, h, dtype=torch.bfloat16, device=DEVICE)
        grouped_gemm.combine(plan, out)
        both.append(out)
    assert torch.isfinite(both[0].float()).all()
    assert torch.equal(both[0], both[1])


@pytest.mark.parametrize("fp8", [False, True])
def test_tile_order_leaves_every_result_bit_unchanged(fp8):
    """GROUP_M only reorders the programs: each output tile is computed once, the same way,
    whatever the order (a wrong mapping leaves tiles unwritten or writes some twice)."""
    h, inter, e, k, tokens = 256, 128, 12, 4, 150
    gen = torch.Generator().manual_seed(5)
    layout = ExpertLayout(h, inter, torch.float8_e4m3fn if fp8 else torch.bfloat16,
                          (128, 128) if fp8 else None)
    weights = layout.views(random_pool(layout, e, gen))
    hidden = torch.randn(tokens, h, generator=gen).bfloat16().to(DEVICE)
    topk_w, topk_ids = route(torch.randn(tokens, e, generator=gen).to(DEVICE), k, True)
    experts = list(range(e))
    outs = []
    for group_m in (0, 1, 3, 64):  # 0: M-blocks fastest; 64: more than the M-blocks there are
        config = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128 if fp8 else 64, GROUP_M=group_m,
                      num_warps=4, num_stages=2)
        y = torch.full((tokens * k, h), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        grouped_experts_triton(hidden, topk_w, topk_ids, experts, experts, weights,
                               layout.block, y, num_experts=e, config=config)
        assert torch.isfinite(y.float()).all(), group_m
        outs.append(y)
    for y in outs[1:]:
        assert torch.equal(outs[0], y)


@pytest.mark.parametrize("fp8", [False, True])
def test_zero_copy_pass_reads_host_experts_from_the_host_store(fp8):
    """One pass over a map placing half the experts in slots, marking some HOST and leaving the
    rest SKIP computes, with the host store's views, exactly the rows of the slot and HOST
    experts that a pass with every expert in the pool computes, and leaves the others."""
    h, inter, e, k, tokens = 256, 128, 12, 4, 9
    gen = torch.Generator().manual_seed(7 + fp8)
    layout = ExpertLayout(h, inter, torch.float8_e4m3fn if fp8 else torch.bfloat16,
                          (128, 128) if fp8 else None)
    host = random_pool(layout, e, gen).cpu()  # the store: expert i in record i
    if DEVICE == "cuda":
        host = host.pin_memory()
    order = torch.randperm(e, generator=gen).tolist()
    slots, skipped = order[:e // 2], order[-2:]  # the experts between: HOST
    pool = torch.empty(e // 2, layout.record_bytes, dtype=torch.uint8)
    for s, expert in enumerate(slots):
        pool[s] = host[expert]
    pool = pool.to(DEVICE)
    weights, host_weights = layout.views(pool), layout.views(host)
    pass_map = torch.full((e,), HOST, dtype=torch.int32)
    pass_map[slots] = torch.arange(len(slots), dtype=torch.int32)
    pass_map[skipped] = SKIP
    hidden = torch.randn(tokens, h, generator=gen).bfloat16().to(DEVICE)
    topk_w, topk_ids = route(torch.randn(tokens, e, generator=gen).to(DEVICE), k, True)
    y = torch.full((tokens * k, h), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    plan = grouped_gemm.plan_step(hidden, topk_w, topk_ids, weights, layout.block, e, y)
    grouped_gemm.run_pass(plan, weights, pass_map.to(DEVICE), host_weights)
    # the same step with every expert in the pool (tested against the reference above)
    full = torch.empty_like(y)
    everything = list(range(e))
    all_weights = layout.views(host.to(DEVICE))
    plan = grouped_gemm.plan_step(hidden, topk_w, topk_ids, all_weights, layout.block, e, full)
    grouped_gemm.run_pass(plan, all_weights,
                          grouped_gemm.slot_map_of(everything, everything, e, DEVICE))
    computed = ~torch.isin(topk_ids.reshape(-1).cpu(), torch.tensor(skipped))
    assert computed.any() and not computed.all()
    assert torch.equal(y[computed.to(DEVICE)], full[computed.to(DEVICE)])
    assert torch.isnan(y[~computed.to(DEVICE)].float()).all(), "SKIP rows are left as they are"
