"""Where a MoE layer step's time goes, from a torch-profiler trace of decode steps.

Splits one trace (the `*.pt.trace.json[.gz]` that vLLM's torch profiler writes, e.g.
`bench_e2e.py SYSTEM lat --trace DIR`, or bench_step.py's) into:
  per layer step: the op's wall time (`vllm::moe_offload_experts`), and within it the time
    blocked on the host (cudaStreamSynchronize / cudaMemcpy* / event waits: a staged step's
    one sync; a device step has none), in CUDA launches and copies issued, and in the rest
    (Python);
  GPU: kernel time, host->device copy time and the busy share of the traced window (the rest
    is the GPU waiting for the host).
Prints a table and writes trace_summary.json beside the trace.

usage: python benchmarks/trace_summary.py TRACE_OR_DIR [--layers 48] [--op EVENT]
"""

import argparse
import bisect
import gzip
import json
from pathlib import Path

OP = "vllm::moe_offload_experts"
SYNC = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}
LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cudaMemcpyAsync", "cudaGraphLaunch",
          "cudaEventRecord", "cudaStreamWaitEvent")


def read_trace(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def load_events(path: Path, op: str = OP) -> list[dict]:
    """A trace file's complete events; for a directory, the newest trace that holds the op
    (a front-end process may write a trace of its own beside the worker's)."""
    if not path.is_dir():
        return read_trace(path)
    traces = sorted(path.rglob("*.pt.trace.json*"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise SystemExit(f"no *.pt.trace.json[.gz] under {path}")
    newest = None
    for trace in reversed(traces):  # newest first, read only until one holds the op
        events = read_trace(trace)
        if any(e.get("name") == op for e in events):
            return events
        if newest is None:
            newest = events
    return newest


def union_us(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) spans, µs."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(spans):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def time_inside(events: list[dict], outers: list[dict]) -> float:
    """Total duration of `events` that lie within one of `outers` on the same thread, µs
    (`outers` do not overlap on a thread: op calls do not nest)."""
    by_thread: dict[tuple, list[tuple[float, float]]] = {}
    for o in outers:
        by_thread.setdefault((o["pid"], o["tid"]), []).append((o["ts"], o["ts"] + o["dur"]))
    for spans in by_thread.values():
        spans.sort()
    total = 0.0
    for e in events:
        spans = by_thread.get((e["pid"], e["tid"]))
        if not spans:
            continue
        i = bisect.bisect_right(spans, (e["ts"], float("inf"))) - 1
        if i >= 0 and e["ts"] + e["dur"] <= spans[i][1]:
            total += e["dur"]
    return total


def summarise(events: list[dict], layers: int, op: str = OP) -> dict:
    # a record_function mark (bench_step) also leaves a GPU-clock annotation of that name
    ops = [e for e in events if e.get("name") == op and e.get("cat") != "gpu_user_annotation"]
    runtime = [e for e in events if e.get("cat") == "cuda_runtime"]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]

    def within_ops(kind) -> float:
        return time_inside([r for r in runtime if kind(r["name"])], ops)

    n = len(ops)
    op_us = sum(e["dur"] for e in ops)
    sync_us = within_ops(lambda name: name in SYNC)
    launch_us = within_ops(lambda name: name not in SYNC and name.startswith(LAUNCH))
    result = dict(layer_steps=n, decode_steps=round(n / layers, 1) if layers else None)
    if n:
        result.update(op_ms_per_layer=round(op_us / n / 1e3, 4),
                      sync_ms_per_layer=round(sync_us / n / 1e3, 4),
                      launch_ms_per_layer=round(launch_us / n / 1e3, 4),
                      host_rest_ms_per_layer=round((op_us - sync_us - launch_us) / n / 1e3, 4))
    if gpu:
        start = min(e["ts"] for e in gpu)
        window = max(e["ts"] + e["dur"] for e in gpu) - start
        kernels = [e for e in gpu if e["cat"] == "kernel"]
        h2d = [e for e in gpu if e["cat"] == "gpu_memcpy" and "HtoD" in e["name"]]
        result.update(gpu_window_ms=round(window / 1e3, 3),
                      gpu_busy_share=round(union_us([(e["ts"], e["ts"] + e["dur"])
                                                     for e in gpu]) / window, 3),
                      kernel_ms=round(sum(e["dur"] for e in kernels) / 1e3, 3),
                      h2d_ms=round(sum(e["dur"] for e in h2d) / 1e3, 3), h2d_copies=len(h2d))
        if n:
            result["window_ms_per_layer"] = round(window / n / 1e3, 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trace", help="a trace file or a directory holding traces (newest)")
    parser.add_argument("--layers", type=int, default=48, help="MoE layers per decode step")
    parser.add_argument("--op", default=OP, help="the event of one layer step (bench_step.py: "
                        "moe_offload_step)")
    args = parser.parse_args()
    path = Path(args.trace)
    result = summarise(load_events(path, args.op), args.layers, args.op)
    out = (path if path.is_dir() else path.parent) / "trace_summary.json"
    out.write_text(json.dumps(result, indent=2))
    for key, value in result.items():
        print(f"{key:>24} {value}")


if __name__ == "__main__":
    main()
