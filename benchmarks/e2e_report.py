"""Merges runs of bench_e2e.py (one JSON per system) into the report of benchmarks.md: one JSON
with the physical bound and efficiency of every offload row, a table, and a PNG.

bound_tok_s = 1 / (pcie_bytes_per_token / bw_h2d + 1 / stock_tok_s): the PCIe time of the bytes
the row moved per token, plus the stock system's time per token in the same scenario (its
step time at the same concurrency), bw_h2d measured in the row's own run.
vs_uva: a row's tok/s over the uva row's of the same scenario, routing and budget (for ttft:
uva's median TTFT over the row's, so > 1 is better).
Runs of several routings merge into one report, each row labelled with its routing.

usage: python benchmarks/e2e_report.py RUN.json [RUN.json ...] --out benchmarks/results/e2e
       (writes e2e.json and e2e.png)
"""

import argparse
import json
import subprocess
from pathlib import Path

ORDER = ["lat", "thr", "ttft"]


def scenario_key(name: str) -> tuple[int, int]:
    """lat, thr, ttft, then the concurrency sweep's nN by N."""
    return (ORDER.index(name), 0) if name in ORDER else (len(ORDER), int(name[1:]))


def merge(runs: list[dict]) -> dict:
    rows = [dict(r, bw_h2d_gbs=run["bw_h2d_gbs"]) for run in runs for r in run["rows"]]
    stock = {(r["scenario"], r["routing"]): r for r in rows if r["system"] == "stock"}
    uva = {(r["scenario"], r["routing"], r.get("budget")): r for r in rows
           if r["system"].startswith("uva")}
    for r in rows:
        base = stock.get((r["scenario"], r["routing"]))
        if "pcie_gb_per_tok" in r and base and r["bw_h2d_gbs"]:
            per_tok_s = r["pcie_gb_per_tok"] / r["bw_h2d_gbs"] + 1 / base["tok_s"]
            r["bound_tok_s"] = round(1 / per_tok_s, 2)
            r["efficiency"] = round(r["tok_s"] * per_tok_s, 3)
        ref = uva.get((r["scenario"], r["routing"], r.get("budget")))
        if ref is not None and ref is not r:
            r["vs_uva"] = round(ref["ttft_ms_p50"] / r["ttft_ms_p50"] if r["scenario"] == "ttft"
                                else r["tok_s"] / ref["tok_s"], 3)
    first = runs[0]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return dict(card=first["card"], vllm=first.get("vllm"), commit=commit, date=first["date"],
                model=first["model"], routing=sorted({r["routing"] for r in rows}),
                bw_h2d_gbs=sorted(run["bw_h2d_gbs"] for run in runs)[len(runs) // 2],
                rows=sorted(rows, key=lambda r: (r["routing"], scenario_key(r["scenario"]),
                                                 r["system"])))


def table(report: dict) -> str:
    head = (f"{'routing':<9} {'scenario':<8} {'system':<18} {'tok/s':>9} {'ttft p50':>9} "
            f"{'tpot p50':>9} {'hit':>6} {'GB/tok':>7} {'stall/st':>8} {'bound':>8} {'eff':>6} "
            f"{'vs uva':>7}")
    lines = [f"{report['card']}, vLLM {report['vllm']}, bw_h2d {report['bw_h2d_gbs']} GB/s",
             head]

    def f(v, fmt):
        width = int(fmt.split(".")[0])
        return format(v, fmt) if isinstance(v, (int, float)) else "-".rjust(width)
    for r in report["rows"]:
        lines.append(f"{r['routing']:<9} {r['scenario']:<8} {r['system']:<18} "
                     f"{f(r['tok_s'], '9.1f')} "
                     f"{f(r.get('ttft_ms_p50'), '9.0f')} {f(r.get('tpot_ms_p50'), '9.2f')} "
                     f"{f(r.get('hit_rate'), '6.3f')} {f(r.get('pcie_gb_per_tok'), '7.3f')} "
                     f"{f(r.get('stall_ms_per_step'), '8.2f')} {f(r.get('bound_tok_s'), '8.1f')} "
                     f"{f(r.get('efficiency'), '6.2f')} {f(r.get('vs_uva'), '7.2f')}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    routings = sorted({r["routing"] for r in report["rows"]})
    fig, grid = plt.subplots(len(routings), 2, figsize=(12, 4.5 * len(routings)),
                             squeeze=False)
    for axes, routing in zip(grid, routings, strict=True):
        _plot_routing(axes, [r for r in report["rows"] if r["routing"] == routing], routing)
    fig.suptitle(f"Qwen3-30B-A3B-FP8 shape on {report['card']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plot_routing(axes, rows: list[dict], routing: str) -> None:
    systems = sorted({r["system"] for r in rows})
    scenarios = sorted({r["scenario"] for r in rows}, key=scenario_key)
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        by = {r["scenario"]: r for r in rows if r["system"] == system}
        xs = [j + i * width for j, s in enumerate(scenarios) if s in by]
        color = f"C{i}"  # one colour per system in both panels
        axes[0].bar(xs, [by[s]["tok_s"] for s in scenarios if s in by], width, label=system,
                    color=color)
        if "ttft" in by and by["ttft"].get("ttft_ms_p50"):
            ttft_s = by["ttft"]["ttft_ms_p50"] / 1e3
            axes[1].bar(i, ttft_s, color=color)
            axes[1].annotate(f"{ttft_s:.2f}", (i, ttft_s), ha="center", va="bottom")
    axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(scenarios))], scenarios)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("output tokens/s (log)")
    axes[0].set_title(f"{routing} routing: lat 1 seq, thr 64 seqs, nN N seqs")
    axes[0].legend(fontsize=8)
    axes[1].set_xticks(range(len(systems)), systems, rotation=20, fontsize=8)
    axes[1].set_ylabel("median TTFT, s")
    axes[1].set_title(f"{routing} routing: ttft, 16 x 2048-token prompts")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", default="benchmarks/results/e2e")
    args = parser.parse_args()
    report = merge([json.loads(Path(p).read_text()) for p in args.runs])
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    print(table(report))


if __name__ == "__main__":
    main()
