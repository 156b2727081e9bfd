"""The planner's recommended num_speculative_tokens against a measured draft-length sweep.

Reads guidellm_sweep.py reports whose rows hold `offload` (k = 0) and `offload+eagle3[kN]`
at one concurrency, fits the per-token acceptance rate a to the measured mean acceptance
lengths (acceptance_length(k) = (1 - a^(k+1)) / (1 - a), least squares over k >= 1), asks
the planner (`solve_spec`, the card's profile) for tok/s against k at that rate and
concurrency, and checks that its recommended k is among the measured best two. Rows carry
predicted and measured tok/s, and the measured and modelled acceptance length and unique
experts per layer step. Where a k was measured more than once its mean counts (all runs are
listed). Writes spec_check.json and spec_check.png (tok/s against k).

usage: python benchmarks/spec_check.py REPORT.json [...] --profile PROFILE.json
         --concurrency 32 [--draft-ms 0] [--out DIR]
(PROFILE: a `vllm-moe-offload plan --out` JSON or planner_check.py's output, whose
"profile" is used; the h2d bandwidth is the reports' own measurement where they have one.)
"""

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

import numpy as np
from guidellm_sweep import check_comparable, mean_h2d_gbps, spec_tokens

from vllm_moe_offload.planning.planner import acceptance_length, solve_spec, unique_experts
from vllm_moe_offload.planning.profiler import HardwareProfile
from vllm_moe_offload.synthetic.checkpoint import model_geometry


def fit_acceptance_rate(lengths: dict[int, float]) -> float:
    """Least-squares a in [0, 1) for the measured mean acceptance length of each k >= 1."""
    grid = np.linspace(0.0, 0.999, 1000)
    errors = [sum((acceptance_length(k, a) - m) ** 2 for k, m in lengths.items()) for a in grid]
    return round(float(grid[int(np.argmin(errors))]), 3)


def measured_by_k(reports: list[tuple[str, dict]], concurrency: int) -> dict[int, list[dict]]:
    """The offload rows (k = 0) and offload+eagle3[kN] rows at `concurrency`, by k."""
    by_k: dict[int, list[dict]] = {}
    for path, report in reports:
        for row in report["rows"]:
            if row["concurrency"] != concurrency or row["system"] in ("stock", "uva"):
                continue  # k = 0 is offload without speculation
            spec_tokens(row["system"], 1)  # refuses a system outside the sweep's
            by_k.setdefault(row["spec_tokens"] or 0, []).append(dict(row, report=path))
    return by_k


def check(by_k: dict[int, list[dict]], profile: HardwareProfile, model: str, share: float,
          concurrency: int, draft_ms: float) -> dict:
    if 0 not in by_k or len(by_k) < 3:
        raise SystemExit(f"need offload (k=0) and at least two k >= 1 at concurrency "
                         f"{concurrency}; have k = {sorted(by_k)}")
    geometry = model_geometry(model)
    lengths = {k: statistics.mean(r["mean_acceptance_length"] for r in rows)
               for k, rows in by_k.items() if k}
    rate = fit_acceptance_rate(lengths)
    predicted = {r.spec_tokens: r for r in solve_spec(
        profile, geometry, share, concurrency, rate, draft_ms, k_values=tuple(sorted(by_k)))}
    measured = {k: statistics.mean(r["stream_tok_s"] for r in rows) for k, rows in by_k.items()}
    recommended = max(predicted.values(), key=lambda r: r.tok_s).spec_tokens
    ranking = sorted(measured, key=measured.get, reverse=True)
    rows = [dict(k=k, predicted_tok_s=round(predicted[k].tok_s, 1),
                 measured_tok_s=round(measured[k], 2),
                 measured_runs=[dict(tok_s=r["stream_tok_s"], report=r["report"])
                                for r in by_k[k]],
                 error=round(predicted[k].tok_s / measured[k] - 1, 3),
                 acceptance_length_measured=lengths.get(k, 1.0),
                 acceptance_length_model=round(acceptance_length(k, rate), 3),
                 unique_per_layer_measured=round(statistics.mean(
                     r["unique_experts_per_layer_step"] for r in by_k[k]), 2),
                 unique_per_layer_model=round(unique_experts(
                     geometry.num_experts, geometry.top_k, concurrency * (k + 1)), 2))
            for k in sorted(by_k)]
    return dict(card=profile.device, model=model, concurrency=concurrency, cache_share=share,
                h2d_gbps=profile.h2d_gbps, draft_ms=draft_ms, fitted_acceptance_rate=rate,
                recommended_k=recommended, measured_ranking=ranking,
                within_best_two=recommended in ranking[:2], rows=rows)


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"no plot: matplotlib is not installed (pip install '.[bench]'); {path} skipped")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = [r["k"] for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, [r["measured_tok_s"] for r in result["rows"]], "o-", label="measured")
    ax.plot(ks, [r["predicted_tok_s"] for r in result["rows"]], "s--", label="planner")
    for r in result["rows"]:
        ax.annotate(f"acc {r['acceptance_length_measured']:.2f}", (r["k"], r["measured_tok_s"]),
                    textcoords="offset points", xytext=(4, -12), fontsize=7)
    ax.axvline(result["recommended_k"], color="grey", alpha=0.4, label="recommended k")
    ax.set_xlabel("num_speculative_tokens k")
    ax.set_ylabel("output tok/s (streams)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{result['card']}, concurrency {result['concurrency']}, cache "
                 f"{result['cache_share']:.0%}, fitted acceptance rate "
                 f"{result['fitted_acceptance_rate']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", help="guidellm_sweep.json files")
    parser.add_argument("--profile", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--model", default="qwen3-30b-a3b-fp8", help="preset or checkpoint dir")
    parser.add_argument("--draft-ms", type=float, default=0.0,
                        help="one draft forward per step, ms (the planner's --draft-ms)")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    reports = [(p, json.loads(Path(p).read_text())) for p in args.reports]
    check_comparable(args.reports, [r for _, r in reports])
    profile = HardwareProfile.from_json(Path(args.profile).read_text())
    if (bandwidth := mean_h2d_gbps([r for _, r in reports])) is not None:
        profile = replace(profile, h2d_gbps=bandwidth)
    result = check(measured_by_k(reports, args.concurrency), profile, args.model,
                   reports[0][1]["budget"], args.concurrency, args.draft_ms)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec_check.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "spec_check.png")
    print(f"{'k':>3} {'acc meas':>8} {'acc model':>9} {'uniq meas':>9} {'uniq model':>10} "
          f"{'predicted':>9} {'measured':>9} {'error':>7}")
    for r in result["rows"]:
        print(f"{r['k']:>3} {r['acceptance_length_measured']:>8.3f} "
              f"{r['acceptance_length_model']:>9.3f} {r['unique_per_layer_measured']:>9.2f} "
              f"{r['unique_per_layer_model']:>10.2f} {r['predicted_tok_s']:>9.1f} "
              f"{r['measured_tok_s']:>9.1f} {r['error']:>+7.1%}")
    print(f"fitted acceptance rate {result['fitted_acceptance_rate']}; recommended k = "
          f"{result['recommended_k']}; measured ranking {result['measured_ranking']}; within "
          f"the best two: {result['within_best_two']}")


if __name__ == "__main__":
    main()
