"""Config hooks in vLLM's `MODELS_CONFIG_MAP`, run in the front-end process while `VllmConfig`
is built, so a bad offload setting fails before any engine starts.

For Qwen3-MoE with offload on: validate the model, budget and host memory, cap CUDA graphs at
PIECEWISE when the cache is smaller than the experts and decode is host-synced (the op then
reads routing on the host, which a full graph would freeze; a cache holding every expert, or
zero-copy decode, never does inside a graph), keep FULL graphs to small batches for
`--expert-decode auto`, and add the stats worker extension. For every other architecture:
refuse offload with a clear message.
"""

from vllm_moe_offload.config import AUTO_GRAPH_TOKENS, OffloadConfig
from vllm_moe_offload.geometry import SUPPORTED_ARCHITECTURES

STATS_EXTENSION = "vllm_moe_offload.metrics.OffloadWorkerExtension"


def verify_offload_model(vllm_config) -> None:
    offload = OffloadConfig.from_vllm_config(vllm_config)
    if not offload.enabled:
        return
    from vllm_moe_offload.model import pinned_limit_bytes, plan_for
    from vllm_moe_offload.store import check_host_memory
    geometry, plan = plan_for(vllm_config, offload)
    check_host_memory(geometry.total_experts * geometry.layout.record_bytes,
                      pinned_limit_bytes(offload))
    if plan.num_slots < geometry.total_experts:  # else no step ever syncs on routing
        compilation = vllm_config.compilation_config
        if offload.decode_path(vllm_config) == "synced":
            _cap_at_piecewise(compilation)
        else:
            require_eager_mixed_batches(compilation, offload.decode)
            if offload.decode == "auto":
                _limit_graph_batches(compilation)
    parallel = vllm_config.parallel_config
    if not parallel.worker_extension_cls:
        parallel.worker_extension_cls = STATS_EXTENSION


def _cap_at_piecewise(compilation) -> None:
    from vllm.config.compilation import CUDAGraphMode
    if compilation.cudagraph_mode is None:
        compilation.cudagraph_mode = CUDAGraphMode.PIECEWISE
    elif compilation.cudagraph_mode.has_full_cudagraphs():
        raise ValueError(
            f"expert offload: cudagraph_mode {compilation.cudagraph_mode.name} captures the "
            "expert fetches, which depend on routing; use -cc.cudagraph_mode=PIECEWISE (the "
            "default with offload) or NONE, a cache that holds every expert, or "
            "--expert-decode zero-copy")


def require_eager_mixed_batches(compilation, decode: str) -> None:
    """Zero-copy decode: graphs only for decode batches; prefill and mixed batches must run
    eagerly (piecewise), where the synced step fetches (in a graph they would never fetch)."""
    mode = compilation.cudagraph_mode
    if mode is not None and mode.has_full_cudagraphs() and not mode.separate_routine():
        raise ValueError(
            f"expert offload: --expert-decode {decode} runs decode in CUDA graphs and needs "
            f"prefill and mixed batches outside them, which cudagraph_mode {mode.name} "
            "captures; use FULL_AND_PIECEWISE (vLLM's default) or FULL_DECODE_ONLY, or "
            "--expert-decode synced with -cc.cudagraph_mode=PIECEWISE")


def _limit_graph_batches(compilation) -> None:
    """--expert-decode auto: CUDA graphs (zero-copy decode) only for batches of at most
    AUTO_GRAPH_TOKENS tokens; larger ones run eagerly and fetch their experts, once for all
    their tokens. A capture size the user set stands: it moves that boundary."""
    if compilation.max_cudagraph_capture_size is None and \
            compilation.cudagraph_capture_sizes is None:
        compilation.max_cudagraph_capture_size = AUTO_GRAPH_TOKENS


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
