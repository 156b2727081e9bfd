"""`OffloadSparseMoeBlock` and its custom ops: route -> update the cache -> grouped GEMM.

The block owns no expert weights: they live in the shared `ExpertStore` (host) and
`ExpertCache` (device slots). Its traced forward calls `torch.ops.vllm.moe_offload_experts`
(router included, as upstream's fused-MoE op does). vLLM runs it inside its FULL CUDA graphs
(decode) and eagerly between piecewise graph pieces (a splitting op: mixed and prefill
batches); there a step of more than step.DEVICE_STEP_MAX_TOKENS tokens stages its misses (one
host sync), every other step updates the cache on the device (no sync). A layer holding all
its experts calls `torch.ops.vllm.moe_resident_experts`, captured in the graphs. Both write
into an output allocated in traced code, so graph replays see a stable address.

Dimensions: T tokens, K top-k, E experts, H hidden.
"""

import torch
import torch.nn as nn

from vllm_moe_offload.integration import compat
from vllm_moe_offload.offload import kernels, step
from vllm_moe_offload.offload.cache import ExpertCache


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

    def __init__(self, vllm_config, prefix: str, *, cache: ExpertCache, moe_index: int):
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
        self.layer_name = prefix
        # tensor parallelism: each rank computes its shard of every expert; the sum is the
        # output, as upstream's FusedMoE reduces it
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        compat.register_forward_layer(vllm_config, prefix, self)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        is_1d = hidden_states.dim() == 1
        hidden = hidden_states.view(-1, hidden_states.shape[-1])  # [T, H]
        out = torch.empty_like(hidden)  # [T, H], allocated in traced code
        if self.cache.is_resident(self.moe_index):
            torch.ops.vllm.moe_resident_experts(hidden, out, self.layer_name)
        else:
            torch.ops.vllm.moe_offload_experts(hidden, out, self.layer_name)
        if self.tp_size > 1:
            out = compat.tensor_parallel_all_reduce(out)
        return out.squeeze(0) if is_1d else out

    def _route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The router runs inside the op, as in upstream's fused-MoE op: compiled, its logits
        # would round differently from stock vLLM's and flip the rare near-tied top-k choice.
        router_logits, _ = self.gate(hidden)  # [T, E]
        weights, ids = kernels.route(router_logits, self.top_k, self.renormalize)
        log = self.cache.routing_log
        if log is not None and not (ids.is_cuda and torch.cuda.is_current_stream_capturing()):
            log.record(self.moe_index, ids)
        return weights, ids

    def run_resident(self, hidden: torch.Tensor, out: torch.Tensor) -> None:
        """The op body of a layer holding all its experts (captured in CUDA graphs)."""
        step.resident_step(self.cache, self.moe_index, hidden, *self._route(hidden), out)

    def run(self, hidden: torch.Tensor, out: torch.Tensor) -> None:
        """The op body: the device step (no host sync; also while vLLM captures a CUDA
        graph), or for a large eager step the staged one."""
        routed = self._route(hidden)
        capturing = hidden.is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing or hidden.shape[0] <= step.DEVICE_STEP_MAX_TOKENS:
            step.device_step(self.cache, self.moe_index, hidden, *routed, out)
        else:
            step.staged_step(self.cache, self.moe_index, hidden, *routed, out)


def _op(hidden: torch.Tensor, out: torch.Tensor, layer_name: str) -> None:
    compat.forward_layer(layer_name).run(hidden, out)


def _resident_op(hidden: torch.Tensor, out: torch.Tensor, layer_name: str) -> None:
    compat.forward_layer(layer_name).run_resident(hidden, out)


def _op_fake(hidden: torch.Tensor, out: torch.Tensor, layer_name: str) -> None:
    return None


def register_ops() -> None:
    """Registers torch.ops.vllm.moe_offload_experts (a CUDA-graph splitting op: run eagerly a
    large step syncs once) and torch.ops.vllm.moe_resident_experts (captured) once per
    process."""
    from vllm.utils.torch_utils import direct_register_custom_op
    for name, body in ((compat.OP_NAME, _op), (compat.RESIDENT_OP_NAME, _resident_op)):
        if not hasattr(torch.ops.vllm, name):
            direct_register_custom_op(op_name=name, op_func=body, mutates_args=["out"],
                                      fake_impl=_op_fake)
