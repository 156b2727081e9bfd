"""`vllm-moe-offload demo` (what scripts/demo.sh runs) without the server: a busy port or a
missing model is one line, not a traceback, and leaves no temporary folder; the cache is told
in slots per MoE layer. (Its server and chat are what test_serve.py runs; a whole demo would
add a minute and a half to the suite.)"""

import socket
import subprocess
import sys

import pytest

from tests.e2e.conftest import REPO, engine_env
from vllm_moe_offload.demo import cache_size
from vllm_moe_offload.synthetic.checkpoint import write_checkpoint

pytestmark = pytest.mark.e2e


def demo(tmp_path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "vllm_moe_offload", "demo", *args], cwd=REPO,
                          env=engine_env(TMPDIR=str(tmp_path / "tmp")), capture_output=True,
                          text=True, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout + proc.stderr
    line, = proc.stderr.splitlines()  # no traceback
    return line


def test_busy_port_is_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_line_error(demo(tmp_path, "--port", str(port)))
    assert line.startswith(f"demo: port {port} on 127.0.0.1 is in use; pass a free one, e.g. "
                           "--port "), line


def test_a_missing_model_is_one_line_and_leaves_no_temporary_folder(tmp_path):
    line = one_line_error(demo(tmp_path, "--model", str(tmp_path / "nowhere")))
    assert line == (f"demo: {tmp_path / 'nowhere'} has no config.json; give a checkpoint "
                    "directory (vllm-moe-offload make-model writes one)")
    assert list((tmp_path / "tmp").iterdir()) == []  # its folder was made, and removed


def test_cache_is_told_in_slots_per_moe_layer(tmp_path):
    model = write_checkpoint(tmp_path / "tiny", "tiny", progress=False)
    assert cache_size(model, 12).startswith(
        "12 expert slots = 6 per MoE layer of its 16 experts (2 MoE layers, top-4); the other "
        "experts stay in host memory")
