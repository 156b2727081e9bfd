"""`make-model --predictable` and `--draft-kind oracle`: a target whose greedy continuation is
known by construction, and an EAGLE-3 draft that predicts it except on a chosen share of tokens.

A synthetic workload for measuring what acceptance length buys with offload, not a trained
draft: under greedy decoding the target walks a cycle of m token ids s_0 -> s_1 -> ... ->
s_{m-1} -> s_0, and the oracle draft proposes the walk except at a seeded set of round(q*m)
cycle positions (miss rate q), where it proposes a decoy. vLLM's rejection sampler decides.
Every acceptance test is at a cycle position the walk has not tested since its last lap, so
each proposed token is accepted with probability ~1-q given that the ones before it were, and
with k speculative tokens the mean acceptance length is ~(1-(1-q)^(k+1))/q. The misses are
fixed positions, though: requests that walk the same stretch of the cycle see the same ones,
so a short cycle or few, long requests scatter the measured per-position rates around 1-q.

Geometry, in the hidden space of size h, m = h/2:
- v_0..v_{m-1}: the real DFT basis on coordinates [0, m), orthonormal. The shift j -> j+1 is
  one fixed rotation R of those coordinates (a 2x2 rotation per frequency): R v_j = v_{j+1}.
- u: uniform on coordinates [m, h), orthogonal to every v_j.
- target: embedding of s_j = beta*(u + v_j); lm_head row of s_{j+1} = v_j (times LOGIT_NORM),
  every other row zero, so the greedy successor of s_j is s_{j+1}. A token off the cycle
  embeds like a random cycle position, so the first generated token is already on it. All
  other tensors (attention, router, FP8 experts) stay make-model's random ones and run.
- draft: see `oracle_tensor`.

The cycle depends on the target's config alone (CYCLE_SEED), so a draft can be written for a
target later; `check_target` refuses a target that was not written with `predictable=True`.
"""

import math
from dataclasses import dataclass

import torch

from vllm_moe_offload.synthetic.tokenizer import MAX_TRAINED_VOCAB, SPECIAL_TOKENS

CYCLE_SEED = 0
LOGIT_NORM = 10.0  # norm of a non-zero lm_head row, as make-model's random lm_head rows have
# The scale argument (`embedding_scale`) gives the cycle a margin of MARGIN/sqrt(2) standard
# deviations of what the random layers add: 45 at the expected size of that noise.
MARGIN = 64.0
GATE = 8.0  # the oracle MLP's gate value: silu(8) = 7.997, so the MLP is linear in `up`
# The share of the oracle's residual on the cycle's span (the rest is on u). The target's noise
# in that span, which fc keeps, then barely moves the residual's RMS, by which the MLP's step
# is scaled: at 5x the expected noise in the full-size preset (its norm 2.5x beta: m = 1024
# dimensions of it) it moves the RMS by 5%, where an even split of u and v_j would double it
# and stall the walk.
CYCLE_SHARE = 1 / 8
U_SHARE = math.sqrt(1 - CYCLE_SHARE**2)


@dataclass(frozen=True)
class Cycle:
    ids: torch.Tensor  # [m] s_0..s_{m-1}
    decoys: torch.Tensor  # [m] ids off the cycle: the oracle proposes decoys[j] for a missed s_j
    positions: torch.Tensor  # [vocab] the cycle position each token's embedding carries
    v: torch.Tensor  # [m, h] float64, row j = v_j
    u: torch.Tensor  # [h] float64
    rotation: torch.Tensor  # [m, m] float64, R on coordinates [0, m)
    scale: float  # beta


def embedding_scale(num_layers: int) -> float:
    """beta. The residual entering the target's final norm is beta*(u + v_j) plus what the 2L
    sublayers (attention, MLP/MoE) added. Every sublayer reads RMSNorm(residual), per-coordinate
    RMS ~1 however large beta is, and writes through a fresh random matrix (o_proj, down_proj:
    std 1/sqrt(fan_in)), so its output's projection on any fixed unit vector is ~N(0, c^2)
    with c the RMS of the matrix's input: <= ~1 (attention: averages of unit-RMS values; MoE:
    silu(gate)*up, ~0.6, a convex mix over experts), independent across sublayers. Summed, the
    projection on each v_k is ~N(0, 2L c^2). The logit of s_{j+1} beats that of s_{k+1} by
    beta + N(0, 4L c^2): beta = MARGIN*sqrt(2L) is a 45-sigma margin at c = 1, 9 sigma at c = 5
    (the tests perturb by c = 5). Per coordinate the embedding is ~14-28 in the presets, where
    bf16 rounding of the residual (<= 2^-9 relative) adds < 0.13 per sublayer, well below c."""
    return MARGIN * math.sqrt(2 * num_layers)


def _dft_basis(m: int) -> torch.Tensor:
    """[m, m] orthogonal, column j = v_j restricted to coordinates [0, m): rows are the constant,
    cos/sin of frequencies 1..m/2-1, and the alternating (Nyquist) vector."""
    j = torch.arange(m, dtype=torch.float64)
    angle = 2 * math.pi * torch.arange(1, m // 2, dtype=torch.float64)[:, None] * j / m
    waves = torch.stack([angle.cos(), angle.sin()], dim=1).reshape(m - 2, m) * math.sqrt(2 / m)
    constant, nyquist = torch.ones_like(j)[None], (-1.0) ** j[None]
    return torch.cat([constant / math.sqrt(m), waves, nyquist / math.sqrt(m)])


def cycle_for(config: dict) -> Cycle:
    """The cycle of a make-model target with HF config `config`."""
    h, vocab = config["hidden_size"], config["vocab_size"]
    m = h // 2
    # Trained ids only: the walk decodes to the tokenizer's words, not <|reserved_n|>; the
    # special ids (EOS among them) are left out, so the walk never stops a request early.
    pool = torch.arange(len(SPECIAL_TOKENS), min(vocab, MAX_TRAINED_VOCAB))
    if m % 2 or 2 * m > len(pool):
        raise ValueError(f"no predictable cycle for hidden size {h} and vocabulary {vocab}")
    gen = torch.Generator().manual_seed(CYCLE_SEED)
    chosen = pool[torch.randperm(len(pool), generator=gen)[: 2 * m]]
    positions = torch.randint(m, (vocab,), generator=gen)
    positions[chosen[:m]] = torch.arange(m)
    basis = _dft_basis(m)
    v = torch.zeros(m, h, dtype=torch.float64)
    v[:, :m] = basis.T
    u = torch.zeros(h, dtype=torch.float64)
    u[m:] = 1 / math.sqrt(h - m)
    return Cycle(ids=chosen[:m], decoys=chosen[m:], positions=positions, v=v, u=u,
                 rotation=basis.roll(-1, dims=1) @ basis.T,
                 scale=embedding_scale(config["num_hidden_layers"]))


def target_tensor(name: str, cycle: Cycle) -> torch.Tensor | None:
    """The predictable target's `name` (bf16), or None where it keeps make-model's random one."""
    if name == "model.embed_tokens.weight":
        table = (cycle.scale * (cycle.u + cycle.v)).to(torch.bfloat16)
        return table[cycle.positions]
    if name == "lm_head.weight":
        return _rows(len(cycle.positions), cycle.ids.roll(-1), cycle.v)  # row s_{j+1} = v_j
    return None


def check_target(cycle: Cycle, lm_head: torch.Tensor) -> None:
    """Raises unless `lm_head` is the predictable target's (the oracle reads nothing else)."""
    expected = target_tensor("lm_head.weight", cycle)
    if lm_head.shape != expected.shape or not torch.equal(lm_head, expected):
        raise ValueError("the oracle draft needs a predictable target: write it with "
                         "`make-model --predictable` (write_checkpoint(..., predictable=True))")


def missed_positions(m: int, miss_rate: float, seed: int) -> torch.Tensor:
    """[m] bool: the round(miss_rate*m) cycle positions the oracle proposes a decoy for."""
    if not 0.0 <= miss_rate <= 1.0:
        raise ValueError(f"miss rate {miss_rate} is not in [0, 1]")
    missed = torch.zeros(m, dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    missed[torch.randperm(m, generator=gen)[: round(miss_rate * m)]] = True
    return missed


def oracle_tensor(name: str, shape, cycle: Cycle, missed: torch.Tensor) -> torch.Tensor | None:
    """The oracle draft's `name`, or None where a random tensor does (q, k, v).

    vLLM's EAGLE-3 draft (llama_eagle3.py, norm_before_residual False): residual = fc(aux);
    attention adds o_proj(...) = 0; prenorm = residual + mlp(post_attention_layernorm(residual));
    logits = lm_head(norm(prenorm)); the next draft step gets prenorm back as its hidden state.
    - fc: the aux chunk of the target's last layer, beta*(u + v_j) + noise at the position of
      s_j, rotated one position and scaled to RMS 1: sqrt(h)*(a*u + c*v_{j+1}), a = U_SHARE,
      c = CYCLE_SHARE. R fixes u.
    - mlp: gate rows read u, which holds sqrt(h)*a of the RMS-1 input, so the gate is the
      constant GATE; up selects coordinates [0, m), down applies (R - I)/silu(GATE). The layer
      thus adds (R - I) residual: prenorm = sqrt(h)*(a*u + c*v_{j+2}), RMS 1 again.
    - all norm weights are one, so norm(prenorm) = prenorm: the next step turns the cycle once
      more whether it is fed the pre- or the post-norm state.
    - lm_head: row s_j = v_j, but for a missed j the row of decoys[j] = v_j instead.
    At the position of s_j (the draft's input token is s_{j+1}) the draft proposes s_{j+2},
    then s_{j+3}, ..., exactly the target's continuation but for the missed positions.
    """
    h, m = cycle.u.numel(), len(cycle.ids)
    if name == "fc.weight":
        fc = torch.zeros(shape, dtype=torch.float64)
        last = fc[:, -h:]
        last[:m, :m] = cycle.rotation * CYCLE_SHARE
        last[m:, m:] = torch.outer(cycle.u[m:], cycle.u[m:]) * U_SHARE
        return fc * math.sqrt(h) / cycle.scale
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.float64)
    if name.endswith("o_proj.weight"):
        return torch.zeros(shape, dtype=torch.float64)
    if name.endswith("gate_proj.weight"):
        return (GATE / (math.sqrt(h) * U_SHARE) * cycle.u).expand(shape).clone()
    if name.endswith("up_proj.weight"):
        up = torch.zeros(shape, dtype=torch.float64)
        up[:m, :m] = torch.eye(m)
        return up
    if name.endswith("down_proj.weight"):
        down = torch.zeros(shape, dtype=torch.float64)
        silu = torch.nn.functional.silu(torch.tensor(GATE, dtype=torch.float64))
        down[:m, :m] = (cycle.rotation - torch.eye(m)) / silu
        return down
    if name == "lm_head.weight":
        return _rows(shape[0], torch.where(missed, cycle.decoys, cycle.ids), cycle.v)
    return None


def _rows(n: int, ids: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[n, h] bf16 zeros but row ids[j] = LOGIT_NORM * v_j."""
    out = torch.zeros(n, v.shape[1], dtype=torch.bfloat16)
    out[ids] = (LOGIT_NORM * v).to(torch.bfloat16)
    return out
