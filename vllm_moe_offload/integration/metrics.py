"""Reporting the offload counters: a periodic log line from the worker, Prometheus metrics on
`vllm serve`'s /metrics, and a stats call through vLLM's `collective_rpc`
(`llm.collective_rpc("expert_offload_stats")`)."""

import os
import threading
import time
from collections.abc import Callable

import numpy as np
from vllm.logger import init_logger

from vllm_moe_offload.offload.stats import OffloadStats

# Under "vllm." so that vLLM's logging configuration (handler, format, level) applies.
logger = init_logger("vllm.moe_offload")


class PrometheusExporter:
    """Mirrors the counters into prometheus_client metrics that `vllm serve` shows on /metrics.

    The cache lives in the engine-core process, whose metrics reach the API server's /metrics
    only through prometheus_client's multiprocess mode: set PROMETHEUS_MULTIPROC_DIR (an empty
    directory) before `vllm serve`. Without it nothing is exported.
    """

    _COUNTERS = {  # OffloadStats field -> (metric name, help, scale)
        "hits": ("moe_offload_expert_hits", "Routed experts found in the GPU expert cache", 1),
        "misses": ("moe_offload_expert_misses", "Routed experts not in the cache (filled or "
                   "read without a slot)", 1),
        "fills": ("moe_offload_expert_fills", "Missed experts copied into a cache slot", 1),
        "reads": ("moe_offload_expert_reads", "Missed experts read without a slot (in place "
                  "from host memory, or staged)", 1),
        "evictions": ("moe_offload_expert_evictions", "Experts evicted from the cache", 1),
        "bytes_h2d": ("moe_offload_h2d_bytes", "Host-to-device bytes moved for experts", 1),
        "layer_steps": ("moe_offload_layer_steps", "MoE layer forwards", 1),
        "staged_steps": ("moe_offload_staged_steps", "Large layer steps that staged their "
                         "misses (one host sync each)", 1),
        "stall_ms": ("moe_offload_fetch_stall_seconds",
                     "Time the compute stream waited for staged copies", 1e-3),
    }

    def __init__(self, cache):
        from prometheus_client import Counter, Gauge
        self.cache = cache
        self._counters = {field: Counter(name, doc) for field, (name, doc, _)
                          in self._COUNTERS.items()}
        self._exported = dict.fromkeys(self._COUNTERS, 0)
        # the router statistics per MoE layer (0-based among MoE layers) and expert
        self._routed = Counter("moe_offload_expert_routed",
                               "Routed (token, k) pairs per MoE layer and expert",
                               ["layer", "expert"])
        self._routed_exported = np.zeros(cache.counters.routed.shape, dtype=np.int64)
        self._in_use = Gauge("moe_offload_slots_in_use", "Cache slots holding an expert",
                             multiprocess_mode="mostrecent")
        Gauge("moe_offload_cache_slots", "Slots in the GPU expert cache",
              multiprocess_mode="mostrecent").set(cache.num_slots)

    @classmethod
    def maybe_create(cls, cache) -> "PrometheusExporter | None":
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            logger.info("expert offload: set PROMETHEUS_MULTIPROC_DIR to an empty directory "
                        "before vllm serve to see moe_offload_* metrics on /metrics")
            return None
        return cls(cache)

    def export(self) -> None:
        stats = self.cache.snapshot()
        for field, counter in self._counters.items():
            value = getattr(stats, field)
            if value > self._exported[field]:
                counter.inc((value - self._exported[field]) * self._COUNTERS[field][2])
                self._exported[field] = value
        routed = self.cache.counters.routed.numpy().copy()
        for layer, expert in zip(*(routed - self._routed_exported).nonzero(), strict=True):
            self._routed.labels(str(layer), str(expert)).inc(
                int(routed[layer, expert] - self._routed_exported[layer, expert]))
        self._routed_exported = routed
        self._in_use.set(self.cache.slots_in_use)


class StatsReporter:
    """Every second: exports the counters to Prometheus (if enabled); every `interval_s` while
    they move: logs `expert offload: hits=... misses=...`.

    A daemon thread rather than a check in the hot path: an idle server still reports the
    counters of its last requests.
    """

    TICK_S = 1.0

    def __init__(self, snapshot: Callable[[], OffloadStats], interval_s: float,
                 exporter: PrometheusExporter | None = None):
        self.snapshot = snapshot
        self.interval_s = interval_s
        self.exporter = exporter
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if (self.interval_s <= 0 and self.exporter is None) or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="expert-offload-stats",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        logged, last_log = None, time.monotonic()
        while not self._stop.wait(min(self.TICK_S, self.interval_s or self.TICK_S)):
            if self.exporter is not None:
                self.exporter.export()
            now = time.monotonic()
            if self.interval_s > 0 and now - last_log >= self.interval_s:
                stats = self.snapshot()
                if stats != logged:
                    logger.info("expert offload: %s", stats.summary())
                    logged = stats
                last_log = now


class OffloadWorkerExtension:
    """Mixed into vLLM's worker (parallel_config.worker_extension_cls) by the config hook."""

    def expert_offload_stats(self) -> dict | None:
        cache = getattr(self.get_model(), "expert_cache", None)
        if cache is None:
            return None
        counters = cache.counters
        return {**cache.snapshot().as_dict(), "num_slots": cache.num_slots,
                "staging_slots": cache.staging, "slot_bytes": cache.slot_bytes,
                "slots_per_layer": list(cache.quotas), "store_bytes": cache.store.nbytes,
                "routed_per_layer_expert": counters.routed.tolist(),
                "counters_per_layer": counters.counts.tolist(),
                "slots_in_use": cache.slots_in_use}

    def expert_offload_routing_log(self) -> list | None:
        """[(MoE layer, expert ids [T, K]), ...] of the eager layer steps so far, with
        MOE_OFFLOAD_ROUTING_LOG set (else None)."""
        cache = getattr(self.get_model(), "expert_cache", None)
        log = getattr(cache, "routing_log", None)
        return None if log is None else log.steps
