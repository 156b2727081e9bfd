"""The end-to-end benchmark's bookkeeping, without an engine: scenario names, the merged
report's order, bound and efficiency."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_e2e import scenario_shape  # noqa: E402
from e2e_report import merge  # noqa: E402


def test_scenarios_by_name_and_concurrency():
    assert scenario_shape("lat") == (1, 128, 256)
    assert scenario_shape("ttft") == (16, 2048, 16)
    assert scenario_shape("n32") == (32, 128, 256)
    for bad in ("n0", "n", "x8", "thr2"):
        with pytest.raises(SystemExit, match="unknown scenario"):
            scenario_shape(bad)


def run(system, rows, bw=50.0):
    return {"card": "GPU", "date": "d", "model": "m", "bw_h2d_gbs": bw,
            "rows": [dict(system=system, routing="uniform_random", **r) for r in rows]}


def test_report_orders_rows_and_bounds_offload_by_the_pcie_bytes():
    stock = run("stock", [{"scenario": s, "tok_s": 100.0} for s in ("n16", "thr", "n4", "lat")])
    offload = run("offload25", [{"scenario": "lat", "tok_s": 10.0, "pcie_gb_per_tok": 0.5}])
    report = merge([stock, offload])
    assert [(r["scenario"], r["system"]) for r in report["rows"]] == [
        ("lat", "offload25"), ("lat", "stock"), ("thr", "stock"), ("n4", "stock"),
        ("n16", "stock")]
    row = report["rows"][0]
    # 0.5 GB at 50 GB/s (10 ms) + stock's 10 ms per token: 50 tok/s, of which 10 measured
    assert row["bound_tok_s"] == 50.0 and row["efficiency"] == 0.2
