"""`OffloadSparseMoeBlock` and its custom op: route -> fetch missing experts -> grouped GEMM.

The block owns no expert weights: they live in the shared `ExpertStore` (host) and
`ExpertCache` (device slots). Its traced forward calls `torch.ops.vllm.moe_offload_experts`,
which vLLM runs eagerly between CUDA-graph pieces (router included, as upstream's op does);
the op writes into an output allocated in traced code, so graph replays see a stable address.

Dimensions: T tokens, K top-k, E experts, H hidden.
"""

import numpy as np
import torch
import torch.nn as nn

from vllm_moe_offload import compat, kernels
from vllm_moe_offload.cache import ExpertCache
from vllm_moe_offload.prefetch import CorrelationPrefetcher


class OffloadExperts(nn.Module):
    """Loads one layer's checkpoint experts (`{e}.{gate,up,down}_proj.weight[_scale_inv]`)
    into the host store; holds no parameters, so vLLM's loaders and profiler never see them."""

    def __init__(self, cache: ExpertCache, moe_index: int, prefix: str):
        super().__init__()
        self.cache = cache
        self.moe_index = moe_index
        self.prefix = prefix

    def load_weights(self, weights) -> set[str]:
        loaded = set()
        store = self.cache.store
        for name, tensor in weights:
            expert, _, part = name.partition(".")
            if not expert.isdigit() or part not in store.layout.parts:
                raise ValueError(f"expert offload: unexpected checkpoint tensor "
                                 f"{self.prefix}.{name}")
            store.load(self.moe_index, int(expert), part, tensor)
            loaded.add(name)
        return loaded


class OffloadSparseMoeBlock(compat.UpstreamMoeBlock):
    """Drop-in for Qwen3MoeSparseMoeBlock (a subclass, so upstream isinstance checks hold)."""

    def __init__(self, vllm_config, prefix: str, *, cache: ExpertCache, moe_index: int,
                 prefetcher: CorrelationPrefetcher | None = None):
        nn.Module.__init__(self)  # never builds FusedMoE: no expert weights on the device
        config = vllm_config.model_config.hf_text_config
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        self.n_routed_experts = self.n_logical_experts = config.num_experts
        self.n_physical_experts = self.n_local_physical_experts = config.num_experts
        self.n_redundant_experts = 0
        self.gate = compat.make_gate(config.hidden_size, config.num_experts,
                                     vllm_config.quant_config, f"{prefix}.gate")
        self.experts = OffloadExperts(cache, moe_index, f"{prefix}.experts")
        self.cache = cache
        self.moe_index = moe_index
        self.prefetcher = prefetcher
        self.layer_name = prefix
        compat.register_forward_layer(vllm_config, prefix, self)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        is_1d = hidden_states.dim() == 1
        hidden = hidden_states.view(-1, hidden_states.shape[-1])  # [T, H]
        out = torch.empty_like(hidden)  # [T, H], allocated in traced code
        torch.ops.vllm.moe_offload_experts(hidden, out, self.layer_name)
        return out.squeeze(0) if is_1d else out

    def run(self, hidden: torch.Tensor, out: torch.Tensor) -> None:
        """The op body, eager: router, one host sync (the routed expert set), fetches, GEMMs.

        The router runs here, eagerly, as in upstream's fused-MoE op: compiled, its logits
        would round differently from stock vLLM's and flip the rare near-tied top-k choice.
        """
        cache, layer = self.cache, self.moe_index
        router_logits, _ = self.gate(hidden)  # [T, E]
        topk_weights, topk_ids = kernels.route(router_logits, self.top_k,
                                               self.renormalize)  # [T, K]
        ids_host = topk_ids.cpu().numpy()  # the host sync: which experts this step needs
        experts = np.unique(ids_host).tolist()
        buffer = kernels.new_buffer(hidden, self.top_k)
        passes = cache.schedule(layer, experts)
        for group in passes:
            slots = cache.fetch(layer, group)
            kernels.run_pass(hidden, topk_weights, topk_ids, group, slots, cache.weights,
                             cache.store.layout.block, buffer, self.n_routed_experts, ids_host)
        kernels.finish(buffer, out, self.top_k)
        if self.prefetcher is not None:
            self._prefetch_next(ids_host)
        stats = cache.stats
        stats.layer_steps += 1
        stats.passes += len(passes)
        stats.host_syncs += 1

    def _prefetch_next(self, ids_host: np.ndarray) -> None:
        """Learns this layer's transition and loads the next MoE layer's likely experts."""
        layer, cache = self.moe_index, self.cache
        self.prefetcher.observe(layer, ids_host)
        if layer + 1 < len(cache.quotas):
            predicted = self.prefetcher.predict(layer, ids_host, cache.quotas[layer + 1])
            cache.prefetch(layer + 1, predicted)


def _op(hidden: torch.Tensor, out: torch.Tensor, layer_name: str) -> None:
    compat.forward_layer(layer_name).run(hidden, out)


def _op_fake(hidden: torch.Tensor, out: torch.Tensor, layer_name: str) -> None:
    return None


def register_op() -> None:
    """Registers torch.ops.vllm.moe_offload_experts once per process."""
    if hasattr(torch.ops.vllm, compat.OP_NAME):
        return
    from vllm.utils.torch_utils import direct_register_custom_op
    direct_register_custom_op(op_name=compat.OP_NAME, op_func=_op, mutates_args=["out"],
                              fake_impl=_op_fake)
