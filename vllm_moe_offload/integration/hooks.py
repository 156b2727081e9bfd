"""Config hooks in vLLM's `MODELS_CONFIG_MAP`, run in the front-end process while `VllmConfig`
is built, so a bad offload setting fails before any engine starts.

For Qwen3-MoE with offload on: validate the model, budget and host memory, and add the stats
worker extension. Every CUDA-graph mode stays as vLLM sets it: no step of the offload op
syncs inside a graph (offload/step.py). For every other architecture: refuse offload with a clear
message.
"""

from vllm_moe_offload.config import OffloadConfig
from vllm_moe_offload.offload.geometry import SUPPORTED_ARCHITECTURES

STATS_EXTENSION = "vllm_moe_offload.integration.metrics.OffloadWorkerExtension"


def verify_offload_model(vllm_config) -> None:
    offload = OffloadConfig.from_vllm_config(vllm_config)
    if not offload.enabled:
        return
    from vllm_moe_offload.integration.model import pinned_limit_bytes, plan_for
    from vllm_moe_offload.offload.store import check_host_memory
    geometry, _ = plan_for(vllm_config, offload)
    check_host_memory(geometry.total_experts * geometry.layout.record_bytes,
                      pinned_limit_bytes(offload))
    parallel = vllm_config.parallel_config
    refuse_unsupported_parallelism(parallel)
    if not parallel.worker_extension_cls:
        parallel.worker_extension_cls = STATS_EXTENSION


def refuse_unsupported_parallelism(parallel) -> None:
    """Tensor parallelism shards every expert across the ranks (supported); expert, data and
    pipeline parallelism would need the cache split otherwise: refused before start-up."""
    refused = {"--enable-expert-parallel": getattr(parallel, "enable_expert_parallel", False),
               "--data-parallel-size > 1": getattr(parallel, "data_parallel_size", 1) > 1,
               "--pipeline-parallel-size > 1": getattr(parallel, "pipeline_parallel_size", 1) > 1}
    given = [name for name, on in refused.items() if on]
    if given:
        raise ValueError(f"expert offload: {', '.join(given)} is not supported with "
                         "--enable-expert-offload; use --tensor-parallel-size to spread the "
                         "experts over several GPUs")


def reject_offload(vllm_config) -> None:
    if OffloadConfig.from_vllm_config(vllm_config).enabled:
        arch = vllm_config.model_config.architecture
        raise ValueError(
            f"expert offload supports {', '.join(SUPPORTED_ARCHITECTURES)} only; "
            f"{vllm_config.model_config.model} is {arch}. Serve it without "
            "--enable-expert-offload")


def install() -> None:
    """Adds our hooks to MODELS_CONFIG_MAP, chaining any hook vLLM already has for an arch."""
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig
    for arch in ModelRegistry.get_supported_archs():
        existing = MODELS_CONFIG_MAP.get(arch)
        if getattr(existing, "_expert_offload_hook", False):
            continue
        check = verify_offload_model if arch in SUPPORTED_ARCHITECTURES else reject_offload
        MODELS_CONFIG_MAP[arch] = _chained(check, existing or VerifyAndUpdateConfig)


def _chained(check, existing: type) -> type:
    class ExpertOffloadHook(existing):
        _expert_offload_hook = True

        @classmethod
        def verify_and_update_config(cls, vllm_config) -> None:
            check(vllm_config)
            super().verify_and_update_config(vllm_config)

    return ExpertOffloadHook
