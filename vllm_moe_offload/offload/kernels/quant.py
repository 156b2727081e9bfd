"""Dynamic per-token, per-128-channel-group FP8 activation quantisation, as vLLM's fused MoE
quantises its inputs. On CUDA this is vLLM's own `per_token_group_quant_fp8` with its defaults
(on Hopper it may round scales to powers of two for DeepGEMM), so offload and stock vLLM see
identical quantised activations; elsewhere a torch version of the plain (amax / 448) scheme.
"""

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
SCALE_EPS = 1e-10  # floor on a group's amax, as vLLM's


def _vllm_quantizer():
    try:
        from vllm.model_executor.layers.quantization.utils.fp8_utils import (
            per_token_group_quant_fp8,
        )
    except ImportError:
        return None
    return per_token_group_quant_fp8


def quantize_fp8_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, C] -> (FP8 [n, C], fp32 scales [n, C / group]) with x ~ q * scale per group."""
    n, c = x.shape
    assert c % group == 0, f"channels {c} must be a multiple of the FP8 group {group}"
    if x.is_cuda and (quantize := _vllm_quantizer()) is not None:
        return quantize(x.contiguous(), group)
    g = x.float().view(n, c // group, group)  # [n, C/g, g]
    scale = g.abs().amax(dim=-1).clamp(min=SCALE_EPS) / FP8_MAX  # [n, C/g]
    q = (g / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(n, c), scale
