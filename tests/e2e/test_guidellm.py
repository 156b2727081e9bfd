"""The guidellm sweep's CPU smoke mode: one short load point against `vllm serve
--enable-expert-offload`, with and without EAGLE-3, the two servers side by side; rows parse,
servers are gone afterwards."""

import json
import subprocess
import sys

import pytest

from tests.e2e.conftest import REPO, engine_env
from tests.helpers.server import processes_mentioning

pytestmark = pytest.mark.e2e
pytest.importorskip("guidellm", reason="guidellm comes with the bench extra (scripts/setup.sh)")


def test_smoke_sweep(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "benchmarks/guidellm_sweep.py", "--smoke",
                           "--side-by-side", "--out", str(out)], cwd=REPO, env=engine_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert not processes_mentioning(str(out)), "a server outlived the sweep"
    result = json.loads((out / "guidellm_sweep.json").read_text())
    rows = {row["system"]: row for row in result["rows"]}
    assert set(rows) == {"offload", "offload+eagle3"}
    for row in rows.values():
        assert row["scenario"] == "sweep" and row["concurrency"] == 2
        assert row["requests_ok"] > 0 and row["requests_err"] == 0
        assert row["tok_s"] > 0 and 0 < row["itl_ms_p50"] <= row["itl_ms_p99"]
        assert row["stream_tok_s"] > 0 and row["waves"] > 0
        assert row["ttft_ms_p50"] > 0 and 0 < row["hit_rate"] < 1
        assert row["pcie_gb_per_tok"] > 0 and row["unique_experts_per_layer_step"] > 0
    assert rows["offload"]["mean_acceptance_length"] is None
    assert rows["offload+eagle3"]["mean_acceptance_length"] >= 1
    assert (rows["offload"]["spec_tokens"], rows["offload+eagle3"]["spec_tokens"]) == (None, 3)
    assert result["card"] and result["vllm"] and result["commit"]
    assert (out / "raw" / "guidellm-offload-c2.json").exists()
    assert (out / "guidellm_sweep.png").stat().st_size > 0  # matplotlib: the bench extra
    assert "accept len" in proc.stdout.splitlines()[-3]  # the table comes last
