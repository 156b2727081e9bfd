"""The pure-torch expert path against a float64 computation written independently."""

import pytest
import torch

from vllm_moe_offload.offload.kernels.reference import grouped_experts, route
from vllm_moe_offload.offload.store import ExpertLayout
from vllm_moe_offload.synthetic.checkpoint import quantize_fp8_block

H, INTER, E, K = 256, 128, 6, 2


def fp8_group_quant_f64(v):
    """Dynamic per-128-group FP8 quantisation, emulated in float64."""
    g = v.view(-1, 128)
    scale = g.abs().amax(-1, keepdim=True).clamp(min=1e-10) / 448.0
    return ((g / scale).to(torch.float8_e4m3fn).double() * scale).view(-1)


def bf16(v):
    return v.bfloat16().double()


def float64_moe(x, weights_f64, topk_w, topk_ids, fp8):
    quant = fp8_group_quant_f64 if fp8 else (lambda v: v)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            w13, w2 = weights_f64[int(topk_ids[t, k])]
            h = bf16(w13 @ quant(x[t].double()))  # vLLM keeps intermediates in bf16
            act = bf16(torch.nn.functional.silu(h[:INTER]) * h[INTER:])
            out[t] += topk_w[t, k].double() * (w2 @ quant(act))
    return out


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_grouped_experts_matches_float64(fp8, tokens):
    gen = torch.Generator().manual_seed(tokens + 100 * fp8)
    layout = ExpertLayout(H, INTER, torch.float8_e4m3fn if fp8 else torch.bfloat16,
                          (128, 128) if fp8 else None)
    pool = torch.empty(E, layout.record_bytes, dtype=torch.uint8)
    views = layout.views(pool)
    exact = {}
    for s in range(E):
        w13 = torch.randn(2 * INTER, H, generator=gen) / H ** 0.5
        w2 = torch.randn(H, INTER, generator=gen) / INTER ** 0.5
        if fp8:
            q13g, s13g = quantize_fp8_block(w13[:INTER])
            q13u, s13u = quantize_fp8_block(w13[INTER:])
            q2, s2 = quantize_fp8_block(w2)
            views["w13"][s].copy_(torch.cat([q13g, q13u]))
            views["s13"][s].copy_(torch.cat([s13g, s13u]))
            views["w2"][s].copy_(q2)
            views["s2"][s].copy_(s2)
            w13 = torch.cat([q13g.double() * s13g.double().repeat_interleave(128, 0)
                             .repeat_interleave(128, 1)[:INTER, :H],
                             q13u.double() * s13u.double().repeat_interleave(128, 0)
                             .repeat_interleave(128, 1)[:INTER, :H]])
            w2 = q2.double() * s2.double().repeat_interleave(128, 0).repeat_interleave(128, 1)
        else:
            views["w13"][s].copy_(w13)
            views["w2"][s].copy_(w2)
            w13, w2 = w13.bfloat16().double(), w2.bfloat16().double()
        exact[s] = (w13, w2)
    x = torch.randn(tokens, H, generator=gen).bfloat16()
    topk_w, topk_ids = route(torch.randn(tokens, E, generator=gen), K, renormalize=True)
    # experts 0..E-1 live in slots reversed, so the expert->slot map has to be honoured
    experts = list(range(E))
    slots = [E - 1 - e for e in experts]
    acc = torch.full((tokens, H), float("nan"))
    acc.zero_()
    grouped_experts(x, topk_w, topk_ids, experts, slots, views, layout.block, acc)
    ref = float64_moe(x, {e: exact[E - 1 - e] for e in experts}, topk_w, topk_ids, fp8)
    rel = (acc.double() - ref).norm() / ref.norm()
    assert torch.isfinite(acc).all()
    assert rel < 1e-2, rel  # bf16 intermediates, as vLLM's caches


def test_route_renormalises_top_k():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    w, ids = route(logits, 2, renormalize=True)
    assert ids.tolist() == [[3, 2]]
    p = torch.softmax(logits, -1)[0]
    assert torch.allclose(w, torch.stack([p[3], p[2]])[None] / (p[3] + p[2]))
    w, _ = route(logits, 2, renormalize=False)
    assert torch.allclose(w.sum(), p[3] + p[2])


def test_route_breaks_ties_towards_lower_ids():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0]], dtype=torch.bfloat16)
    _, ids = route(logits, 3, renormalize=True)
    assert ids.tolist() == [[1, 3, 2]]


def test_route_honours_vllm_routing_simulation(monkeypatch):
    pytest.importorskip("vllm", reason="the simulator is vLLM's (the device's kernel step "
                                        "runs before vLLM is staged)")
    from vllm_moe_offload.offload import kernels
    logits = torch.zeros(200, 16)
    logits[:, 0] = 50.0  # the model's router always picks expert 0
    _, ids = kernels.route(logits, 4, renormalize=True)
    assert (ids == 0).any(dim=1).all()
    monkeypatch.setenv("VLLM_MOE_ROUTING_SIMULATION_STRATEGY", "uniform_random")
    weights, ids = kernels.route(logits, 4, renormalize=True)
    assert ids.shape == (200, 4) and int(ids.min()) >= 0 and int(ids.max()) < 16
    assert (ids == 0).any(dim=1).float().mean() < 0.5  # uniform: about 4 / 16 of tokens
    assert torch.isfinite(weights).all()
