"""MoE layer steps without vLLM around them: what the plugin's own step costs.

Runs the plugin's layer steps, with misses, over a cache holding BUDGET of the experts of
LAYERS layers, under uniform routing (random router logits, as vLLM's routing simulator), with
nothing of vLLM around them. Modes: `device` (step.device_step, eagerly), `graph` (the same,
every layer of a decode step captured in one CUDA graph and replayed, as vLLM's FULL graphs
run it; CUDA only) and `staged` (step.staged_step, the large-step path). Per mode and token
count it reports the wall time per layer, the experts that missed, the copy-bound time of those
misses at the copy engine's measured rate, and the rest. Compared with the same figures from
an engine, it tells what the op costs and what the engine adds.

No vLLM needed (the GPU machine can run it before staging vLLM); on CPU it runs the torch
reference, which is what the tests check.

usage: python benchmarks/bench_step.py [--model qwen3-30b-a3b-fp8] [--layers 8]
         [--budget 0.25] [--tokens 1,2,4,8,32] [--steps 10] [--modes device,graph,staged]
         [--trace DIR] [--out bench_step.json]
  --trace DIR: also a torch-profiler trace per (mode, tokens), each layer step marked
  `moe_offload_step`: `python benchmarks/trace_summary.py DIR/device-t8 --op moe_offload_step
  --layers LAYERS` splits it as it splits an engine's trace.
"""

import argparse
import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vllm_moe_offload.offload import kernels, step
from vllm_moe_offload.offload.cache import ExpertCache
from vllm_moe_offload.offload.store import ExpertStore
from vllm_moe_offload.planning.profiler import measure_h2d_gbps, time_ms
from vllm_moe_offload.synthetic.checkpoint import model_geometry

MODES = ("device", "graph", "staged")
STEPS = {"device": step.device_step, "graph": step.device_step, "staged": step.staged_step}
TRACE_MARK = "moe_offload_step"
PREFILL_TOKENS = 128


@dataclass(frozen=True)
class Row:
    mode: str
    tokens: int
    layer_ms: float  # wall time per layer step, median over the timed decode steps
    unique_per_layer: float  # routed experts per layer step
    misses_per_layer: float  # filled, or read without a slot
    fills_per_layer: float
    copy_ms_per_layer: float  # the misses' bytes at the measured copy rate
    rest_ms_per_layer: float  # layer_ms - copy_ms_per_layer
    stall_ms_per_layer: float  # compute stream waiting for staged copies (staged, CUDA)


class Bench:
    def __init__(self, model: str, layers: int, budget: float, device: str):
        self.geometry = model_geometry(model)
        layout = self.geometry.layout
        self.device = device
        self.store = ExpertStore(layout, layers, self.geometry.num_experts)
        self.store.fill_random()
        self.num_slots = max(round(budget * layers * self.geometry.num_experts),
                             layers * self.geometry.top_k)
        self.h2d_gbps = measure_h2d_gbps(layout.record_bytes, device)

    def cache(self) -> ExpertCache:
        cache = ExpertCache(self.store, self.num_slots, device=self.device)
        cache.preload()
        return cache

    def decode_step(self, cache: ExpertCache, mode: str, hidden: torch.Tensor,
                    out: torch.Tensor, mark: bool = False) -> None:
        """One decode step through every layer: route (random logits) and the layer's step;
        the mark holds the routing too, as the engine's op runs its router."""
        g = self.geometry
        for layer in range(self.store.num_layers):
            logits = torch.randn(hidden.shape[0], g.num_experts, device=self.device)
            with torch.profiler.record_function(TRACE_MARK) if mark else contextlib.nullcontext():
                weights, ids = kernels.route(logits, g.top_k, True)
                STEPS[mode](cache, layer, hidden, weights, ids, out)

    def graphed(self, cache: ExpertCache, hidden: torch.Tensor, out: torch.Tensor):
        """A decode step captured in one CUDA graph (its random logits drawn anew on every
        replay): how vLLM's FULL graphs run it."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up outside the capture, as vLLM does
            self.decode_step(cache, "device", hidden, out)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.decode_step(cache, "device", hidden, out)
        return graph.replay

    def run(self, mode: str, tokens: int, steps: int, trace: Path | None) -> Row:
        torch.manual_seed(tokens)  # every mode sees the same routing at a token count
        cache = self.cache()
        hidden = torch.randn(tokens, self.geometry.layout.hidden, device=self.device)
        hidden = hidden.to(torch.bfloat16)
        out = torch.empty_like(hidden)
        # a prefill's step warms every layer's slots and scores, as in an engine
        prefill = torch.randn(PREFILL_TOKENS, hidden.shape[1], device=self.device)
        prefill = prefill.to(hidden.dtype)
        self.decode_step(cache, "device", prefill, torch.empty_like(prefill))
        if mode == "graph":
            decode = self.graphed(cache, hidden, out)
        else:
            def decode():
                self.decode_step(cache, mode, hidden, out)
        decode()  # compiles the kernels
        self._sync()
        before = cache.snapshot()
        layer_ms = time_ms(decode, self.device, repeats=steps) / self.store.num_layers
        after = cache.snapshot()
        layer_steps = after.layer_steps - before.layer_steps
        misses = (after.misses - before.misses) / layer_steps
        unique = misses + (after.hits - before.hits) / layer_steps
        copy_ms = misses * self.geometry.layout.record_bytes / (self.h2d_gbps * 1e6)
        if trace is not None and mode != "graph":
            self._trace(cache, mode, hidden, out, trace / f"{mode}-t{tokens}")
        return Row(mode, tokens, round(layer_ms, 4), round(unique, 2), round(misses, 2),
                   round((after.fills - before.fills) / layer_steps, 2), round(copy_ms, 4),
                   round(layer_ms - copy_ms, 4),
                   round((after.stall_ms - before.stall_ms) / layer_steps, 4))

    def _trace(self, cache, mode, hidden, out, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(3):
                self.decode_step(cache, mode, hidden, out, mark=True)
            self._sync()
        prof.export_chrome_trace(str(folder / "bench_step.pt.trace.json"))

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def vllm_version() -> str | None:
    """The vLLM beside the plugin: on CUDA its grouping kernel replaces a dozen torch ops in
    each step, as in an engine."""
    try:
        import vllm
    except ImportError:
        return None
    return vllm.__version__


def format_table(rows: list[Row]) -> str:
    lines = [f"{'mode':>7} {'tokens':>6} {'ms/layer':>9} {'unique':>7} {'misses':>7} "
             f"{'fills':>6} {'copy ms':>8} {'rest ms':>8} {'stall ms':>9}"]
    for r in rows:
        lines.append(f"{r.mode:>7} {r.tokens:>6} {r.layer_ms:>9.3f} {r.unique_per_layer:>7.1f} "
                     f"{r.misses_per_layer:>7.1f} {r.fills_per_layer:>6.1f} "
                     f"{r.copy_ms_per_layer:>8.3f} {r.rest_ms_per_layer:>8.3f} "
                     f"{r.stall_ms_per_layer:>9.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen3-30b-a3b-fp8",
                        help="a make-model preset or a checkpoint directory (its config only)")
    parser.add_argument("--layers", type=int, default=8,
                        help="MoE layers in the store (8 of Qwen3-30B-A3B: 4.8 GB pinned)")
    parser.add_argument("--budget", type=float, default=0.25,
                        help="share of the experts the cache holds")
    parser.add_argument("--tokens", default="1,2,4,8,32")
    parser.add_argument("--steps", type=int, default=10, help="timed decode steps per point")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--trace", default=None, help="directory for torch-profiler traces")
    parser.add_argument("--out", default="bench_step.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    modes = args.modes.split(",")
    if device != "cuda" and "graph" in modes and args.modes == parser.get_default("modes"):
        modes.remove("graph")  # CUDA graphs need CUDA
    if not set(modes) <= set(MODES) or (device != "cuda" and "graph" in modes):
        parser.error(f"--modes: choose from {', '.join(MODES)} (graph: CUDA only)")
    if not 0 < args.budget < 1 or args.layers < 1 or args.steps < 1:
        parser.error("need 0 < --budget < 1, --layers >= 1 and --steps >= 1")
    bench = Bench(args.model, args.layers, args.budget, device)
    trace = Path(args.trace) if args.trace else None
    rows = [bench.run(mode, int(t), args.steps, trace)
            for mode in modes for t in args.tokens.split(",")]
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    Path(args.out).write_text(json.dumps(
        dict(card=card, vllm=vllm_version(), model=args.model, layers=args.layers,
             budget=args.budget,
             num_slots=bench.num_slots, h2d_gbps=round(bench.h2d_gbps, 2),
             rows=[asdict(r) for r in rows]), indent=2))
    print(f"{card}, {args.model}, {args.layers} layers, {bench.num_slots} slots "
          f"({args.budget:.0%}), copies at {bench.h2d_gbps:.1f} GB/s")
    print(format_table(rows))


if __name__ == "__main__":
    main()
