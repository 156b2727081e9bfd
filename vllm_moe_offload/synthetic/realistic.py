"""Realistic routing from the checkpoint itself: routers that make a `--predictable` model's
walk route like the real Qwen3-30B-A3B, for every system alike (stock vLLM, its UVA offload,
this plugin), eagerly and inside CUDA graphs.

Under greedy decoding (and at temperature 1: its successor logit is ~300 above the rest) the
predictable target walks a cycle of m = hidden/2 token positions, and each MoE layer's router
reads RMSNorm(residual) = sqrt(h/2) (u + v_j) + noise at position j (predictable.py). The
v_j are orthonormal, so a router row w_e = sqrt(2/h) sum_j g[e, j] v_j gives expert e the
logit g[e, j] at position j: any routing along the cycle can be written into the gate. This
writes `traces.table`, the calibrated generator's routing of one stream around the cycle:
g = ROUTER_LOGIT for the token's top-k experts (plus RANK_STEP per rank, so the routing
weights fall with rank as a trained router's do) and 0 for the others. The margin is wide
enough that what the random layers add to the residual never flips a choice
(tests/e2e/test_routing.py compares the engine's routing with the table).

A request routes along the stretch of the cycle its walk covers: prompts ending at different
positions give requests their own working sets; CUDA-graph replay, batch order and
speculative decoding (k+1 verified tokens are consecutive tokens of the walk) change nothing.
Prompt tokens off the cycle embed at random positions, so prefill routes like random tokens.
The limit: the cycle has m = 1,024 positions at full size, so many long requests overlap on
it and share more than independent requests would.

Two ways to the same weights: `make-model --routing realistic` writes them into a checkpoint,
and the load format `realistic-routing` builds them at load time over vLLM's dummy weights
(as `load_format=dummy` does, without writing 31 GB).
"""

import math
import re

import numpy as np
import torch

from vllm_moe_offload.offload.geometry import moe_layer_ids
from vllm_moe_offload.synthetic.predictable import Cycle, cycle_for, target_tensor
from vllm_moe_offload.synthetic.traces import RoutingModel, table

LOAD_FORMAT = "realistic-routing"
ROUTER_LOGIT = 12.0  # the chosen experts' logit; the others' is 0
RANK_STEP = 1.0  # a chosen expert's logit falls by this per rank
ROUTING_SEED = 0
_GATE = re.compile(r"model\.layers\.(\d+)\.mlp\.gate\.weight")


class RealisticRouting:
    """The routing table of a model config (an HF config dict) and the tensors that make its
    predictable walk route along it."""

    def __init__(self, config: dict):
        self.config = config
        self.cycle: Cycle = cycle_for(config)
        self.moe_layers = moe_layer_ids(config)
        model = RoutingModel(num_layers=len(self.moe_layers), num_experts=config["num_experts"],
                             top_k=config["num_experts_per_tok"], seed=ROUTING_SEED)
        self.table = table(model, len(self.cycle.ids))  # [m, L_moe, K]

    @classmethod
    def from_hf_config(cls, hf_config) -> "RealisticRouting":
        """From a transformers config object (its to_dict() may rename num_experts)."""
        keys = ("hidden_size", "vocab_size", "num_hidden_layers", "num_experts",
                "num_experts_per_tok", "decoder_sparse_step")
        config = {key: getattr(hf_config, key) for key in keys}
        config["mlp_only_layers"] = list(getattr(hf_config, "mlp_only_layers", None) or [])
        return cls(config)

    def logits(self, moe_index: int) -> torch.Tensor:
        """g [E, m]: expert e's router logit at cycle position j."""
        ids = torch.from_numpy(self.table[:, moe_index])  # [m, K]
        m, k = ids.shape
        ranks = ROUTER_LOGIT + RANK_STEP * torch.arange(k - 1, -1, -1, dtype=torch.float64)
        g = torch.zeros(self.config["num_experts"], m, dtype=torch.float64)
        g[ids, torch.arange(m)[:, None]] = ranks
        return g

    def gate(self, moe_index: int) -> torch.Tensor:
        """The router weight [E, h] (bf16) of the moe_index-th MoE layer."""
        h = self.config["hidden_size"]
        return (math.sqrt(2 / h) * self.logits(moe_index) @ self.cycle.v).to(torch.bfloat16)

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The checkpoint tensor `name` (of `shape`) of a realistic-routing model, or None
        where the model keeps its own (random or dummy) one. Norm weights are one, so that
        the routers and the walk read the residual's direction unscaled."""
        if (fixed := target_tensor(name, self.cycle)) is not None:
            return fixed
        if (match := _GATE.fullmatch(name)) is not None:
            return self.gate(self.moe_layers.index(int(match.group(1))))
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        return None

    def routing(self, positions: np.ndarray) -> np.ndarray:
        """Expert ids [len(positions), L_moe, K] of tokens at these cycle positions."""
        return self.table[np.asarray(positions) % len(self.cycle.ids)]


def register_load_format() -> None:
    """Registers the `realistic-routing` load format with vLLM: its dummy weights, then this
    module's embeddings, lm_head, routers and norms (the experts: `load_format=dummy`'s, or
    the plugin store's random ones)."""
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader

    class RealisticRoutingLoader(DummyModelLoader):
        def load_weights(self, model: torch.nn.Module, model_config) -> None:
            super().load_weights(model, model_config)
            routing = RealisticRouting.from_hf_config(model_config.hf_text_config)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    fixed = routing.tensor(name, tuple(param.shape))
                    if fixed is not None:  # vocabulary rows may be padded: the first rows
                        param.data[:fixed.shape[0]].copy_(fixed.to(param.dtype))

    register_model_loader(LOAD_FORMAT)(RealisticRoutingLoader)
