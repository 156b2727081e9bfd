"""The routing generator is calibrated to the real Qwen3-30B-A3B trace (measured, not assumed):
at the trace's shape (batch 1, top-6, 128 decode tokens) the cache's LRU and LFU hit rates at
12.5/25/50% of the experts are within 3 points of the real trace's, and the statistics that
cache_sim.py prints are close to the real ones."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from cache_sim import QWEN_RECORD_BYTES, calibration, engine_trace, replay  # noqa: E402

from vllm_moe_offload.synthetic.traces import (  # noqa: E402
    RoutingModel,
    generate,
    load_real_trace,
    measure,
    table,
    uniform,
)


@pytest.fixture(scope="module")
def calib():
    return calibration()


def test_real_trace_loads_as_published():
    trace = load_real_trace()
    assert trace.shape == (128, 48, 1, 6)
    assert all(len(set(row)) == 6 for row in trace.reshape(-1, 6).tolist())
    stats = measure(trace, 128)
    # the data README's table, measured on this copy
    assert [round(stats[f"distinct_{n}"]) for n in (8, 32, 128)] == [24, 43, 64]
    assert [round(stats[f"reuse_{n}"], 2) for n in (1, 8, 32)] == [0.38, 0.27, 0.24]
    assert round(stats["next_layer_precision"], 2) == 0.52


def test_generator_hit_rates_within_3_points_of_the_real_trace(calib):
    real, ours = calib["real"], calib["realistic-top6"]
    assert real["lfu_32"] == pytest.approx(0.844, abs=0.001)  # the figure the issue quotes
    for policy in ("lfu", "lru"):
        for slots in (16, 32, 64):
            key = f"{policy}_{slots}"
            assert abs(ours[key] - real[key]) <= 0.03, (key, ours[key], real[key])


def test_the_device_rule_is_within_a_point_of_lfu(calib):
    """The cache's rule (integer LFU, run on the GPU) against the host LFU it replaced, on the
    real trace and on the calibrated generator."""
    for routing in ("real", "realistic-top6"):
        for slots in (16, 32, 64):
            device, lfu = calib[routing][f"device_{slots}"], calib[routing][f"lfu_{slots}"]
            assert device >= lfu - 0.01, (routing, slots, device, lfu)


def test_generator_statistics_close_to_the_real_trace(calib):
    real, ours = calib["real"], calib["realistic-top6"]
    for n in (8, 32, 128):
        key = f"distinct_{n}"
        assert abs(ours[key] - real[key]) <= 0.1 * real[key], (key, ours[key], real[key])
    for key in ("reuse_1", "reuse_8", "reuse_32", "within_8"):
        assert abs(ours[key] - real[key]) <= 0.07, (key, ours[key], real[key])
    # a first-order predictor learns much of the next layer, if less than on the real trace
    # (0.40 against 0.52: fewer latent dimensions would raise it, and each request's spread)
    assert real["next_layer_precision"] - 0.15 <= ours["next_layer_precision"] <= real[
        "next_layer_precision"]
    # the per-layer pattern: the first layers are the least local, in both
    assert ours["reuse_1_early"] < ours["reuse_1_deep"] and real["reuse_1_early"] < real[
        "reuse_1_deep"]


def test_uniform_routing_has_no_locality():
    stats = measure(uniform(4, 128, 6, batch=2, steps=130), 128)
    assert stats["reuse_1"] == pytest.approx(6 / 128, abs=0.02)
    assert stats["distinct_128"] > 120


def test_batches_are_independent_requests_over_shared_popularity():
    trace = generate(RoutingModel(top_k=8, num_layers=4, seed=1), batch=8, steps=128)
    assert trace.shape == (128, 4, 8, 8)
    assert all(len(set(row)) == 8 for row in trace.reshape(-1, 8).tolist())
    # each request keeps its own working set: its tokens reuse far more of its own experts
    # than of another request's at the same step
    own = measure(trace, 128)["reuse_1"]
    crossed = np.mean([len(set(trace[s, layer, 0]) & set(trace[s, layer, 1])) / 8
                       for s in range(128) for layer in range(4)])
    assert own > 2 * crossed > 0


def test_table_is_periodic_and_the_engine_trace_walks_it():
    model = RoutingModel(num_layers=3, seed=2)
    cycle = table(model, 64)
    assert cycle.shape == (64, 3, 6)
    again = table(model, 64)
    assert np.array_equal(cycle, again)  # a seed gives one table: every engine routes alike
    trace = engine_trace(batch=3, steps=10)
    assert trace.shape == (10, 48, 3, 8)
    # a request's consecutive tokens route as consecutive positions of the cycle do
    assert measure(trace, 128)["reuse_1"] > 0.25


@pytest.mark.parametrize("policy", ["lru", "lfu", "device"])
def test_replay_counts_a_known_trace(policy):
    # two layers, one request: ABAB at layer 0 with 1 slot misses every step after warm-up
    trace = np.array([[[[0]], [[5]]], [[[1]], [[5]]]] * 5)  # [10, 2, 1, 1]
    row = replay(trace, policy, 1)
    assert row["hit_rate"] == pytest.approx(0.5)  # layer 0 always misses, layer 1 always hits
    assert row["bytes_per_token"] == QWEN_RECORD_BYTES  # one miss per token: layer 0's
