"""`vllm serve` as a real subprocess on 127.0.0.1, run the way the README says to run it
(`vllm-moe-offload serve`), stopped (whole process group) on exit."""

import os
import shutil
import sysconfig
from contextlib import contextmanager
from pathlib import Path

from vllm_moe_offload.server import free_port, running_server


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


@contextmanager
def vllm_server(model: Path, args: list[str], log_path: Path, env: dict,
                timeout_s: float = 300):
    """Yields the base URL once /health answers; the log collects stdout and stderr."""
    port = free_port()
    cmd = [*serve_cli(), str(model), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", "tiny", "--max-model-len", "512",
           "--dtype", "bfloat16", "--gpu-memory-utilization", "0.3", *args]
    url = f"http://127.0.0.1:{port}"
    with running_server(cmd, url, log_path, env, timeout_s=timeout_s, grace_s=30):
        yield url
