"""Replays routing traces through the cache's rule on the CPU: hit rate and PCIe bytes per
token per routing, rule, cache size and batch.

Rules: `device` is the rule the cache runs (on the GPU, kernels/directory.py: integer LFU with
decay; misses take the slots of residents the step does not route to, the rest are read
without a slot), replayed through its host model `policies.DirectoryModel`; `lfu` and `lru`
are the host policies the cache ran before (policies.py: each step's misses evict the policy's
victims outside their pass), for comparison: the device rule must stay within a point of LFU.

Routings (vllm_moe_offload/synthetic/traces.py):
- `real`: the recorded Qwen3-30B-A3B response (benchmarks/data/real-routing/), batch 1, top-6;
- `realistic-top6`: the generator calibrated to it, batch 1, averaged over SEEDS requests of
  the same length (its calibration: hit rates within 3 points, tests/test_traces.py);
- `realistic`: the generator at the served model's top-8, batches of independent requests;
- `uniform`: vLLM's uniform_random simulator, the worst case for any cache;
- `engine`: the full-size realistic-routing checkpoint's own table (realistic.py), requests
  starting at random points of its cycle, in the shapes of bench_e2e's lat / n8 / n64: what the
  engine's hit rate should be under `--routing realistic`.
Each step routes one token of each of `batch` requests through all 48 layers; the first 20%
of the steps warm the cache and are not counted. Bytes at the real FP8 record size (4.72 MB):
one record per miss (filled, or read without a slot).

usage: python benchmarks/cache_sim.py [--out benchmarks/results/cache_sim.json] [--quick]
"""

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch

from vllm_moe_offload.offload.policies import POLICIES, DirectoryModel
from vllm_moe_offload.offload.store import ExpertLayout
from vllm_moe_offload.synthetic.checkpoint import PRESETS, hf_config
from vllm_moe_offload.synthetic.traces import (
    RoutingModel,
    generate,
    load_real_trace,
    measure,
    uniform,
)

QWEN_RECORD_BYTES = ExpertLayout(2048, 768, torch.float8_e4m3fn, (128, 128)).record_bytes
NUM_EXPERTS = 128
SEEDS = 8  # generated requests averaged against the one real one
REAL_STEPS = 128
BATCH_STEPS = {1: 256, 8: 64, 64: 64}  # bench_e2e's lat and nN decode lengths
SLOTS = (8, 16, 32, 64)  # per layer, of 128: 6.25 / 12.5 / 25 / 50%


def replay(trace: np.ndarray, policy: str, slots_per_layer: int) -> dict:
    """Hit rate and bytes per token of `trace` [steps, L, B, K] under `policy` ("device",
    or a host policy of policies.POLICIES)."""
    steps, layers, batch, _ = trace.shape
    warmup = steps // 5
    hits = misses = 0
    if policy == "device":
        layer_models = [DirectoryModel(NUM_EXPERTS, list(range(slots_per_layer)))
                        for _ in range(layers)]
        def step(layer, ids):  # noqa: E306
            fills, reads, hit = layer_models[layer].step(ids)
            return len(hit), len(fills) + len(reads)
    else:
        residents = [set() for _ in range(layers)]
        policies = [POLICIES[policy](NUM_EXPERTS) for _ in range(layers)]
        def step(layer, ids):  # noqa: E306
            return _host_policy_step(residents[layer], policies[layer], slots_per_layer, ids)
    for s in range(steps):
        for layer in range(layers):
            h, m = step(layer, trace[s, layer])
            if s >= warmup:
                hits, misses = hits + h, misses + m
    tokens = (steps - warmup) * batch
    return dict(policy=policy, slots_per_layer=slots_per_layer, batch=batch,
                hit_rate=hits / max(1, hits + misses),
                bytes_per_token=misses * QWEN_RECORD_BYTES / tokens)


def _host_policy_step(resident: set, policy, quota: int, ids: np.ndarray) -> tuple[int, int]:
    """One step as the host-planned cache ran it: the hits first, then the misses in passes
    of at most `quota`, each evicting the policy's victims outside its own pass."""
    experts = np.unique(ids).tolist()
    policy.observe(experts)
    hits = [e for e in experts if e in resident]
    for e in hits:
        policy.touch(e)
    misses = [e for e in experts if e not in resident]
    for i in range(0, len(misses), quota):
        group = misses[i:i + quota]
        for e in group:
            if len(resident) >= quota:
                victim = policy.victim(set(group))
                policy.remove(victim)
                resident.discard(victim)
            resident.add(e)
            policy.insert(e)
    return len(hits), len(misses)


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
        for policy in ("lfu", "lru", "device"):
            for slots in (16, 32, 64):
                row[f"{policy}_{slots}"] = float(np.mean([replay(t, policy, slots)["hit_rate"]
                                                          for t in traces]))
        out[name] = row
    return out


def engine_trace(batch: int, steps: int, seed: int = 0) -> np.ndarray:
    """The full-size realistic-routing checkpoint's routing of `batch` requests starting at
    random points of its cycle (the engine's: bench_e2e prompts end on random tokens)."""
    from vllm_moe_offload.synthetic.realistic import RealisticRouting
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
        for policy in sorted({r["policy"] for r in rows}):
            pts = sorted((r["slots_per_layer"], r["hit_rate"]) for r in rows
                         if (r["routing"], r["batch"], r["policy"]) == (routing, batch, policy))
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=policy)
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
            for policy in ("lru", "lfu", "device"):
                for slots in SLOTS:
                    rows.append(dict(routing=routing, top_k=trace.shape[-1],
                                     **replay(trace, policy, slots)))
            print(f"{routing} batch {batch}: {trace.shape} replayed ({time.time() - t0:.0f} s)",
                  flush=True)
    with open(args.out, "w") as f:
        json.dump({"calibration": calib, "record_bytes": QWEN_RECORD_BYTES,
                   "model": RoutingModel().__dict__, "rows": rows}, f, indent=1)
    plot(rows, args.out.replace(".json", ".png"))
    print(f"{'routing':>9} {'k':>2} {'batch':>5} {'policy':>6} {'slots':>5} {'hit':>6} "
          f"{'MB/token':>9}")
    for r in rows:
        print(f"{r['routing']:>9} {r['top_k']:>2} {r['batch']:>5} {r['policy']:>6} "
              f"{r['slots_per_layer']:>5} {r['hit_rate']:>6.3f} "
              f"{r['bytes_per_token'] / 1e6:>9.1f}")


if __name__ == "__main__":
    main()
