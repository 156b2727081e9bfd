"""The planner's predicted tok/s against measured end-to-end runs, from measurements only.

The profile is built from measured files, nothing fitted to the offload runs it predicts:
h2d bandwidth from the offload run itself, the grouped-GEMM time against tokens from the
kernel benchmark (CUDA-graph replays), and the non-MoE time per layer (attention, dense
parts, router) from the stock run: stock TPOT / layers - GEMM time, at n = 1 (fixed part)
and n = 64 (per-sequence slope).

usage: python benchmarks/planner_check.py --kernels benchmarks/results/kernels.json
         --stock E2E_STOCK.json --offload E2E_OFFLOAD.json [--out planner_check.json]
"""

import argparse
import json
from dataclasses import replace
from pathlib import Path

from vllm_moe_offload.plan_cli import model_geometry
from vllm_moe_offload.planner import solve
from vllm_moe_offload.profiler import HardwareProfile


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernels", required=True)
    parser.add_argument("--stock", required=True)
    parser.add_argument("--offload", required=True)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    geometry = model_geometry("qwen3-30b-a3b-fp8")
    layers = geometry.num_moe_layers
    kernels = json.loads(Path(args.kernels).read_text())
    gemm_ms = {r["tokens"]: r["ours_ms"] for r in kernels["rows"]}
    stock = {r["scenario"]: r for r in json.loads(Path(args.stock).read_text())["rows"]}
    offload = json.loads(Path(args.offload).read_text())
    profile = HardwareProfile(kernels["card"], offload["bw_h2d_gbs"], gemm_ms)
    rest = {n: stock[s]["tpot_ms_p50"] / layers - profile.gemm_time_ms(n)
            for s, n in (("lat", 1), ("thr", 64))}
    per_seq = (rest[64] - rest[1]) / 63
    profile = replace(profile, layer_overhead_ms=rest[1] - per_seq, attention_ms_per_seq=per_seq)
    rows = []
    for measured in offload["rows"]:
        if measured["scenario"] not in ("lat", "thr"):
            continue
        n = measured["n"]
        predicted = solve(profile, geometry, measured["budget"], n_values=(n,))[0]
        rows.append(dict(scenario=measured["scenario"], budget=measured["budget"], n=n,
                         predicted_tok_s=round(predicted.tok_s, 1),
                         measured_tok_s=measured["tok_s"],
                         error=round(predicted.tok_s / measured["tok_s"] - 1, 3)))
    report = dict(card=kernels["card"], profile=json.loads(profile.to_json()), rows=rows)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"profile: h2d {profile.h2d_gbps} GB/s, non-MoE {profile.layer_overhead_ms:.3f} ms "
          f"per layer + {profile.attention_ms_per_seq * 1e3:.2f} us per sequence")
    print(f"{'scenario':<8} {'budget':>6} {'n':>4} {'predicted':>10} {'measured':>9} {'error':>7}")
    for r in rows:
        print(f"{r['scenario']:<8} {r['budget']:>6.2f} {r['n']:>4} {r['predicted_tok_s']:>10.1f} "
              f"{r['measured_tok_s']:>9.1f} {r['error']:>+7.1%}")


if __name__ == "__main__":
    main()
