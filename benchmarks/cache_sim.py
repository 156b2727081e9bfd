"""Replays routing traces through the real `ExpertCache`, eviction policies and
`CorrelationPrefetcher` on the CPU: hit rate, PCIe bytes per token and prefetch
precision/recall per routing, policy, prefetch mode, cache size and batch.

Routings (vllm_moe_offload/traces.py):
- `real`: the recorded Qwen3-30B-A3B response (benchmarks/data/real-routing/), batch 1, top-6;
- `realistic-top6`: the generator calibrated to it, batch 1, averaged over SEEDS requests of
  the same length (its calibration: hit rates within 3 points, tests/test_traces.py);
- `realistic`: the generator at the served model's top-8, batches of independent requests;
- `uniform`: vLLM's uniform_random simulator, the worst case for any cache;
- `engine`: the full-size realistic-routing checkpoint's own table (realistic.py), requests
  starting at random points of its cycle, in the shapes of bench_e2e's lat / n8 / n64: what the
  engine's hit rate should be under `--routing realistic`.
Each step routes one token of each of `batch` requests through all 48 layers; the first 20%
of the steps warm the cache and are not counted. Bytes at the real FP8 record size (4.72 MB).

usage: python benchmarks/cache_sim.py [--out benchmarks/results/cache_sim.json] [--quick]
"""

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch

from vllm_moe_offload.cache import ExpertCache
from vllm_moe_offload.checkpoint import PRESETS, hf_config
from vllm_moe_offload.prefetch import CorrelationPrefetcher
from vllm_moe_offload.store import ExpertLayout, ExpertStore
from vllm_moe_offload.traces import RoutingModel, generate, load_real_trace, measure, uniform

QWEN_RECORD_BYTES = ExpertLayout(2048, 768, torch.float8_e4m3fn, (128, 128)).record_bytes
SIM_LAYOUT = ExpertLayout(hidden=16, inter=16, weight_dtype=torch.bfloat16)  # cheap copies
NUM_EXPERTS = 128
SEEDS = 8  # generated requests averaged against the one real one
REAL_STEPS = 128
BATCH_STEPS = {1: 256, 8: 64, 64: 64}  # bench_e2e's lat and nN decode lengths
SLOTS = (8, 16, 32, 64)  # per layer, of 128: 6.25 / 12.5 / 25 / 50%


def replay(trace: np.ndarray, policy: str, slots_per_layer: int, prefetch: str = "off") -> dict:
    """Hit rate, bytes per token and prefetch precision/recall of `trace` [steps, L, B, K]."""
    steps, layers, batch, _ = trace.shape
    store = ExpertStore(SIM_LAYOUT, layers, NUM_EXPERTS, pin=False)
    cache = ExpertCache(store, slots_per_layer * layers, policy, device="cpu")
    prefetcher = (CorrelationPrefetcher(layers, NUM_EXPERTS)
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
                hit_rate=st.hit_rate,
                bytes_per_token=(st.misses + st.prefetches) * QWEN_RECORD_BYTES / tokens,
                prefetch_precision=st.prefetch_precision, prefetch_recall=st.prefetch_recall)




def realistic_top6(seeds: int = SEEDS, steps: int = REAL_STEPS) -> list[np.ndarray]:
    """Generated single requests as long as the real trace, top-6 like it."""
    return [generate(RoutingModel(seed=s), 1, steps) for s in range(seeds)]


def calibration(seeds: int = SEEDS) -> dict[str, dict]:
    """The statistics and hit rates of the real trace and of the generator at its shape
    (what tests/test_traces.py checks): {"real": {...}, "realistic-top6": {...}}."""
    out = {}
    for name, traces in (("real", [load_real_trace()]), ("realistic-top6", realistic_top6(seeds))):
        stats = [measure(t, NUM_EXPERTS) for t in traces]
        row = {k: float(np.mean([s[k] for s in stats])) for k in stats[0]}
        for policy in ("lfu", "lru"):
            for slots in (16, 32, 64):
                row[f"{policy}_{slots}"] = float(np.mean([replay(t, policy, slots)["hit_rate"]
                                                          for t in traces]))
        out[name] = row
    return out


def engine_trace(batch: int, steps: int, seed: int = 0) -> np.ndarray:
    """The full-size realistic-routing checkpoint's routing of `batch` requests starting at
    random points of its cycle (the engine's: bench_e2e prompts end on random tokens)."""
    from vllm_moe_offload.realistic import RealisticRouting
    routing = RealisticRouting(hf_config(PRESETS["qwen3-30b-a3b-fp8"]))
    starts = np.random.default_rng(seed).integers(len(routing.cycle.ids), size=batch)
    positions = starts[None, :] + np.arange(steps)[:, None]  # [steps, batch]
    return routing.routing(positions).transpose(0, 2, 1, 3)  # [steps, L, batch, K]


def traces(quick: bool) -> dict[str, dict[int, np.ndarray]]:
    """routing -> batch -> trace (top-8 but `real`)."""
    scale = 3 if quick else 1
    top8 = RoutingModel(top_k=8)
    out = {"real": {1: load_real_trace()},
           "realistic": {b: generate(replace(top8, seed=b), b, s // scale)
                         for b, s in BATCH_STEPS.items()},
           "uniform": {b: uniform(48, NUM_EXPERTS, 8, b, s // scale)
                       for b, s in BATCH_STEPS.items()},
           "engine": {b: engine_trace(b, s // scale) for b, s in BATCH_STEPS.items()}}
    return out


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = sorted({(r["routing"], r["batch"]) for r in rows})
    cols = 4
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols,
                             figsize=(4.2 * cols, 3.4 * ((len(panels) + cols - 1) // cols)),
                             sharey=True, squeeze=False)
    for ax, (routing, batch) in zip(axes.flat, panels, strict=False):
        for policy, prefetch in sorted({(r["policy"], r["prefetch"]) for r in rows}):
            pts = sorted((r["slots_per_layer"], r["hit_rate"]) for r in rows
                         if (r["routing"], r["batch"], r["policy"], r["prefetch"])
                         == (routing, batch, policy, prefetch))
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{policy}+{prefetch}")
        ax.set_title(f"{routing} routing, batch {batch}", fontsize=9)
        ax.set_xlabel("slots per layer (of 128)")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("expert hit rate")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/cache_sim.json")
    parser.add_argument("--quick", action="store_true", help="a third of the decode steps")
    args = parser.parse_args()
    t0 = time.time()
    calib = calibration()
    print("calibration (batch 1, top-6; hit rates at 16/32/64 of 128 slots per layer):")
    keys = list(calib["real"])
    print(" ".join(f"{k:>13}" for k in ["routing"] + keys))
    for name, row in calib.items():
        print(" ".join([f"{name:>13}"] + [f"{row[k]:>13.3f}" for k in keys]))
    rows = []
    for routing, by_batch in traces(args.quick).items():
        for batch, trace in by_batch.items():
            for policy in ("lru", "lfu"):
                for slots in SLOTS:
                    prefetches = ("off", "correlation") if routing == "realistic" else ("off",)
                    for prefetch in prefetches:
                        rows.append(dict(routing=routing, top_k=trace.shape[-1],
                                         **replay(trace, policy, slots, prefetch)))
            print(f"{routing} batch {batch}: {trace.shape} replayed ({time.time() - t0:.0f} s)",
                  flush=True)
    with open(args.out, "w") as f:
        json.dump({"calibration": calib, "record_bytes": QWEN_RECORD_BYTES,
                   "model": RoutingModel().__dict__, "rows": rows}, f, indent=1)
    plot(rows, args.out.replace(".json", ".png"))
    print(f"{'routing':>9} {'k':>2} {'batch':>5} {'policy':>4} {'prefetch':>11} {'slots':>5} "
          f"{'hit':>6} {'MB/token':>9} {'prec':>5} {'recall':>6}")
    for r in rows:
        print(f"{r['routing']:>9} {r['top_k']:>2} {r['batch']:>5} {r['policy']:>4} "
              f"{r['prefetch']:>11} {r['slots_per_layer']:>5} {r['hit_rate']:>6.3f} "
              f"{r['bytes_per_token'] / 1e6:>9.1f} {r['prefetch_precision']:>5.2f} "
              f"{r['prefetch_recall']:>6.2f}")


if __name__ == "__main__":
    main()
