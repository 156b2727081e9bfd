"""The soak's 60-s CPU smoke (benchmarks/soak.py --smoke): a server with offload at a 25%
budget under four streams, a share of them closed mid-stream; it passes, and what it measured
shows the load, the aborts and the expert fetches really happened."""

import json
import subprocess
import sys

import pytest

from tests.e2e.conftest import REPO, engine_env
from tests.helpers.server import processes_mentioning

pytestmark = pytest.mark.e2e


def test_soak_smoke(tmp_path):
    out, tmp = tmp_path / "soak", tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.run([sys.executable, "benchmarks/soak.py", "--smoke", "--out", str(out)],
                          cwd=REPO, env=engine_env(TMPDIR=str(tmp)), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.splitlines()[-1] == "soak: passed"
    assert not processes_mentioning(str(tmp)), "the server outlived the soak"
    result = json.loads((out / "soak.json").read_text())
    assert result["passed"] and result["failures"] == []
    requests = result["requests"]
    assert requests["ok"] >= 20 and requests["aborted"] >= 2 and requests["error"] == 0
    assert result["drained"] and result["healthy"]
    samples = result["samples"]
    assert len(samples) >= 20 and samples[-1]["t_s"] >= 60
    assert all(s["counter_problems"] == [] and s["rss_mib"] > 0 for s in samples)
    first, last = samples[0]["counters"], samples[-1]["counters"]
    # 8 slots for 32 experts: the load keeps fetching, and every byte is a whole record
    assert last["cache_slots"] == 8 and result["settings"]["record_bytes"] == 49152
    assert last["fills"] > first["fills"] and last["h2d_bytes"] > first["h2d_bytes"]
    assert last["h2d_bytes"] == (last["fills"] + last["reads"]) * 49152
    assert max(s["tok_s"] for s in samples) > 0
    assert "rss_mib" in result["slopes"]
    assert (out / "soak.png").stat().st_size > 0
