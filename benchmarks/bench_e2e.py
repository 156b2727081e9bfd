"""End-to-end speed of one system on the Qwen3-30B-A3B-Instruct-2507-FP8 shape
(load_format=dummy), in the method of ../shared/device/baseline_reference.py, which measured
the `stock` and `uva` baselines in benchmarks.md: offline LLM, random prompt ids, temperature
1.0, ignore_eos, one short warm-up generate, wall time of one `generate` per scenario. Per-
request first-token and last-token times (vLLM's request stats) give TTFT and TPOT.

usage (GPU machine, kit env): python benchmarks/bench_e2e.py SYSTEM SCENARIOS
       [--routing uniform|realistic|model] [--out F.json] [--preset P]
  SYSTEM: stock | uvaNN | offloadNN   (NN: percent of the expert bytes held on the GPU)
  SCENARIOS: comma-separated lat,thr,ttft or nN (N sequences of 128 -> 64 tokens: the
             concurrency sweep the planner's --max-num-seqs is checked against; 64 decode
             steps keep n128 near half a minute at a 25% budget)
  --routing (the same for every system; every row records it): `uniform`: vLLM's routing
          simulator (VLLM_MOE_ROUTING_SIMULATION_STRATEGY=uniform_random, which the plugin
          honours too), the worst case for any cache; `realistic` (default): the
          realistic-routing load format, dummy weights whose routers route like the real
          Qwen3-30B-A3B (realistic.py); `model`: load_format=dummy's own random routers.
  --routing-stats N: afterwards N requests of 256 tokens with vLLM's
          --enable-return-routed-experts (stock and uva only: vLLM 0.26 captures its own MoE
          layers), and the statistics of the routing the engine did beside the real trace's.
Each run writes one JSON; benchmarks/e2e_report.py merges runs into the table, JSON and plot.
"""

import argparse
import contextlib
import fcntl
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

from vllm_moe_offload.offload.geometry import MoeGeometry
from vllm_moe_offload.planning.profiler import measure_h2d_gbps
from vllm_moe_offload.synthetic.checkpoint import PRESETS, hf_config, model_geometry
from vllm_moe_offload.synthetic.realistic import LOAD_FORMAT as REALISTIC_LOAD_FORMAT
from vllm_moe_offload.units import GIB

SCENARIOS = {"lat": (1, 128, 256), "thr": (64, 128, 256), "ttft": (16, 2048, 16)}
ROUTINGS = ("uniform", "realistic", "model")
UNIFORM_ENV = "VLLM_MOE_ROUTING_SIMULATION_STRATEGY"


def scenario_shape(name: str) -> tuple[int, int, int]:
    """(sequences, prompt tokens, output tokens) of a named scenario or of 'nN'."""
    if name in SCENARIOS:
        return SCENARIOS[name]
    if name.startswith("n") and name[1:].isdigit() and int(name[1:]) > 0:
        return int(name[1:]), 128, 64
    raise SystemExit(f"unknown scenario {name!r}: lat, thr, ttft or nN (e.g. n16)")


def barrier_spec(text: str) -> tuple[Path, int]:
    """--barrier DIR:N -> (DIR, N)."""
    folder, count = text.rsplit(":", 1)
    return Path(folder), int(count)


def measure_alone(barrier: tuple[Path, int] | None, system: str, timeout_s: float = 420.0):
    """Engines that start side by side (to share the minutes of start-up) measure one at a
    time, and only once all have started: `barrier` is (DIR, N). Each engine marks itself
    ready in DIR, waits for N marks (an engine that failed to start marks itself failed:
    `mark_failed`; `timeout_s` covers one killed outright), then holds an exclusive lock on
    DIR while it measures, so neither PCIe nor the GPU is shared."""
    if not barrier:
        return contextlib.nullcontext()
    folder, count = barrier
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{system}.ready").touch()
    deadline = time.time() + timeout_s
    while (len(list(folder.glob("*.ready"))) + len(list(folder.glob("*.failed"))) < count
           and time.time() < deadline):
        time.sleep(1)
    lock = open(folder / "measure.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def mark_failed(barrier: tuple[Path, int] | None, system: str) -> None:
    """Tells the engines waiting at the barrier not to wait for this one."""
    if barrier:
        barrier[0].mkdir(parents=True, exist_ok=True)
        (barrier[0] / f"{system}.failed").touch()


def parse_system(system: str) -> tuple[str, float | None]:
    """'offload25' -> ('offload', 0.25); 'stock' -> ('stock', None)."""
    for kind in ("uva", "offload"):
        if system.startswith(kind) and system[len(kind):].isdigit():
            return kind, int(system[len(kind):]) / 100
    if system != "stock":
        raise SystemExit(f"unknown system {system!r}: stock, uvaNN or offloadNN")
    return "stock", None


def engine_kwargs(system: str, model_dir: Path, expert_gib: float, engines: int = 1,
                  routing: str = "realistic", max_num_seqs: int = 256, tp: int = 1) -> dict:
    """engines: how many start side by side on the card. The KV cache has a fixed size, so
    gpu_memory_utilization only sets the free memory that vLLM checks for at start-up.
    max_num_seqs: the most sequences a scenario runs (fewer CUDA-graph sizes to capture).
    tp: tensor-parallel GPUs; the budget is per card (each holds 1/tp of every expert).
    routing: see the module's doc (`uniform` also needs UNIFORM_ENV, set by `use_routing`)."""
    kind, share = parse_system(system)
    load_format = REALISTIC_LOAD_FORMAT if routing == "realistic" else "dummy"
    kw = dict(model=str(model_dir), skip_tokenizer_init=True, load_format=load_format,
              max_model_len=4096, kv_cache_memory_bytes=8 << 30, max_num_seqs=max_num_seqs, seed=0,
              disable_log_stats=False, gpu_memory_utilization=0.9 / engines)
    if tp > 1:
        kw["tensor_parallel_size"] = tp
    if kind == "uva":  # as baseline_reference.py; --cpu-offload-gb is per GPU
        kw.update(cpu_offload_gb=29.0 / tp * (1 - share) * 0.93, cpu_offload_params={"experts"})
    elif kind == "offload":
        kw["additional_config"] = {"expert_offload": {"enabled": True,
                                                      "cache_gb": expert_gib / tp * share}}
    if not torch.cuda.is_available():  # a CPU smoke run of this script
        kw.update(kv_cache_memory_bytes=None, max_model_len=512, gpu_memory_utilization=0.3,
                  enforce_eager=True)
    return kw


def use_routing(routing: str) -> None:
    """Sets this process's routing (the engine's processes inherit it) before vLLM starts."""
    if routing not in ROUTINGS:
        raise SystemExit(f"unknown routing {routing!r}: one of {', '.join(ROUTINGS)}")
    if routing == "uniform":
        os.environ[UNIFORM_ENV] = "uniform_random"
    elif os.environ.pop(UNIFORM_ENV, None):
        print(f"bench_e2e: {UNIFORM_ENV} unset for --routing {routing}")


def request_times(outs) -> tuple[list[float], list[float]]:
    """TTFT and TPOT (seconds) per request from vLLM's request stats, where present."""
    ttft, tpot = [], []
    for o in outs:
        m = getattr(o, "metrics", None)
        if m is None or not getattr(m, "first_token_ts", 0):
            continue
        ttft.append(m.first_token_latency)
        n = len(o.outputs[0].token_ids)
        if n > 1:
            tpot.append((m.last_token_ts - m.first_token_ts) / (n - 1))
    return ttft, tpot


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    return round(statistics.quantiles(xs, n=100, method="inclusive")[q - 1] * 1e3, 2) \
        if len(xs) > 1 else round(xs[0] * 1e3, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("system")
    parser.add_argument("scenarios")
    parser.add_argument("--out", default=None)
    parser.add_argument("--preset", default="qwen3-30b-a3b-fp8")
    parser.add_argument("--trace", default=None, metavar="DIR",
                        help="after the scenarios, trace one sequence's decode steps with "
                             "vLLM's torch profiler into DIR and summarise them "
                             "(trace_summary.py)")
    parser.add_argument("--barrier", default=None, type=barrier_spec, metavar="DIR:N",
                        help="N engines start side by side and measure one at a time")
    parser.add_argument("--routing", default="realistic", choices=ROUTINGS)
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel size (the budget stays per card)")
    parser.add_argument("--routing-stats", type=int, default=0, metavar="N",
                        help="then N requests with vLLM's routed-experts capture: the "
                             "engine's routing statistics (stock and uva only)")
    args = parser.parse_args()
    use_routing(args.routing)
    if args.routing_stats and parse_system(args.system)[0] == "offload":
        raise SystemExit("--routing-stats needs vLLM's own MoE layers: stock or uvaNN")
    from vllm import LLM

    config = hf_config(PRESETS[args.preset])
    model_dir = Path(os.environ.get("BENCH_MODEL_DIR", "/root/q3shape-offload"))
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config))
    geometry = model_geometry(args.preset)
    expert_gib = geometry.total_experts * geometry.layout.record_bytes / GIB
    cuda = torch.cuda.is_available()
    t0 = time.time()
    engines = args.barrier[1] if args.barrier else 1
    most = max(scenario_shape(s)[0] for s in args.scenarios.split(","))
    kwargs = engine_kwargs(args.system, model_dir, expert_gib, engines, args.routing,
                           max_num_seqs=max(most, args.routing_stats), tp=args.tp)
    if args.routing_stats:
        kwargs["enable_return_routed_experts"] = True
    if args.trace:
        kwargs["profiler_config"] = {"profiler": "torch", "torch_profiler_with_stack": False,
                                     "torch_profiler_dir": str(Path(args.trace).resolve())}
    tag = f"{args.system}-{args.routing}-tp{args.tp}"  # one mark per engine at the barrier
    try:
        llm = LLM(**kwargs)
    except BaseException:
        mark_failed(args.barrier, tag)
        raise
    load_s = time.time() - t0
    result = dict(card=torch.cuda.get_device_name() if cuda else "cpu",
                  date=time.strftime("%Y-%m-%d"), model=args.preset, routing=args.routing,
                  rows=[])
    try:
        import vllm
        result["vllm"] = vllm.__version__
    except ImportError:
        pass

    def save(rows: list[dict]) -> None:  # after every scenario: a timeout keeps what ran
        result["rows"] = rows
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))

    with measure_alone(args.barrier, tag):
        bw = measure_h2d_gbps(geometry.layout.record_bytes, "cuda") * 1e9 if cuda else 0.0
        result["bw_h2d_gbs"] = round(bw / 1e9, 1)
        rows = run_scenarios(llm, args, config, geometry, load_s, save)
        if args.trace:
            result["trace"] = trace_decode(llm, args.trace, geometry.num_moe_layers)
            save(rows)
        if args.routing_stats:
            result["routing_stats"] = routing_stats(llm, args.routing_stats, config)
            print("ROUTING", json.dumps(result["routing_stats"]), flush=True)
            save(rows)
    print(f"{result['card']}  bw_h2d {result['bw_h2d_gbs']} GB/s  engine start {load_s:.0f} s")
    for r in rows:
        print(f"{r['system']:>18} {r['scenario']:>5} {r['tok_s']:>9.1f} tok/s  "
              f"ttft p50 {r['ttft_ms_p50']} ms  tpot p50 {r['tpot_ms_p50']} ms  "
              f"hit {r.get('hit_rate', '-')}  PCIe GB/tok {r.get('pcie_gb_per_tok', '-')}  "
              f"stall ms/step {r.get('stall_ms_per_step', '-')}")


def engine_gpu_gib() -> float | None:
    """GPU memory of this process and its engine's (NVML), not of engines started beside it;
    None where NVML cannot see our processes (other PID namespace) or there is no GPU."""
    if not torch.cuda.is_available():
        return None
    import psutil
    from vllm.third_party import pynvml
    pynvml.nvmlInit()
    ours = {os.getpid()} | {c.pid for c in psutil.Process().children(recursive=True)}
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    used = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            if p.pid in ours and p.usedGpuMemory]
    return round(sum(used) / GIB, 2) if used else None


def run_scenarios(llm, args, config: dict, geometry: MoeGeometry, load_s: float,
                  save) -> list[dict]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    used_gib = engine_gpu_gib()
    random.seed(0)
    rows = []
    for scen in args.scenarios.split(","):
        n, plen, olen = scenario_shape(scen)
        prompts = [TokensPrompt(prompt_token_ids=[random.randrange(1000, config["vocab_size"])
                                                  for _ in range(plen)]) for _ in range(n)]
        params = SamplingParams(max_tokens=olen, temperature=1.0, ignore_eos=True,
                                detokenize=False, seed=0)
        llm.generate(prompts[:1], SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False),
                     use_tqdm=False)
        before = _stats(llm, args.system)
        t0 = time.time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.time() - t0
        after = _stats(llm, args.system)
        ntok = sum(len(o.outputs[0].token_ids) for o in outs)
        ttft, tpot = request_times(outs)
        share = parse_system(args.system)[1]
        row = dict(system=args.system, scenario=scen, budget=1.0 if share is None else share,
                   n=n, prompt=plen, out=olen, tok_s=round(ntok / dt, 2), wall_s=round(dt, 2),
                   ttft_ms_p50=pct(ttft, 50), tpot_ms_p50=pct(tpot, 50),
                   tpot_ms_p99=pct(tpot, 99), load_s=round(load_s, 1),
                   gpu_mem_used_gib=used_gib, routing=args.routing, tp=args.tp)
        if after:
            row.update(offload_row(before, after, ntok, geometry.num_moe_layers))
        rows.append(row)
        print("RESULT", json.dumps(row), flush=True)
        save(rows)
    return rows


TRACE_TOKENS = 16
STATS_TOKENS = 256


def routing_stats(llm, requests: int, config: dict) -> dict:
    """`requests` requests of STATS_TOKENS tokens at once, their routing as the engine did it
    (vLLM's routed-experts capture), measured per request beside the real trace."""
    import numpy as np
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_moe_offload.offload.geometry import moe_layer_ids
    from vllm_moe_offload.synthetic.traces import load_real_trace, measure
    rng = random.Random(1)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(1000, config["vocab_size"])
                                              for _ in range(16)]) for _ in range(requests)]
    params = SamplingParams(max_tokens=STATS_TOKENS, temperature=1.0, ignore_eos=True,
                            detokenize=False, seed=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    layers = moe_layer_ids(config)
    decode = [np.asarray(o.outputs[0].routed_experts)[16:16 + STATS_TOKENS - 1, layers]
              for o in outs]  # the tokens fed after the prompt: [steps, L, K] each
    trace = np.stack(decode, axis=2)  # [steps, L, R, K]
    round3 = lambda d: {k: round(v, 3) for k, v in d.items()}  # noqa: E731
    return {"requests": requests, "tokens": trace.shape[0],
            "engine": round3(measure(trace, config["num_experts"])),
            "real_trace_top6": round3(measure(load_real_trace(), config["num_experts"]))}


def trace_decode(llm, trace_dir: str, num_moe_layers: int) -> dict:
    """One sequence, a 16-token prompt and 16 new tokens, under vLLM's torch profiler (kept out
    of the timed scenarios): where a layer step's time goes (trace_summary.py)."""
    from trace_summary import load_events, summarise
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    prompt = TokensPrompt(prompt_token_ids=list(range(1000, 1016)))
    params = SamplingParams(max_tokens=TRACE_TOKENS, ignore_eos=True, detokenize=False)
    llm.start_profile()
    llm.generate([prompt], params, use_tqdm=False)
    llm.stop_profile()
    summary = summarise(load_events(Path(trace_dir)), num_moe_layers)
    print("TRACE", json.dumps(summary), flush=True)
    return summary


def offload_row(before: dict, after: dict, ntok: int, num_moe_layers: int) -> dict:
    """The scenario's share of the plugin's own counters."""
    d = {k: after[k] - before[k] for k in ("hits", "misses", "fills", "reads", "bytes_h2d",
                                           "layer_steps", "staged_steps", "stall_ms")}
    lookups = d["hits"] + d["misses"]
    steps = max(1, d["layer_steps"]) / num_moe_layers
    return dict(hit_rate=round(d["hits"] / max(1, lookups), 3),
                pcie_gb_per_tok=round(d["bytes_h2d"] / 1e9 / ntok, 4),
                bytes_h2d=d["bytes_h2d"], misses=d["misses"], fills=d["fills"],
                reads=d["reads"], slot_bytes=after["slot_bytes"],
                bytes_check=d["bytes_h2d"] == (d["fills"] + d["reads"]) * after["slot_bytes"],
                unique_experts_per_layer_step=round(lookups / max(1, d["layer_steps"]), 2),
                staged_steps=d["staged_steps"],
                stall_ms_per_step=round(d["stall_ms"] / steps, 3),
                cache_gib=round(after["num_slots"] * after["slot_bytes"] / GIB, 2),
                staging_gib=round(after["staging_slots"] * after["slot_bytes"] / GIB, 2),
                pinned_gib=round(after["store_bytes"] / GIB, 2))


def _stats(llm, system: str) -> dict | None:
    if parse_system(system)[0] != "offload":
        return None
    return llm.collective_rpc("expert_offload_stats")[0]


if __name__ == "__main__":
    main()
