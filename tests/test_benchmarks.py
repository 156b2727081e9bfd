"""The end-to-end benchmark's bookkeeping, without an engine: scenario names, the merged
report's order, bound and efficiency, and the planner check's modes and recommendation."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_e2e import scenario_shape  # noqa: E402
from e2e_report import merge  # noqa: E402
from planner_check import check_run  # noqa: E402

from vllm_moe_offload.planning.planner import solve  # noqa: E402
from vllm_moe_offload.planning.profiler import HardwareProfile  # noqa: E402
from vllm_moe_offload.synthetic.checkpoint import model_geometry  # noqa: E402


def test_systems_name_their_budget(tmp_path):
    import json

    from bench_e2e import engine_kwargs
    from guidellm_sweep import server_kwargs

    from vllm_moe_offload.synthetic.checkpoint import PRESETS, hf_config
    (tmp_path / "config.json").write_text(json.dumps(hf_config(PRESETS["qwen3-30b-a3b-fp8"])))
    offload = engine_kwargs("offload25", Path("m"), 28.0)["additional_config"]["expert_offload"]
    assert offload == {"enabled": True, "cache_gb": 7.0}
    assert engine_kwargs("uva50", Path("m"), 28.0)["cpu_offload_gb"] == pytest.approx(
        29.0 * 0.5 * 0.93)
    for bad in ("offload25+auto", "offload25+zerocopy", "offload", "uva"):
        with pytest.raises(SystemExit, match="unknown system"):
            engine_kwargs(bad, Path("m"), 28.0)
    served = server_kwargs("offload", tmp_path, None, 0.25, "dummy", False)
    assert served["additional_config"]["expert_offload"]["enabled"] is True
    assert served["load_format"] == "dummy"


def test_scenarios_by_name_and_concurrency():
    assert scenario_shape("lat") == (1, 128, 256)
    assert scenario_shape("ttft") == (16, 2048, 16)
    assert scenario_shape("n32") == (32, 128, 64)
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


def test_report_compares_each_routing_with_its_own_uva_row():
    rows = []
    for routing, uva_tok_s in (("uniform", 30.0), ("realistic", 40.0)):
        for system, tok_s, ttft in (("uva25", uva_tok_s, 9000.0), ("offload25", 60.0, 3000.0)):
            rows += [dict(system=system, routing=routing, budget=0.25, scenario="lat",
                          tok_s=tok_s),
                     dict(system=system, routing=routing, budget=0.25, scenario="ttft",
                          tok_s=1.0, ttft_ms_p50=ttft)]
    report = merge([{"card": "GPU", "date": "d", "model": "m", "bw_h2d_gbs": 50.0,
                     "rows": rows}])
    assert report["routing"] == ["realistic", "uniform"]
    ratios = {(r["routing"], r["scenario"], r["system"]): r.get("vs_uva")
              for r in report["rows"]}
    assert ratios[("uniform", "lat", "offload25")] == 2.0
    assert ratios[("realistic", "lat", "offload25")] == 1.5
    assert ratios[("realistic", "ttft", "offload25")] == 3.0  # uva's TTFT over ours
    assert ratios[("uniform", "lat", "uva25")] is None


def sweep_run(system, tok_s_by_n, budget=0.25):
    return {"bw_h2d_gbs": 50.0, "rows": [
        dict(system=system, scenario=f"n{n}", budget=budget, n=n, tok_s=t)
        for n, t in tok_s_by_n.items()]}


def test_planner_check_charges_the_step_overhead_and_checks_the_recommendation():
    geometry = model_geometry("qwen3-30b-a3b-fp8")
    base = HardwareProfile("GPU", 0.0, {1: 0.03, 64: 0.2, 256: 0.3}, layer_overhead_ms=0.05)
    def predict(overhead_ms):
        profile = HardwareProfile("GPU", 50.0, base.gemm_ms, layer_overhead_ms=overhead_ms)
        return {n: solve(profile, geometry, 0.25, n_values=(n,))[0].tok_s for n in (1, 8, 64)}
    predicted = predict(0.05)
    exact = check_run(sweep_run("offload25", predicted), base, geometry)
    assert exact["step_overhead_ms"] == 0.0
    assert [r["error"] for r in exact["rows"]] == [0.0, 0.0, 0.0]
    # the card's profile: 0.3 ms per layer step, of which 0.1 ms the router (in stock's time)
    card = HardwareProfile("GPU", 0.0, {}, layer_overhead_ms=0.3, router_ms=0.1)
    charged = check_run(sweep_run("offload25", predicted), base, geometry, card)
    slower = predict(0.25)
    assert [r["predicted_tok_s"] for r in charged["rows"]] == [
        round(slower[n], 1) for n in (1, 8, 64)]
    assert charged["step_overhead_ms"] == pytest.approx(0.2)
    # the planner picks n=64 (highest predicted); measured, n=8 is best and 64 is 20% behind
    measured = {1: 10.0, 8: 100.0, 64: 80.0}
    run = check_run(sweep_run("offload25", measured), base, geometry)
    assert (run["recommended_max_num_seqs"], run["measured_best_n"]) == (64, 8)
    assert run["recommended_share_of_best"] == 0.8 and run["within_best_10pct"] is False
    run = check_run(sweep_run("offload25", {1: 10.0, 8: 100.0, 64: 95.0}), base, geometry)
    assert run["within_best_10pct"] is True


def test_sweep_systems_name_their_draft_length():
    from guidellm_sweep import spec_tokens
    assert spec_tokens("offload+eagle3", 3) == 3 and spec_tokens("offload+eagle3k5", 3) == 5
    assert spec_tokens("offload", 3) is None and spec_tokens("stock", 3) is None
    for bad in ("offload+eagle3k0", "offload+eagle3k", "offload+eagle", "uva+eagle3k2",
                "offload+zerocopy", "offload+auto"):
        with pytest.raises(SystemExit, match="unknown system"):
            spec_tokens(bad, 3)


def test_sweep_row_from_a_real_guidellm_report_and_metrics_deltas():
    """The H200 report of offload at concurrency 32 (one wave of 52-s requests in a 100-s
    window): guidellm's rate counts that wave only, the streams' rate all 32 busy streams."""
    import json
    import lzma

    from guidellm_sweep import result_row
    raw = Path(__file__).resolve().parents[1] / "benchmarks/results/guidellm-h200"
    report = json.loads(lzma.open(raw / "guidellm-offload-c32.json.xz").read())
    before = {"moe_offload_expert_hits_total": 100.0, "moe_offload_layer_steps_total": 10.0}
    after = {"moe_offload_expert_hits_total": 400.0, "moe_offload_expert_misses_total": 900.0,
             "moe_offload_layer_steps_total": 20.0, "moe_offload_h2d_bytes_total": 4096e9,
             "vllm:spec_decode_num_drafts_total": 50.0,
             "vllm:spec_decode_num_accepted_tokens_total": 75.0}
    row = result_row(report, before, after, concurrency=32)
    assert (row["requests_ok"], row["waves"], row["tok_s"]) == (32, 1.0, 40.96)  # 4096 / 100 s
    assert row["stream_tok_s"] == round(32 * 128 / 52.2209, 2) == 78.44
    assert row["hit_rate"] == 0.25 and row["unique_experts_per_layer_step"] == 120.0
    assert row["pcie_gb_per_tok"] == 1.0 and row["mean_acceptance_length"] == 2.5


def test_sweep_reports_of_one_lease_merge_and_others_are_refused(tmp_path):
    """Calls of one lease join into one report, each row naming its call; a run at another
    budget (or card, model, load) is refused, not plotted beside the others."""
    import json

    from guidellm_sweep import merge
    load = dict(prompt_tokens=256, output_tokens=128, concurrencies=[1, 8], seconds=300, waves=1)
    row = dict(tok_s=1.0, stream_tok_s=None, itl_ms_p50=1.0, itl_ms_p99=2.0, ttft_ms_p50=3.0,
               hit_rate=None, unique_experts_per_layer_step=None, mean_acceptance_length=None,
               requests_ok=1, requests_err=0)
    paths = []
    for call, systems, budget in (("a", ["stock"], 0.25), ("b", ["offload"], 0.25),
                                  ("c", ["offload"], 0.5)):
        (tmp_path / call).mkdir()
        paths.append(tmp_path / call / "guidellm_sweep.json")
        paths[-1].write_text(json.dumps(dict(
            card="H100", vllm="0.26.0", model="/root/walk", load_format="auto",
            routing="uniform_random", budget=budget, bw_h2d_gbs=52.0, date="d", commit=call,
            load=dict(load, concurrencies=[32] if call == "b" else [1, 8]),
            rows=[dict(row, system=s, concurrency=c) for s in systems for c in (1, 8)])))
    merge([str(p) for p in paths[:2]], tmp_path / "merged")
    merged = json.loads((tmp_path / "merged" / "guidellm_sweep.json").read_text())
    assert [(r["system"], r["run"]) for r in merged["rows"]] == [
        ("stock", "a"), ("stock", "a"), ("offload", "b"), ("offload", "b")]
    assert merged["commits"] == ["a", "b"] and merged["budget"] == 0.25
    assert merged["load"]["concurrencies"] == [1, 8, 32]
    # a merged report merges again, its commits kept
    merge([str(tmp_path / "merged" / "guidellm_sweep.json"), str(paths[0])], tmp_path / "again")
    assert json.loads((tmp_path / "again" / "guidellm_sweep.json").read_text())["commits"] == [
        "a", "b"]
    with pytest.raises(SystemExit, match="differs .* in budget: not comparable"):
        merge([str(paths[0]), str(paths[2])], tmp_path / "refused")
    other = json.loads(paths[1].read_text())
    for key, value, message in (("load", dict(load, waves=2), "in waves"),
                                ("budget", None, "has no budget")):
        paths[2].write_text(json.dumps(dict(other, **{key: value})))
        with pytest.raises(SystemExit, match=message):
            merge([str(paths[0]), str(paths[2])], tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_spec_check_fits_the_acceptance_rate_and_checks_the_recommended_k():
    """A synthetic sweep at rate 0.7 where k = 3 measured fastest: the fit finds 0.7, the
    planner (no draft cost) recommends the largest k, 5, and the check says whether that is
    among the measured best two; a sweep without k = 0 is refused."""
    from spec_check import check, fit_acceptance_rate, measured_by_k

    from vllm_moe_offload.planning.planner import acceptance_length
    assert fit_acceptance_rate({k: acceptance_length(k, 0.7) for k in (1, 2, 5)}) == 0.7
    profile = HardwareProfile("GPU", 50.0, {1: 0.03, 4096: 1.0}, 0.1)

    def sweep(tok_s_by_k):
        names = {0: "offload", 3: "offload+eagle3"}  # k = 3: the default's plain name
        rows = [dict(system=names.get(k, f"offload+eagle3k{k}"), concurrency=32,
                     spec_tokens=k or None, stream_tok_s=v, unique_experts_per_layer_step=120.0,
                     mean_acceptance_length=round(acceptance_length(k, 0.7), 3) if k else None)
                for k, v in tok_s_by_k.items()]
        return measured_by_k([("r.json", {"rows": rows})], 32)

    second = check(sweep({0: 70, 1: 100, 2: 120, 3: 150, 5: 140}), profile,
                   "qwen3-30b-a3b-fp8", 0.25, 32, 0.0)
    assert second["recommended_k"] == 5 and second["measured_ranking"][:2] == [3, 5]
    assert second["within_best_two"] and second["fitted_acceptance_rate"] == 0.7
    third = check(sweep({0: 70, 1: 100, 2: 145, 3: 150, 5: 140}), profile,
                  "qwen3-30b-a3b-fp8", 0.25, 32, 0.0)
    assert not third["within_best_two"]
    with pytest.raises(SystemExit, match="need offload"):
        check(sweep({1: 100, 2: 120, 3: 150}), profile, "qwen3-30b-a3b-fp8", 0.25, 32, 0.0)


def test_trace_summary_splits_a_layer_step(tmp_path):
    """Two layer steps of 1 ms each on one thread: 0.3 ms blocked in the sync, 0.02 ms in
    launches, a launch outside the op not counted; the GPU busy 1.5 of its 2.5 ms window."""
    import gzip
    import json

    from trace_summary import load_events, summarise

    def x(cat, name, ts, dur, tid=1):
        return dict(ph="X", cat=cat, name=name, ts=ts, dur=dur, pid=7, tid=tid)

    events = []
    for ts in (0.0, 2000.0):
        events += [x("cpu_op", "vllm::moe_offload_experts", ts, 1000.0),
                   x("cuda_runtime", "cudaMemcpyAsync", ts + 10, 5.0),
                   x("cuda_runtime", "cudaStreamSynchronize", ts + 20, 300.0),
                   x("cuda_runtime", "cudaLaunchKernel", ts + 400, 5.0),
                   x("kernel", "gemm", ts + 500, 500.0, tid=9)]
    events += [x("cuda_runtime", "cudaLaunchKernel", 1500.0, 50.0),  # between the steps
               x("cuda_runtime", "cudaStreamSynchronize", 30.0, 10.0, tid=2),  # other thread
               x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 1000.0, 500.0, tid=9)]
    path = tmp_path / "worker.pt.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events + [dict(ph="M", name="process_name")]}, f)
    # a newer front-end trace without the op beside it: the worker's is the one read
    (tmp_path / "frontend.pt.trace.json").write_text(json.dumps({"traceEvents": [
        x("cpu_op", "LLM.generate", 0.0, 9000.0)]}))
    got = summarise(load_events(tmp_path), layers=2)
    assert got["layer_steps"] == 2 and got["decode_steps"] == 1.0
    assert (got["op_ms_per_layer"], got["sync_ms_per_layer"], got["launch_ms_per_layer"],
            got["host_rest_ms_per_layer"]) == (1.0, 0.3, 0.01, 0.69)
    assert (got["gpu_window_ms"], got["gpu_busy_share"]) == (2.5, 0.6)
    assert (got["kernel_ms"], got["h2d_ms"], got["h2d_copies"]) == (1.0, 0.5, 1)
    # bench_step's marks: a CPU span and, under CUDA, a GPU-clock annotation of the same name
    marked = [dict(e, name="moe_offload_step") for e in events if e["cat"] == "cpu_op"]
    marked += [dict(e, cat="gpu_user_annotation", tid=9) for e in marked]
    got = summarise(marked + events[1:], layers=2, op="moe_offload_step")
    assert got["layer_steps"] == 2 and got["op_ms_per_layer"] == 1.0


def test_step_bench_counts_what_each_mode_does():
    from bench_step import Bench
    bench = Bench("tiny", layers=2, budget=0.25, device="cpu")
    g = bench.geometry
    assert bench.num_slots == 2 * g.top_k  # 25% of 2 x 16 experts, at least top-k a layer
    for tokens in (1, 4):
        device = bench.run("device", tokens, steps=2, trace=None)
        staged = bench.run("staged", tokens, steps=2, trace=None)
        for row in (device, staged):
            assert tokens * g.top_k >= row.unique_per_layer >= g.top_k
            assert 0 < row.misses_per_layer < row.unique_per_layer  # some hit, some miss
            # the row's misses are rounded to 2 decimals, its copy time to 4 from the exact
            # misses: compare relatively (on a slow CPU copy the absolute gap grows)
            assert row.copy_ms_per_layer == pytest.approx(
                row.misses_per_layer * g.layout.record_bytes / (bench.h2d_gbps * 1e6),
                rel=5e-3, abs=1e-4)
            assert row.rest_ms_per_layer == pytest.approx(
                row.layer_ms - row.copy_ms_per_layer, abs=1e-3)
        # the same routing and the same rule: the two paths miss alike
        assert device.misses_per_layer == staged.misses_per_layer
        assert device.fills_per_layer == staged.fills_per_layer
