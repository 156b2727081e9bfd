"""`vllm serve` as a real subprocess on 127.0.0.1, run the way the README says to run it
(`vllm-moe-offload serve`), stopped (whole process group) on exit."""

import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from contextlib import contextmanager
from pathlib import Path

import requests


def serve_cli() -> list[str]:
    """`vllm-moe-offload serve`: the console script pip installed beside this Python."""
    scripts = Path(sysconfig.get_path("scripts"))
    found = (str(scripts / "vllm-moe-offload") if (scripts / "vllm-moe-offload").exists()
             else shutil.which("vllm-moe-offload"))
    if found is None:
        raise FileNotFoundError(f"no vllm-moe-offload command in {scripts} or on PATH; install "
                                "the plugin (scripts/setup.sh)")
    return [found, "serve"]


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain `text` (servers that outlived a run)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
            continue
        if text in cmdline and proc.name != str(os.getpid()):
            found.append(f"{proc.name}: {cmdline}")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(model: Path, args: list[str], log_path: Path, env: dict,
                timeout_s: float = 300):
    """Yields the base URL once /health answers; the log collects stdout and stderr."""
    port = free_port()
    cmd = [*serve_cli(), str(model), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", "tiny", "--max-model-len", "512",
           "--dtype", "bfloat16", "--gpu-memory-utilization", "0.3", *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n"
                                   + log_path.read_text()[-5000:])
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("vllm serve did not become healthy:\n"
                                   + log_path.read_text()[-5000:])
            time.sleep(1)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
