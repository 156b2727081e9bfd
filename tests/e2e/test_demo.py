"""`vllm-moe-offload demo` (what scripts/demo.sh runs): says what it shows, answers, explains
its counters, leaves no temporary folder; a busy port gets one line, not a traceback."""

import socket
import subprocess
import sys

import pytest

from tests.e2e.conftest import REPO, engine_env

pytestmark = pytest.mark.e2e


def demo(tmp_path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "vllm_moe_offload", "demo", *args], cwd=REPO,
                          env=engine_env(TMPDIR=str(tmp_path / "tmp")), capture_output=True,
                          text=True, timeout=600)


def test_busy_port_is_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = demo(tmp_path, "--port", str(port))
    assert proc.returncode == 1
    assert proc.stdout == ""
    line, = proc.stderr.splitlines()  # one line, no traceback
    assert line.startswith(f"demo: port {port} on 127.0.0.1 is in use; pass a free one, e.g. "
                           "--port "), line


def test_demo_explains_itself_and_cleans_up(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = demo(tmp_path, "--port", str(port))
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "random weights, so its answer is noise" in out
    assert "cache: 12 expert slots = 6 per MoE layer of its 16 experts (2 MoE layers, top-4)" in out
    assert "\nanswer: '" in out
    assert "offload counters: hits=" in out and "fills=" in out and "h2d=" in out
    assert "include vLLM's start-up profile run" in out
    assert not list((tmp_path / "tmp").glob("moe-offload-demo-*")), "temporary folder left"
