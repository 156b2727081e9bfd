"""The soak's verdict without a server: what makes it fail (request errors, memory growth over
the second half, counters that do not add up, requests left running) and what does not."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import soak  # noqa: E402

RECORD = 49152  # the tiny preset's record


def counters(fills=10, reads=2, hits=30, **changes) -> dict:
    c = dict(hits=hits, misses=fills + reads, fills=fills, reads=reads,
             h2d_bytes=(fills + reads) * RECORD, slots_in_use=8, cache_slots=8,
             generated_tokens=100, running=0, waiting=0)
    return c | changes


def test_counters_that_add_up_pass():
    assert soak.counter_problems(counters(), None, RECORD) == []
    assert soak.counter_problems(counters(fills=11), counters(), RECORD) == []


@pytest.mark.parametrize("now, message", [
    (counters(h2d_bytes=12 * RECORD + 256), "not a whole number of 49152-byte records"),
    (counters(h2d_bytes=11 * RECORD), "!= (fills 10 + reads 2) x 49152"),
    (counters(misses=13), "misses 13 != fills 10 + reads 2"),
    (counters(slots_in_use=9), "slots in use 9 > slots 8"),
    (counters(hits=29), "hits went down: 30 -> 29"),
])
def test_counters_that_do_not_add_up_fail(now, message):
    problems = soak.counter_problems(now, counters(), RECORD)
    assert any(message in p for p in problems), problems


def test_metrics_without_the_offload_counters_say_why():
    now = counters()
    del now["fills"]
    problem, = soak.counter_problems(now, None, RECORD)
    assert "PROMETHEUS_MULTIPROC_DIR" in problem


def test_a_read_between_two_exporter_updates_is_read_again(monkeypatch):
    torn = counters(fills=11)  # fills exported, bytes not yet
    torn["misses"], torn["h2d_bytes"] = 13, 12 * RECORD
    reads = iter([torn, counters(fills=11)])
    monkeypatch.setattr(soak, "counters", lambda url: next(reads))
    monkeypatch.setattr(soak.time, "sleep", lambda s: None)
    assert soak.consistent_counters("url", counters(), RECORD)[1] == []
    monkeypatch.setattr(soak, "counters", lambda url: torn)  # three torn reads: real
    assert soak.consistent_counters("url", counters(), RECORD)[1]


def test_slope_is_fitted_over_the_second_half():
    times = [5.0 * i for i in range(24)]  # two minutes
    warm_then_flat = [100.0 + 50 * (i < 6) * (6 - i) for i in range(12)] + [100.0] * 12
    assert soak.slope_per_min(times, warm_then_flat) == pytest.approx(0.0)
    leak = [100.0 + 0.25 * i for i in range(24)]  # 0.25 MiB per 5 s
    assert soak.slope_per_min(times, leak) == pytest.approx(3.0)
    assert soak.slope_per_min(times[:4], leak[:4]) is None  # too few points to fit


def samples(rss: list[float], problems_at: int | None = None) -> list[dict]:
    return [dict(t_s=5.0 * i, rss_mib=m, gpu_mib=None, pinned_mib=0.0,
                 counter_problems=["misses 13 != fills 10 + reads 2"] if i == problems_at else [])
            for i, m in enumerate(rss)]


def outcomes(*kinds: str) -> list:
    return [soak.Outcome(0.0, 1.0, kind, 4, "HTTP 500: boom" if kind == "error" else None)
            for kind in kinds]


def test_a_clean_run_passes():
    slopes, failures = soak.check(samples([100.0] * 24), outcomes("ok", "aborted", "ok"),
                                  drained=True, healthy=True, max_growth=2.0)
    assert failures == [] and slopes == {"rss_mib": 0.0, "pinned_mib": 0.0}


def test_each_kind_of_trouble_fails_the_run():
    _, failures = soak.check(samples([100.0 + 0.25 * i for i in range(24)], problems_at=7),
                             outcomes("ok", "error", "aborted"), drained=False, healthy=False,
                             max_growth=2.0)
    assert failures == [
        "1 request(s) failed, e.g. HTTP 500: boom",
        "rss_mib grows 3.00 MiB/min over the second half, more than --max-growth-mb-min 2.0",
        "counters at 35 s: misses 13 != fills 10 + reads 2",
        "requests still running 30 s after the load stopped",
        "the server is not healthy after the load"]
    _, failures = soak.check(samples([100.0] * 24), outcomes("aborted"), True, True, 2.0)
    assert failures == ["no request finished"]


def test_growth_is_told_per_process_and_per_request():
    # 24 samples 5 s apart: the worker grows 1 MiB/min, 100 requests a minute
    run = [dict(t_s=5.0 * i, requests_done=100 * i // 12, rss_mib=300 + i / 12,
                rss_by_process={"api-1": 100.0, "worker-2": 200 + i / 12}) for i in range(24)]
    detail = soak.growth_detail(run)
    assert detail["slopes_by_process"] == {"api-1": pytest.approx(0.0),
                                           "worker-2": pytest.approx(1.0)}
    assert detail["requests_per_min"] == pytest.approx(100, rel=0.05)
    assert detail["rss_kib_per_request"] == pytest.approx(10.24, rel=0.05)
