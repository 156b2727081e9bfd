"""`Qwen3MoeOffloadForCausalLM`: vLLM's Qwen3-MoE with the routed experts offloaded.

Registered under the built-in architecture name. With offload off it is exactly upstream's
model. With offload on, upstream builds the model while its MoE block is swapped for
`OffloadSparseMoeBlock` (compat.swapped_moe_block); attention, dense layers, EAGLE-3 aux
hidden states and weight-name mapping are all inherited.
"""

import torch

from vllm_moe_offload import envs
from vllm_moe_offload.config import OffloadConfig
from vllm_moe_offload.integration import compat
from vllm_moe_offload.integration.layer import OffloadSparseMoeBlock, register_ops
from vllm_moe_offload.integration.metrics import PrometheusExporter, StatsReporter, logger
from vllm_moe_offload.offload.budget import CachePlan, plan_cache
from vllm_moe_offload.offload.cache import ExpertCache
from vllm_moe_offload.offload.geometry import MoeGeometry
from vllm_moe_offload.offload.step import DEVICE_STEP_MAX_TOKENS
from vllm_moe_offload.offload.store import ExpertStore
from vllm_moe_offload.synthetic.realistic import LOAD_FORMAT as REALISTIC_LOAD_FORMAT
from vllm_moe_offload.units import GIB, format_bytes


def geometry_of(vllm_config) -> MoeGeometry:
    """This rank's geometry: with tensor parallelism each rank holds a shard of every expert."""
    model_config = vllm_config.model_config
    return MoeGeometry.from_hf_config(model_config.hf_text_config, model_config.dtype,
                                      model_config.quantization,
                                      vllm_config.parallel_config.tensor_parallel_size)


def device_budget_bytes(vllm_config) -> int | None:
    """Memory vLLM may use on the device, read without initialising CUDA (NVML)."""
    from vllm.platforms import current_platform
    if not current_platform.is_cuda():
        return None
    total = current_platform.get_device_total_memory()
    return int(total * vllm_config.cache_config.gpu_memory_utilization)


def plan_for(vllm_config, offload: OffloadConfig) -> tuple[MoeGeometry, CachePlan]:
    """Validates the model and the cache budget (the config hook calls it before the engine
    starts, so bad settings fail in the front end)."""
    geometry = geometry_of(vllm_config)
    return geometry, plan_cache(offload, geometry, device_budget_bytes(vllm_config))


def pinned_limit_bytes(offload: OffloadConfig) -> int | None:
    return None if offload.pinned_limit_gb is None else int(offload.pinned_limit_gb * GIB)


def _is_dummy_load(vllm_config) -> bool:
    """load_format=dummy, or realistic-routing (dummy weights with realistic routers): the
    experts are random, drawn into the store here."""
    load_format = vllm_config.load_config.load_format
    return getattr(load_format, "value", load_format) in ("dummy", REALISTIC_LOAD_FORMAT)


class Qwen3MoeOffloadForCausalLM(compat.UpstreamQwen3Moe):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        offload = OffloadConfig.from_vllm_config(vllm_config)
        if not offload.enabled:
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            self.expert_cache = None
            return
        register_ops()
        geometry, plan = plan_for(vllm_config, offload)
        rank = compat.tensor_parallel_rank() if geometry.tp_size > 1 else 0
        store = ExpertStore(geometry.layout, geometry.num_moe_layers, geometry.num_experts,
                            limit_bytes=pinned_limit_bytes(offload), rank=rank,
                            tp_size=geometry.tp_size)
        cache = ExpertCache(store, plan.num_slots, device=vllm_config.device_config.device,
                            log_steps=envs.routing_log_steps())
        if geometry.tp_size > 1:  # every rank must take the same decisions: checked
            cache.check_ranks_agree = compat.ranks_agree
        staging = (f"; plus {cache.staging} staging slots "
                   f"({format_bytes(cache.staging * cache.slot_bytes)}) for steps of over "
                   f"{DEVICE_STEP_MAX_TOKENS} tokens" if cache.staging
                   else "; it holds every expert: loaded once, never fetches")
        logger.info("expert offload: %s of experts in %s host memory; cache %s%s",
                    format_bytes(store.nbytes), "pinned" if store.pin else "pageable",
                    plan.describe(geometry), staging)
        with compat.swapped_moe_block(_bind_block(cache, geometry)):
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self.expert_cache = cache
        if cache.staging:
            compat.add_splitting_op(vllm_config)  # piecewise: large steps stage, eagerly
        if _is_dummy_load(vllm_config):
            store.fill_random(seed=vllm_config.model_config.seed or 0)
            cache.preload()
        self._reporter = StatsReporter(cache.snapshot, envs.log_interval_s(),
                                       PrometheusExporter.maybe_create(cache))
        self._reporter.start()

    def load_weights(self, weights) -> set[str]:
        loaded = super().load_weights(weights)
        if self.expert_cache is not None:
            _check_complete(self.expert_cache.store, self)
            self.expert_cache.preload()
        return loaded


def _bind_block(cache: ExpertCache, geometry: MoeGeometry) -> type[OffloadSparseMoeBlock]:
    """A block class whose instances share `cache`; built with upstream's arguments."""
    from vllm.model_executor.models.utils import extract_layer_index
    moe_index = {layer: i for i, layer in enumerate(geometry.moe_layers)}

    class BoundOffloadSparseMoeBlock(OffloadSparseMoeBlock):
        def __init__(self, vllm_config, prefix: str = "", **_upstream_kwargs):
            super().__init__(vllm_config, prefix, cache=cache,
                             moe_index=moe_index[extract_layer_index(prefix)])

    return BoundOffloadSparseMoeBlock


def _check_complete(store: ExpertStore, model: torch.nn.Module) -> None:
    missing = store.missing()
    if not missing:
        return
    names = {b.moe_index: b.layer_name for b in model.modules()
             if isinstance(b, OffloadSparseMoeBlock)}
    layer, expert, part = missing[0]
    raise ValueError(f"expert offload: the checkpoint lacks {names[layer]}.experts.{expert}.{part}"
                     f" ({len(missing)} expert tensor(s) missing); re-download or re-convert "
                     "the checkpoint")
