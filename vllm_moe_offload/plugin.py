"""`register()`: the `vllm.general_plugins` entry point, run in every vLLM process.

Idempotent, and initialises no CUDA: the model class is registered by name and imported only
where vLLM builds the model. Also registers the `realistic-routing` load format
(synthetic/realistic.py).
"""

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from vllm import ModelRegistry

    from vllm_moe_offload.integration import flags, hooks
    from vllm_moe_offload.synthetic import realistic
    ModelRegistry.register_model(
        "Qwen3MoeForCausalLM", "vllm_moe_offload.integration.model:Qwen3MoeOffloadForCausalLM")
    hooks.install()
    flags.install_flags()
    realistic.register_load_format()
