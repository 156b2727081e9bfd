"""Tunes the grouped GEMM's tile sizes on this GPU for the Qwen3-30B-A3B expert shape and
writes vllm_moe_offload/offload/kernels/configs/<device>,w<bytes>[,host].json (read by
`pick_config`).
--host tunes the zero-copy pass instead: every expert is read from pinned host memory through
its device address, as zero-copy decode reads the missing ones (decode sizes only); it also
prints the pass's effective PCIe rate next to a pinned copy's.

Every candidate is timed on the same inputs (uniform random top-8 routing) over a whole layer
step (grouping, quantisation, both GEMMs, top-k sum) replayed as a CUDA graph
(triton.testing.do_bench_cudagraph, median), as decode steps run in vLLM: device time, not
launch overhead, picks the tiles. Configs that do not compile are skipped.

usage: python benchmarks/tune_grouped_gemm.py [--dtype fp8|bf16] [--host]
"""

import argparse
import functools
import itertools
import json
import time

import torch
import triton

from vllm_moe_offload.offload.kernels import grouped_gemm
from vllm_moe_offload.offload.store import ExpertLayout
from vllm_moe_offload.planning.profiler import measure_h2d_gbps

H, INTER, E, K = 2048, 768, 128, 8
TOKENS = [1, 4, 16, 64, 256, 1024, 4096]
HOST_TOKENS = [1, 4, 16, 64, 256]  # zero-copy runs only in decode graphs


def candidates(weight_bytes: int, host: bool = False):
    bk = 128 if weight_bytes == 1 else 64
    if host:  # PCIe reads: many narrow tiles in flight, deeper pipelines to hide the latency
        tiles, depths = [(16, 16), (16, 32), (16, 64), (16, 128), (32, 32), (32, 64)], [2, 3, 4, 5]
    else:  # narrow N tiles give a few-token step more CTAs to spread its weight reads over
        tiles = [(16, 32)] + list(itertools.product([16, 32, 64, 128], [64, 128]))
        depths = [3, 4]
    for (bm, bn), warps, stages in itertools.product(tiles, [4, 8], depths):
        yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        if not host and bm >= 64:  # prefill: keep 16 M-blocks' activations in L2 (vLLM's order)
            yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=16, num_warps=warps,
                       num_stages=stages)
    if not host:  # decode: vLLM's H100/H200 tables pipeline its 16-row tiles 5 deep
        for bn, warps in itertools.product([32, 64, 128], [4, 8]):
            yield dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=5)


def step(x, topk_w, topk_ids, views, block, slot_map, out, cfg, host_views=None):
    plan = grouped_gemm.plan_step(x, topk_w, topk_ids, views, block, E, config=cfg)
    grouped_gemm.run_pass(plan, views, slot_map, host_views)
    grouped_gemm.combine(plan, out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="fp8", choices=["fp8", "bf16"])
    parser.add_argument("--host", action="store_true", help="tune the zero-copy pass")
    args = parser.parse_args()
    fp8 = args.dtype == "fp8"
    layout = ExpertLayout(H, INTER, torch.float8_e4m3fn if fp8 else torch.bfloat16,
                          (128, 128) if fp8 else None)
    pool = torch.randint(0, 0x3F, (E, layout.record_bytes), dtype=torch.uint8, device="cuda")
    views = layout.views(pool)  # small finite FP8 / BF16 values; scales set below
    if fp8:
        views["s13"].fill_(1e-2)
        views["s2"].fill_(1e-2)
    identity = torch.arange(E, dtype=torch.int32, device="cuda")  # expert e in slot e
    slot_map, host_views = identity, None
    if args.host:  # no expert has a slot: all come over PCIe
        slot_map = torch.full_like(identity, -1)
        host_views = layout.views(pool.cpu().pin_memory())
        copy_gbs = measure_h2d_gbps(layout.record_bytes, "cuda")
    table = {}
    for t in HOST_TOKENS if args.host else TOKENS:
        x = torch.randn(t, H, device="cuda", dtype=torch.bfloat16)
        topk_ids = torch.rand(t, E, device="cuda").argsort(dim=1)[:, :K].to(torch.int32)
        topk_w = torch.softmax(torch.rand(t, K, device="cuda"), dim=1)
        out = torch.empty(t, H, dtype=torch.bfloat16, device="cuda")
        best = None
        for cfg in candidates(layout.weight_dtype.itemsize, args.host):
            run = functools.partial(step, x, topk_w, topk_ids, views, layout.block, slot_map,
                                    out, cfg, host_views)
            try:
                ms = triton.testing.do_bench_cudagraph(run, rep=40, return_mode="median")
            except Exception:  # out of shared memory or registers: not a candidate here
                continue
            if best is None or ms < best[0]:
                best = (ms, cfg)
        table[str(t * K)] = best[1]
        rate = ""
        if args.host:
            gbs = topk_ids.unique().numel() * layout.record_bytes / best[0] / 1e6
            rate = f"  {gbs:.1f} GB/s over PCIe (pinned copies: {copy_gbs:.1f})"
        print(f"tokens {t:>5}: {best[0]:.3f} ms  {best[1]}{rate}", flush=True)
    name = torch.cuda.get_device_name().replace(" ", "_")
    suffix = ",host" if args.host else ""
    path = grouped_gemm._CONFIG_DIR / f"{name},w{layout.weight_dtype.itemsize}{suffix}.json"
    path.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                "capability": list(torch.cuda.get_device_capability()),
                                "date": time.strftime("%Y-%m-%d"),
                                "shape": dict(H=H, I=INTER, E=E, K=K), "configs": table},
                               indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
