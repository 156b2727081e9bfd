"""The planner: the unique-expert model, the solver's choices, the profile and the CLI."""

import json
import random

import pytest

from vllm_moe_offload.cli import main
from vllm_moe_offload.planning.planner import recommend, solve, unique_experts
from vllm_moe_offload.planning.profiler import HardwareProfile, profile_hardware
from vllm_moe_offload.synthetic.checkpoint import model_geometry
from vllm_moe_offload.units import format_bytes

GEOMETRY = model_geometry("qwen3-30b-a3b-fp8")
# Round numbers near the H100's: 50 GB/s PCIe, GEMM 0.25 ms at 1 token to 1 ms at 1024.
PROFILE = HardwareProfile("test", 50.0, {1: 0.25, 64: 0.33, 1024: 1.0}, 0.3, 0.002)


def test_unique_experts_matches_sampling():
    rng = random.Random(0)
    for tokens in (1, 8, 64):
        draws = [len({e for _ in range(tokens) for e in rng.sample(range(128), 8)})
                 for _ in range(300)]
        assert unique_experts(128, 8, tokens) == pytest.approx(sum(draws) / 300, rel=0.03)


def test_batching_amortises_fetches_and_tpot_caps_it():
    rows = solve(PROFILE, GEOMETRY, resident_share=0.25)
    assert [r.n for r in rows] == [1, 4, 8, 16, 32, 64, 128]
    assert all(a.tok_s < b.tok_s for a, b in zip(rows, rows[1:], strict=False))
    n1 = rows[0]
    assert n1.unique_per_layer == pytest.approx(8.0)
    fetch_ms = GEOMETRY.layout.record_bytes / 50e9 * 1e3
    assert n1.io_ms_per_layer == pytest.approx(6 * fetch_ms)  # 8 experts, 75% miss
    assert recommend(rows).n == 128
    capped = recommend(rows, tpot_ms=rows[3].step_ms)
    assert capped.n == 16 and capped.step_ms <= rows[3].step_ms


def test_overlap_and_speculation():
    plain = solve(PROFILE, GEOMETRY, 0.25, n_values=(1,))[0]
    hidden = solve(PROFILE, GEOMETRY, 0.25, n_values=(1,), overlap=True)[0]
    assert hidden.step_ms < plain.step_ms
    spec = solve(PROFILE, GEOMETRY, 0.25, n_values=(1,), spec_tokens=3, acceptance_length=2.0)[0]
    assert spec.unique_per_layer == pytest.approx(unique_experts(128, 8, 4))


def test_profile_round_trip_and_interpolation():
    again = HardwareProfile.from_json(PROFILE.to_json())
    assert again == PROFILE
    assert PROFILE.gemm_time_ms(8) == pytest.approx(0.25 + (0.33 - 0.25) * 0.5)


def test_profile_measures_this_machine():
    profile = profile_hardware(model_geometry("tiny"), "cpu", token_counts=(1, 8))
    assert profile.h2d_gbps > 0 and set(profile.gemm_ms) == {1, 8}
    assert all(ms > 0 for ms in profile.gemm_ms.values())
    assert profile.router_ms > 0 and profile.layer_overhead_ms >= 0
    assert HardwareProfile.from_json(profile.to_json()) == profile


def test_plan_command(tmp_path, capsys):
    path = tmp_path / "profile.json"
    path.write_text(PROFILE.to_json())
    main(["plan", "qwen3-30b-a3b-fp8", "--profile", str(path), "--out", str(tmp_path / "p.json")])
    out = capsys.readouterr().out
    assert "<- recommended" in out and "--max-num-seqs 128" in out
    assert json.loads((tmp_path / "p.json").read_text())["recommended_max_num_seqs"] == 128


def test_acceptance_length_and_speculation_choice():
    from vllm_moe_offload.planning.planner import acceptance_length, solve_spec
    assert acceptance_length(0, 0.7) == pytest.approx(1.0)
    assert acceptance_length(3, 0.5) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert acceptance_length(3, 1.0) == 4.0
    # batch 1, uniform routing, 75% misses: k+1 tokens route to almost k+1 times the experts,
    # so the bytes per step grow about linearly in k while accepted tokens grow less: an
    # often-right draft pays a little, at a short k
    good = solve_spec(PROFILE, GEOMETRY, 0.25, n=1, acceptance_rate=0.8)
    best = max(good, key=lambda r: r.tok_s)
    assert best.spec_tokens == 2 and best.tok_s > 1.2 * good[0].tok_s
    assert good[-1].tok_s < best.tok_s
    assert good[0].unique_per_layer == pytest.approx(8.0)
    assert good[-1].unique_per_layer == pytest.approx(unique_experts(128, 8, 6))
    # at n=128 every step already touches every expert; a draft rarely right only costs
    poor = solve_spec(PROFILE, GEOMETRY, 0.25, n=128, acceptance_rate=0.02, draft_ms_per_token=20)
    assert max(poor, key=lambda r: r.tok_s).spec_tokens == 0


def test_plan_command_recommends_speculative_tokens(tmp_path, capsys):
    path = tmp_path / "profile.json"
    path.write_text(PROFILE.to_json())
    main(["plan", "qwen3-30b-a3b-fp8", "--profile", str(path), "--tpot-ms", "60",
          "--acceptance-rate", "0.7", "--out", str(tmp_path / "p.json")])
    out = capsys.readouterr().out
    plan = json.loads((tmp_path / "p.json").read_text())
    assert f"num_speculative_tokens {plan['recommended_num_speculative_tokens']}" in out
    assert [r["spec_tokens"] for r in plan["spec_rows"]] == [0, 1, 2, 3, 5]
    assert plan["spec_concurrency"] == plan["recommended_max_num_seqs"]
    # one sequence: each drafted token fetches experts of its own, and a 20-ms draft on top
    main(["plan", "qwen3-30b-a3b-fp8", "--profile", str(path), "--acceptance-rate", "0.7",
          "--concurrency", "1", "--draft-ms", "20", "--out", str(tmp_path / "p1.json")])
    single = json.loads((tmp_path / "p1.json").read_text())
    assert single["spec_concurrency"] == 1 and "speculation at n=1," in capsys.readouterr().out
    assert single["recommended_num_speculative_tokens"] == 0
    for bad in (["--concurrency", "0", "--acceptance-rate", "0.7"], ["--concurrency", "8"]):
        with pytest.raises(SystemExit):
            main(["plan", "qwen3-30b-a3b-fp8", "--profile", str(path), *bad])
    assert "--concurrency" in capsys.readouterr().err
    # a plan's JSON serves as the next plan's profile
    main(["plan", "qwen3-30b-a3b-fp8", "--profile", str(tmp_path / "p1.json")])
    assert "recommended: --max-num-seqs" in capsys.readouterr().out


def test_format_bytes_keeps_small_sizes_apart():
    assert [format_bytes(n) for n in (1023, 1536, 3 << 20, 3 << 29)] == [
        "1023 B", "1.5 KiB", "3.0 MiB", "1.50 GiB"]
