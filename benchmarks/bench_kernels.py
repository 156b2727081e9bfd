"""Our grouped GEMM over a slot pool vs vLLM's `fused_experts` over the same pool (expert map),
and vs the HBM roofline of the bytes each must read. CUDA only.

Shape: Qwen3-30B-A3B experts (H=2048, I=768, E=128, top-8), FP8 with 128x128 block scales.
Routing: uniform random top-8 per token. Both are timed from the routed ids on the device to the
combined output: grouping (vLLM's moe_align_block_size for both), activation quantisation, the
two GEMMs and the top-k sum; as CUDA-graph replays (device time, as in vLLM's decode graphs;
`*_ms`) and as eager calls (`*_eager_ms`, host launch overhead included).

usage: python benchmarks/bench_kernels.py [--out benchmarks/results/kernels.json]
"""

import argparse
import functools
import json
import subprocess
import time

import torch
import triton

from vllm_moe_offload.offload.kernels import grouped_gemm
from vllm_moe_offload.offload.store import ExpertLayout

H, INTER, E, K = 2048, 768, 128, 8
TOKENS = [1, 8, 64, 256, 1024, 4096]


def hbm_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=200)
    return 2 * x.numel() / (ms * 1e-3)


def make_pool(layout: ExpertLayout) -> dict[str, torch.Tensor]:
    pool = torch.empty(E, layout.record_bytes, dtype=torch.uint8, device="cuda")
    views = layout.views(pool)
    views["w13"].copy_((torch.randn(E, 2 * INTER, H, device="cuda") * 8).clamp(-448, 448))
    views["w2"].copy_((torch.randn(E, H, INTER, device="cuda") * 8).clamp(-448, 448))
    views["s13"].copy_(torch.rand_like(views["s13"]) * 1e-3)
    views["s2"].copy_(torch.rand_like(views["s2"]) * 1e-3)
    return views


def vllm_fused(views, slot_map):
    from vllm.model_executor.layers.fused_moe import fused_experts
    from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config
    quant = fp8_w8a8_moe_quant_config(w1_scale=views["s13"], w2_scale=views["s2"],
                                      block_shape=[128, 128])

    def run(x, topk_w, topk_ids):
        return fused_experts(x, views["w13"], views["w2"], topk_w, topk_ids,
                             global_num_experts=E, expert_map=slot_map, quant_config=quant)
    return run


def run_ours(x, topk_w, topk_ids, views, block, slot_map, out):
    plan = grouped_gemm.plan_step(x, topk_w, topk_ids, views, block, E)
    grouped_gemm.run_pass(plan, views, slot_map)
    grouped_gemm.combine(plan, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/kernels.json")
    args = parser.parse_args()
    layout = ExpertLayout(H, INTER, torch.float8_e4m3fn, (128, 128))
    views = make_pool(layout)
    slots = torch.randperm(E).tolist()  # expert e lives in slot slots[e]
    slot_map = torch.tensor(slots, dtype=torch.int32, device="cuda")
    fused = vllm_fused(views, slot_map)
    bw = hbm_bandwidth()
    rows = []
    for t in TOKENS:
        x = torch.randn(t, H, device="cuda", dtype=torch.bfloat16)
        topk_ids = torch.rand(t, E, device="cuda").argsort(dim=1)[:, :K].to(torch.int32)
        topk_w = torch.softmax(torch.rand(t, K, device="cuda"), dim=1)
        experts = torch.unique(topk_ids).tolist()
        out = torch.empty(t, H, dtype=torch.bfloat16, device="cuda")
        ours = functools.partial(run_ours, x, topk_w, topk_ids, views, layout.block, slot_map,
                                 out)
        ref = fused(x, topk_w, topk_ids).float()
        rel = ((ours().float() - ref).norm() / ref.norm()).item()
        theirs = functools.partial(fused, x, topk_w, topk_ids)
        ms_ours, ms_vllm = (triton.testing.do_bench_cudagraph(f, rep=100, return_mode="median")
                            for f in (ours, theirs))
        eager_ours, eager_vllm = (triton.testing.do_bench(f, warmup=25, rep=100)
                                  for f in (ours, theirs))
        nbytes = len(experts) * (3 * H * INTER) + 2 * t * H * 2  # weights once + x in, out
        roof_ms = nbytes / bw * 1e3
        rows.append(dict(tokens=t, unique_experts=len(experts), ours_ms=ms_ours,
                         vllm_fused_experts_ms=ms_vllm, ours_eager_ms=eager_ours,
                         vllm_fused_experts_eager_ms=eager_vllm, roofline_ms=roof_ms,
                         ours_over_roofline=ms_ours / roof_ms, speedup_vs_vllm=ms_vllm / ms_ours,
                         rel_err_vs_vllm=rel))
    meta = dict(card=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"),
                torch=torch.__version__, triton=triton.__version__,
                commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                      capture_output=True, text=True).stdout.strip(),
                hbm_gbs=bw / 1e9, shape=dict(H=H, I=INTER, E=E, K=K, dtype="fp8 block 128"))
    try:
        import vllm
        meta["vllm"] = vllm.__version__
    except ImportError:
        pass
    with open(args.out, "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=2)
    print(f"{meta['card']}  HBM {bw / 1e9:.0f} GB/s (copy)")
    print("graph: device time of CUDA-graph replays; eager: with host launch overhead")
    print(f"{'tokens':>7} {'experts':>7} {'ours ms':>9} {'vllm ms':>9} {'roof ms':>9} "
          f"{'x roof':>7} {'vs vllm':>8} {'eager ours':>10} {'eager vllm':>10} {'rel err':>8}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['unique_experts']:>7} {r['ours_ms']:>9.3f} "
              f"{r['vllm_fused_experts_ms']:>9.3f} {r['roofline_ms']:>9.3f} "
              f"{r['ours_over_roofline']:>7.2f} {r['speedup_vs_vllm']:>7.2f}x "
              f"{r['ours_eager_ms']:>10.3f} {r['vllm_fused_experts_eager_ms']:>10.3f} "
              f"{r['rel_err_vs_vllm']:>8.1e}")


if __name__ == "__main__":
    main()
