"""`HardwareProfile`: measured constants of this machine that the planner needs, as a value.

`profile_hardware` measures, in a few seconds, on the device it is given: host->device
bandwidth for expert-sized pinned copies, the grouped expert GEMM time of one MoE layer step
against the number of routed tokens (our kernel on CUDA, the torch reference elsewhere), the
router's time, and the fixed overhead of a layer step (`step.device_step` over a one-layer
cache whose experts are all hits: the directory update, the fork and join of the fills and the
launches, beyond the GEMM; inside a CUDA graph the launches cost less). Not measured: what the
model around the layer adds (attention); `benchmarks/planner_check.py` takes that from a stock
run. Nothing is hard-coded: the expert shape comes from the model's
`MoeGeometry`.

Example:
    profile = profile_hardware(geometry, "cuda")
    Path("profile.json").write_text(profile.to_json())
"""

import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from vllm_moe_offload.offload import kernels, step
from vllm_moe_offload.offload.cache import ExpertCache
from vllm_moe_offload.offload.geometry import MoeGeometry
from vllm_moe_offload.offload.store import ExpertStore


@dataclass(frozen=True)
class HardwareProfile:
    device: str
    h2d_gbps: float  # pinned host->device, expert-sized copies
    gemm_ms: dict[int, float] = field(default_factory=dict)  # routed tokens -> ms per layer
    layer_overhead_ms: float = 0.0  # fixed per MoE layer step (sync, plan, launches)
    attention_ms_per_seq: float = 0.0  # per layer and decoding sequence (incl. dense parts)
    router_ms: float = 0.0  # router GEMM and top-k of one layer step (in layer_overhead_ms)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "HardwareProfile":
        """A profile's JSON, or one that holds it under "profile" (a `plan --out` plan, a
        planner_check report)."""
        raw = json.loads(text)
        raw = raw.get("profile", raw)
        raw["gemm_ms"] = {int(k): float(v) for k, v in raw.get("gemm_ms", {}).items()}
        return cls(**raw)

    def gemm_time_ms(self, tokens: float) -> float:
        """Expert GEMM ms of one layer step, interpolated in log-tokens between measurements."""
        points = sorted(self.gemm_ms.items())
        if not points:
            return 0.0
        xs = np.log([max(t, 1) for t, _ in points])
        return float(np.interp(np.log(max(tokens, 1.0)), xs, [ms for _, ms in points]))


def time_ms(fn, device: str, repeats: int = 5) -> float:
    fn()  # warm-up (compiles kernels)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def measure_h2d_gbps(record_bytes: int, device: str, copies: int = 32) -> float:
    src = torch.empty(copies, record_bytes, dtype=torch.uint8)
    if device == "cuda":
        src = src.pin_memory()
    dst = torch.empty_like(src, device=device)

    def copy_all():
        for i in range(copies):
            dst[i].copy_(src[i], non_blocking=True)
    return src.numel() / (time_ms(copy_all, device) * 1e6)


def profile_hardware(geometry: MoeGeometry, device: str,
                     token_counts: tuple[int, ...] = (1, 4, 16, 64, 256)) -> HardwareProfile:
    layout, e, k = geometry.layout, geometry.num_experts, geometry.top_k
    pool = torch.randint(0, 0x38, (e, layout.record_bytes), dtype=torch.uint8).to(device)
    weights = layout.views(pool)  # small finite weights in every format
    for name in ("s13", "s2"):
        if name in weights:
            weights[name].fill_(1e-2)
    identity = torch.arange(e, dtype=torch.int32, device=device)  # expert e in slot e
    gemm_ms = {}
    for t in token_counts:
        hidden = torch.randn(t, layout.hidden, device=device).to(torch.bfloat16)
        topk_w, topk_ids = kernels.route(torch.randn(t, e, device=device), k, True)

        out = torch.empty_like(hidden)

        def step(hidden=hidden, topk_w=topk_w, topk_ids=topk_ids, out=out):
            run = kernels.begin(hidden, topk_w, topk_ids, weights, layout.block, e)
            kernels.run_pass(run, weights, identity)
            kernels.finish(run, out)
        gemm_ms[t] = round(time_ms(step, device), 4)
    router_ms, overhead_ms = measure_step_overhead(geometry, device, gemm_ms[token_counts[0]],
                                                   token_counts[0])
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return HardwareProfile(device=name, h2d_gbps=round(measure_h2d_gbps(layout.record_bytes,
                                                                         device), 2),
                           gemm_ms=gemm_ms, layer_overhead_ms=round(overhead_ms, 4),
                           router_ms=round(router_ms, 4))


def measure_step_overhead(geometry: MoeGeometry, device: str, gemm_ms: float,
                          tokens: int = 1) -> tuple[float, float]:
    """(router ms, layer step overhead ms) at `tokens` tokens: the device step over a
    one-layer cache, routed to the same resident experts every time, minus the GEMM time
    `gemm_ms`."""
    layout, e, k = geometry.layout, geometry.num_experts, geometry.top_k
    store = ExpertStore(layout, num_layers=1, num_experts=e)  # contents do not matter here
    cache = ExpertCache(store, num_slots=max(2 * k, e // 4), device=device)
    cache.preload()
    hidden = torch.randn(tokens, layout.hidden, device=device).to(torch.bfloat16)
    gate = torch.randn(layout.hidden, e, device=device).to(torch.bfloat16) / layout.hidden
    out = torch.empty_like(hidden)
    fixed = torch.arange(k, device=device).repeat(tokens, 1)  # [T, K]: always the same

    def route():
        return kernels.route(hidden @ gate, k, True)

    def layer_step():
        topk_w, _ = route()
        step.device_step(cache, 0, hidden, topk_w, fixed, out)
    router_ms = time_ms(route, device)
    return router_ms, max(0.0, time_ms(layer_step, device, repeats=20) - gemm_ms)
