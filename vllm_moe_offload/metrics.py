"""Reporting the offload counters: a periodic log line from the worker, and a stats call
through vLLM's `collective_rpc` (`llm.collective_rpc("expert_offload_stats")`)."""

import threading

from vllm.logger import init_logger

from vllm_moe_offload.stats import OffloadStats

# Under "vllm." so that vLLM's logging configuration (handler, format, level) applies.
logger = init_logger("vllm.moe_offload")


class StatsReporter:
    """Logs `expert offload: hits=... misses=...` every `interval_s` while the counters move.

    A daemon thread rather than a check in the hot path: an idle server still reports the
    counters of its last requests.
    """

    def __init__(self, stats: OffloadStats, interval_s: float):
        self.stats = stats
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.interval_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="expert-offload-stats",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        last = None
        while not self._stop.wait(self.interval_s):
            snapshot = self.stats.as_dict()
            if snapshot != last:
                logger.info("expert offload: %s", self.stats.summary())
                last = snapshot


class OffloadWorkerExtension:
    """Mixed into vLLM's worker (parallel_config.worker_extension_cls) by the config hook."""

    def expert_offload_stats(self) -> dict | None:
        cache = getattr(self.get_model(), "expert_cache", None)
        if cache is None:
            return None
        return {**cache.stats.as_dict(), "num_slots": cache.num_slots,
                "slot_bytes": cache.slot_bytes, "slots_per_layer": list(cache.quotas),
                "slots_in_use": len(cache.owners())}
