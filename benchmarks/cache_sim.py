"""Replays routing traces through the real `ExpertCache`, eviction policies and
`CorrelationPrefetcher` on the CPU: hit rate, PCIe bytes per token and prefetch
precision/recall per policy, prefetch mode, cache size and batch.

Traces: synthetic, calibrated to published Qwen3-30B-A3B statistics (vllm_moe_offload/traces.py;
the measured calibration is printed and stored). Decode: each step routes one token of each of
`batch` sequences through all 48 layers; the first 20% of steps warm the cache and are not
counted. Bytes are counted at the real FP8 expert record size (4.72 MB).

usage: python benchmarks/cache_sim.py [--out benchmarks/results/cache_sim.json] [--quick]
"""

import argparse
import itertools
import json
import time

import numpy as np
import torch

from vllm_moe_offload.cache import ExpertCache
from vllm_moe_offload.policies import POLICIES
from vllm_moe_offload.prefetch import CorrelationPrefetcher
from vllm_moe_offload.store import ExpertLayout, ExpertStore
from vllm_moe_offload.traces import TraceSpec, generate, measure

QWEN_RECORD_BYTES = ExpertLayout(2048, 768, torch.float8_e4m3fn, (128, 128)).record_bytes
SIM_LAYOUT = ExpertLayout(hidden=16, inter=16, weight_dtype=torch.bfloat16)  # cheap copies
STEPS = {1: 300, 8: 100, 64: 40}


def replay(trace: np.ndarray, spec: TraceSpec, policy: str, prefetch: str,
           slots_per_layer: int) -> dict:
    steps, layers, batch, _ = trace.shape
    store = ExpertStore(SIM_LAYOUT, layers, spec.num_experts, pin=False)
    cache = ExpertCache(store, slots_per_layer * layers, policy, device="cpu")
    prefetcher = (CorrelationPrefetcher(layers, spec.num_experts)
                  if prefetch == "correlation" else None)
    warmup = steps // 5
    for s in range(steps):
        if s == warmup:
            cache.stats = type(cache.stats)()
        for layer in range(layers):
            ids = trace[s, layer]  # [batch, K]
            for group in cache.schedule(layer, np.unique(ids).tolist()):
                cache.fetch(layer, group)
            if prefetcher is not None:
                prefetcher.prefetch_next(cache, layer, ids)
    st = cache.stats
    tokens = (steps - warmup) * batch
    return dict(policy=policy, prefetch=prefetch, slots_per_layer=slots_per_layer, batch=batch,
                trace="synthetic-qwen3-30b-a3b", hit_rate=round(st.hit_rate, 4),
                bytes_per_token=round((st.misses + st.prefetches) * QWEN_RECORD_BYTES / tokens),
                prefetch_precision=round(st.prefetch_precision, 4),
                prefetch_recall=round(st.prefetch_recall, 4))


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), sharey=True)
    for ax, batch in zip(np.atleast_1d(axes), batches, strict=True):
        for policy, prefetch in sorted({(r["policy"], r["prefetch"]) for r in rows}):
            pts = sorted((r["slots_per_layer"], r["hit_rate"]) for r in rows
                         if (r["policy"], r["prefetch"], r["batch"]) == (policy, prefetch, batch))
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{policy}+{prefetch}")
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("slots per layer (of 128)")
        ax.set_xscale("log", base=2)
    np.atleast_1d(axes)[0].set_ylabel("expert hit rate")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/cache_sim.json")
    parser.add_argument("--quick", action="store_true", help="8 layers, fewer steps")
    args = parser.parse_args()
    spec = TraceSpec(num_layers=8 if args.quick else 48)
    rows, calibration = [], {}
    for batch, steps in STEPS.items():
        t0 = time.time()
        trace = generate(spec, batch, steps // (3 if args.quick else 1))
        calibration[batch] = {k: round(v, 3) for k, v in measure(trace, spec.num_experts).items()}
        print(f"batch {batch}: trace {trace.shape} in {time.time() - t0:.0f}s, "
              f"calibration {calibration[batch]}", flush=True)
        for policy, prefetch, slots in itertools.product(POLICIES, ["off", "correlation"],
                                                         [8, 16, 32, 64]):
            rows.append(replay(trace, spec, policy, prefetch, slots))
    with open(args.out, "w") as f:
        json.dump({"spec": spec.__dict__, "calibration": calibration,
                   "record_bytes": QWEN_RECORD_BYTES, "rows": rows}, f, indent=2)
    plot(rows, args.out.replace(".json", ".png"))
    print(f"{'policy':>13} {'prefetch':>11} {'slots':>5} {'batch':>5} {'hit':>6} "
          f"{'MB/token':>9} {'prec':>5} {'recall':>6}")
    for r in rows:
        print(f"{r['policy']:>13} {r['prefetch']:>11} {r['slots_per_layer']:>5} {r['batch']:>5} "
              f"{r['hit_rate']:>6.3f} {r['bytes_per_token'] / 1e6:>9.1f} "
              f"{r['prefetch_precision']:>5.2f} {r['prefetch_recall']:>6.2f}")


if __name__ == "__main__":
    main()
