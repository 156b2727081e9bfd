"""`MoeGeometry`: what a Qwen3-MoE config says about its routed experts, validated for offload.

Read from the Hugging Face config (never hard-coded): E experts, top-K, hidden H, moe
intermediate I, which decoder layers have routed experts, and the expert weight format.
"""

from dataclasses import dataclass

import torch

from vllm_moe_offload.offload.store import ExpertLayout

SUPPORTED_ARCHITECTURES = ("Qwen3MoeForCausalLM",)


@dataclass(frozen=True)
class MoeGeometry:
    layout: ExpertLayout
    moe_layers: tuple[int, ...]  # decoder layer ids with routed experts, in order
    num_experts: int
    top_k: int
    renormalize: bool
    tp_size: int = 1  # tensor parallelism: each rank holds 1/tp of every expert's intermediate

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def total_experts(self) -> int:
        return self.num_moe_layers * self.num_experts

    @classmethod
    def from_hf_config(cls, config, dtype: torch.dtype, quantization: str | None,
                       tp_size: int = 1) -> "MoeGeometry":
        """tp_size: this rank's layout holds 1/tp_size of each expert's intermediate
        dimension (w13's rows, w2's columns, their FP8 scale blocks with them)."""
        if getattr(config, "num_experts", 0) <= 0:
            raise ValueError("expert offload: the model has no routed experts (num_experts=0); "
                             "serve it without --enable-expert-offload")
        if getattr(config, "shared_expert_intermediate_size", 0) > 0:
            raise ValueError("expert offload: models with a shared expert are not supported; "
                             "serve it without --enable-expert-offload")
        block = _fp8_block(config, quantization)
        weight_dtype = torch.float8_e4m3fn if block else dtype
        inter = config.moe_intermediate_size
        shard_unit = block[0] if block else 1  # an FP8 scale block belongs to one rank
        if inter % (tp_size * shard_unit):
            raise ValueError(
                f"expert offload: moe_intermediate_size={inter} does not split into "
                f"--tensor-parallel-size {tp_size} shards"
                + (f" of whole {shard_unit}-row FP8 blocks" if block else "")
                + "; use a tensor-parallel size that divides it")
        layout = ExpertLayout(config.hidden_size, inter // tp_size, weight_dtype, block)
        return cls(layout, tuple(moe_layer_ids(config)), config.num_experts,
                   config.num_experts_per_tok,
                   bool(getattr(config, "norm_topk_prob", True)), tp_size)


def moe_layer_ids(config) -> list[int]:
    """Decoder layers with routed experts, by Qwen3-MoE's rule (an HF config or its dict)."""
    get = config.get if isinstance(config, dict) else lambda key, d: getattr(config, key, d)
    dense = set(get("mlp_only_layers", None) or [])
    step = get("decoder_sparse_step", 1)
    return [i for i in range(get("num_hidden_layers", None))
            if i not in dense and (i + 1) % step == 0]


def _fp8_block(config, quantization: str | None) -> tuple[int, int] | None:
    if quantization is None:
        return None
    quant = getattr(config, "quantization_config", None) or {}
    if not isinstance(quant, dict):
        quant = quant.to_dict()
    block = quant.get("weight_block_size")
    if quantization != "fp8" or not block or quant.get("activation_scheme") != "dynamic":
        raise ValueError(
            f"expert offload: unsupported quantization {quantization!r} ({quant}); supported are "
            "unquantized checkpoints and FP8 with 128x128 block scales and dynamic activation "
            "scales (Qwen's -FP8 checkpoints)")
    bn, bk = block
    for dim in ("hidden_size", "moe_intermediate_size"):
        if getattr(config, dim) % bk:
            raise ValueError(f"expert offload: {dim}={getattr(config, dim)} is not a multiple "
                             f"of the FP8 block {bk}")
    return int(bn), int(bk)
