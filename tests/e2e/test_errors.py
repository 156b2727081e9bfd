"""Bad settings fail at start-up with a message that names the fix; nothing is served."""

import json
import shutil
import subprocess

import pytest
from safetensors.torch import load_file, save_file

from tests.e2e.conftest import REPO, engine_env, run_engine
from tests.helpers.server import serve_cli

pytestmark = pytest.mark.e2e


def offload(**settings) -> dict:
    return {"expert_offload": {"enabled": True, "cache_slots": 12, **settings}}


def assert_fails(proc, message: str) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert message in output, output[-5000:]


@pytest.mark.parametrize("settings, message", [
    (dict(cache_slots=4), "fewer than top-k=4: no token's experts could be resident "
                          "together, so every step would read some from host memory; use "
                          "--expert-cache-slots >= 8"),
    (dict(policy="lru"), "'policy' is no longer a setting"),
    # 2 MoE layers x 16 experts x 48 KiB against int(1e-6 GiB) = 1,073 bytes
    (dict(pinned_limit_gb=1e-6), "the expert store needs 1.5 MiB of host memory, more than the "
                                 "pinned_limit_gb (--expert-pinned-limit-gb) cap of 1.0 KiB"),
    (dict(cache_slot=12), "unknown key(s) ['cache_slot']"),
])
def test_bad_settings(models, tmp_path, settings, message):
    assert_fails(run_engine(models["tiny"], tmp_path, offload(**settings)), message)


def test_not_qwen3_moe(models, tmp_path):
    model = tmp_path / "not-qwen3-moe"
    shutil.copytree(models["tiny"], model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["Qwen2MoeForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    assert_fails(run_engine(model, tmp_path, offload()),
                 "expert offload supports Qwen3MoeForCausalLM only")


def test_missing_expert_tensor(models, tmp_path):
    model = tmp_path / "missing-expert"
    shutil.copytree(models["tiny"], model)
    missing = "model.layers.2.mlp.experts.5.down_proj.weight"
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = model / index["weight_map"].pop(missing)
    tensors = load_file(shard)
    del tensors[missing]
    save_file(tensors, shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    assert_fails(run_engine(model, tmp_path, offload()),
                 f"the checkpoint lacks {missing} (1 expert tensor(s) missing)")


def serve(model, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([*serve_cli(), str(model), *flags], cwd=REPO, env=engine_env(),
                          capture_output=True, text=True, timeout=300)


def test_flag_choices_are_checked(models):
    assert_fails(serve(models["tiny"], "--enable-expert-offload", "--expert-cache-slots", "many"),
                 "invalid int value: 'many'")


def test_malformed_additional_config_names_the_json_error(models):
    # cut short: vLLM alone passes it on as a string and VllmConfig says only "Input should
    # be a valid dictionary"
    proc = serve(models["tiny"], "--additional-config", '{"expert_offload": {"enabled": true')
    assert_fails(proc, "argument --additional-config: not valid JSON (Expecting ',' delimiter: "
                       "line 1 column 36 (char 35))")
    assert "valid dictionary" not in proc.stdout + proc.stderr
