"""running_server stops the server's whole process group, also when the caller fails and
when a child ignores SIGTERM (a stand-in for vLLM's engine core)."""

import os
import sys
import textwrap

import pytest
import requests

from vllm_moe_offload.server import free_port, running_server, running_servers

# Serves /health and leaves a SIGTERM-proof child in its process group.
FAKE_SERVER = textwrap.dedent("""
    import http.server, pathlib, subprocess, sys
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    pathlib.Path(sys.argv[2]).write_text(str(child.pid))
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_group_is_stopped_when_the_caller_fails(tmp_path):
    port, child_pid_file = free_port(), tmp_path / "child.pid"
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", FAKE_SERVER, str(port), str(child_pid_file)]
    with pytest.raises(RuntimeError, match="benchmark failed"):
        with running_server(cmd, url, tmp_path / "log", dict(os.environ), timeout_s=30,
                            grace_s=1) as proc:
            assert requests.get(f"{url}/health", timeout=5).status_code == 200
            child = int(child_pid_file.read_text())
            raise RuntimeError("benchmark failed")
    assert proc.returncode is not None and not _alive(proc.pid) and not _alive(child)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/health", timeout=5)


def test_a_server_that_dies_at_start_is_reported(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-c", "import sys; print('bad flag'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match="exited with 3(.|\n)*bad flag"):
        with running_server(cmd, f"http://127.0.0.1:{port}", tmp_path / "log",
                            dict(os.environ), timeout_s=30):
            pass


def test_servers_side_by_side_are_all_stopped_when_one_dies_at_start(tmp_path):
    port, child_pid_file = free_port(), tmp_path / "child.pid"
    # the first server is slow to start; the second dies meanwhile and is reported at once
    good = [sys.executable, "-c", "import time; time.sleep(8)\n" + FAKE_SERVER, str(port),
            str(child_pid_file)]
    bad = [sys.executable, "-c", "import sys, time; time.sleep(1); sys.exit(3)"]
    servers = [(good, f"http://127.0.0.1:{port}", tmp_path / "good.log", dict(os.environ)),
               (bad, f"http://127.0.0.1:{free_port()}", tmp_path / "bad.log", dict(os.environ))]
    with pytest.raises(RuntimeError, match="exited with 3"):
        with running_servers(servers, timeout_s=30, grace_s=1):
            pass
    assert not child_pid_file.exists()  # reported before the slow one got going
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
