"""The planner's predicted tok/s against measured end-to-end runs, from measurements only.

The profile is built from measured files, nothing fitted to the offload runs it predicts:
h2d bandwidth from each offload run itself, the grouped-GEMM time against tokens from the
kernel benchmark (CUDA-graph replays), the non-MoE time per layer (attention, dense parts,
router) from the stock run: stock TPOT / layers - GEMM time, at n = 1 (fixed part) and
n = 64 (per-sequence slope), and the fixed cost of the plugin's layer step beyond the GEMM
(directory update, fill fork and join) that `vllm-moe-offload plan` measured on the same card
(--profile; its `layer_overhead_ms` less its router; measured eagerly, so an upper bound for
the graph replays decode runs).

Rows: every lat, thr and nN scenario of the offload runs. For a run with a concurrency sweep
(nN scenarios) it also checks the planner's recommended --max-num-seqs: the n of highest
predicted tok/s among the swept ones, and whether its measured tok/s is within 10% of the best.

usage: python benchmarks/planner_check.py --kernels benchmarks/results/kernels.json
         --stock E2E_STOCK.json --offload E2E_OFFLOAD.json [...] [--profile PLAN.json]
         [--out planner_check.json]
"""

import argparse
import json
from dataclasses import replace
from pathlib import Path

from vllm_moe_offload.planning.planner import recommend, solve
from vllm_moe_offload.planning.profiler import HardwareProfile
from vllm_moe_offload.synthetic.checkpoint import model_geometry

WITHIN_BEST = 0.9  # issue 4: the recommended n measures within 10% of the sweep's best


def card_profile(path: str | None) -> HardwareProfile | None:
    """The card's measured profile (a `plan --out` JSON or a bare HardwareProfile JSON)."""
    if not path:
        return None
    return HardwareProfile.from_json(Path(path).read_text())


def step_overhead_ms(card: HardwareProfile | None) -> float:
    """What the plugin's layer step adds to stock's time: the profiled step less its router,
    which stock's non-MoE time holds already; 0 without a profile."""
    return card.layer_overhead_ms - card.router_ms if card else 0.0


def base_profile(kernels: dict, stock_rows: dict, layers: int) -> HardwareProfile:
    gemm_ms = {r["tokens"]: r["ours_ms"] for r in kernels["rows"]}
    profile = HardwareProfile(kernels["card"], 0.0, gemm_ms)
    rest = {n: stock_rows[s]["tpot_ms_p50"] / layers - profile.gemm_time_ms(n)
            for s, n in (("lat", 1), ("thr", 64))}
    per_seq = (rest[64] - rest[1]) / 63
    return replace(profile, layer_overhead_ms=rest[1] - per_seq, attention_ms_per_seq=per_seq)


def check_run(run: dict, base: HardwareProfile, geometry,
              card: HardwareProfile | None = None) -> dict:
    """Predicted against measured rows of one offload run, and its sweep's recommendation;
    `card` (the card's measured profile) prices the layer step beyond the GEMM."""
    rows = [r for r in run["rows"] if r["scenario"] in ("lat", "thr")
            or r["scenario"].startswith("n")]
    system = rows[0]["system"] if rows else "?"
    overhead = step_overhead_ms(card)
    profile = replace(base, h2d_gbps=run["bw_h2d_gbs"],
                      layer_overhead_ms=base.layer_overhead_ms + overhead)

    def predict(budget: float, n: int):
        return solve(profile, geometry, budget, n_values=(n,))[0]

    out = []
    for measured in rows:
        predicted = predict(measured["budget"], measured["n"])
        out.append(dict(system=system, scenario=measured["scenario"], budget=measured["budget"],
                        n=measured["n"], predicted_tok_s=round(predicted.tok_s, 1),
                        measured_tok_s=measured["tok_s"],
                        error=round(predicted.tok_s / measured["tok_s"] - 1, 3)))
    result = dict(system=system, h2d_gbps=profile.h2d_gbps, step_overhead_ms=overhead,
                  rows=out)
    sweep = {r["n"]: r["measured_tok_s"] for r in out if r["scenario"].startswith("n")}
    if len(sweep) > 1:
        budget = next(r["budget"] for r in out if r["scenario"].startswith("n"))
        chosen = recommend([predict(budget, n) for n in sorted(sweep)])
        best = max(sweep, key=sweep.get)
        result.update(recommended_max_num_seqs=chosen.n, measured_best_n=best,
                      recommended_share_of_best=round(sweep[chosen.n] / sweep[best], 3),
                      within_best_10pct=sweep[chosen.n] >= WITHIN_BEST * sweep[best])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernels", required=True)
    parser.add_argument("--stock", required=True)
    parser.add_argument("--offload", required=True, nargs="+")
    parser.add_argument("--profile", default=None,
                        help="`vllm-moe-offload plan --out` JSON of the same card: the "
                             "layer step's fixed cost beyond the GEMM")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    geometry = model_geometry("qwen3-30b-a3b-fp8")
    kernels = json.loads(Path(args.kernels).read_text())
    stock = {r["scenario"]: r for r in json.loads(Path(args.stock).read_text())["rows"]}
    base = base_profile(kernels, stock, geometry.num_moe_layers)
    card = card_profile(args.profile)
    runs = [check_run(json.loads(Path(f).read_text()), base, geometry, card)
            for f in args.offload]
    report = dict(card=kernels["card"], profile=json.loads(base.to_json()), runs=runs)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"non-MoE {base.layer_overhead_ms:.3f} ms per layer + "
          f"{base.attention_ms_per_seq * 1e3:.2f} us per sequence; layer step "
          f"+{step_overhead_ms(card):.3f} ms")
    print(f"{'system':<20} {'scenario':<8} {'budget':>6} {'n':>4} {'predicted':>10} "
          f"{'measured':>9} {'error':>7}")
    for run in runs:
        for r in run["rows"]:
            print(f"{r['system']:<20} {r['scenario']:<8} {r['budget']:>6.2f} {r['n']:>4} "
                  f"{r['predicted_tok_s']:>10.1f} {r['measured_tok_s']:>9.1f} {r['error']:>+7.1%}")
        if "recommended_max_num_seqs" in run:
            print(f"{run['system']}: recommended --max-num-seqs {run['recommended_max_num_seqs']}"
                  f", measured best n={run['measured_best_n']}, share of best "
                  f"{run['recommended_share_of_best']:.0%}")


if __name__ == "__main__":
    main()
