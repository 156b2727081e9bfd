"""Predicts decode throughput against concurrency, cache share and draft length, and picks
the batch size to recommend (`vllm-moe-offload plan`, benchmarks/planner_check.py).

Example:
    rows = solve(profile, geometry, resident_share=0.25)
    print(format_table(rows, recommend(rows)))
"""

from dataclasses import dataclass

from vllm_moe_offload.offload.geometry import MoeGeometry


def unique_experts(num_experts: int, top_k: int, tokens: float) -> float:
    """Expected distinct experts a layer step touches when `tokens` tokens each route to top_k
    of num_experts uniformly: E * (1 - (1 - K/E)^tokens) (Klotski's n-batch argument)."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


@dataclass(frozen=True)
class PlanRow:
    n: int  # concurrent sequences (--max-num-seqs)
    unique_per_layer: float
    io_ms_per_layer: float
    gpu_ms_per_layer: float
    step_ms: float  # one decode step through all MoE layers
    tok_s: float
    speedup: float  # over n = 1


def solve(profile, geometry: MoeGeometry, resident_share: float,
          n_values: tuple[int, ...] = (1, 4, 8, 16, 32, 64, 128), overlap: bool = False,
          spec_tokens: int = 0, acceptance_length: float = 1.0) -> list[PlanRow]:
    """Predicted decode throughput against concurrency n, under uniform routing.

    A step serves n sequences x (spec_tokens + 1) tokens and yields n x acceptance_length
    tokens. Per layer it fetches the unique experts that miss the cache (a share
    1 - resident_share of them) and computes attention, the grouped GEMM and fixed overhead;
    with `overlap` the copies hide behind compute (max), without it they add up.
    """
    fetch_ms = geometry.layout.record_bytes / (profile.h2d_gbps * 1e9) * 1e3
    rows = []
    for n in n_values:
        tokens = n * (spec_tokens + 1)
        unique = unique_experts(geometry.num_experts, geometry.top_k, tokens)
        io = unique * (1.0 - resident_share) * fetch_ms
        gpu = (profile.gemm_time_ms(tokens) + profile.attention_ms_per_seq * n
               + profile.layer_overhead_ms)
        per_layer = max(io, gpu) if overlap else io + gpu
        step_ms = per_layer * geometry.num_moe_layers
        tok_s = n * acceptance_length / step_ms * 1e3
        rows.append(PlanRow(n, unique, io, gpu, step_ms, tok_s, 0.0))
    base = rows[0].tok_s
    return [PlanRow(**{**r.__dict__, "speedup": r.tok_s / base}) for r in rows]


def acceptance_length(spec_tokens: int, acceptance_rate: float) -> float:
    """Expected tokens a sequence gains per step with `spec_tokens` drafted tokens each
    accepted with probability `acceptance_rate` until the first rejection, plus the target's
    own token: (1 - a^(k+1)) / (1 - a)."""
    if acceptance_rate >= 1.0:
        return spec_tokens + 1.0
    return (1.0 - acceptance_rate ** (spec_tokens + 1)) / (1.0 - acceptance_rate)


@dataclass(frozen=True)
class SpecRow:
    spec_tokens: int  # num_speculative_tokens
    acceptance_length: float
    unique_per_layer: float
    step_ms: float
    tok_s: float


def solve_spec(profile, geometry: MoeGeometry, resident_share: float, n: int,
               acceptance_rate: float, draft_ms_per_token: float = 0.0,
               k_values: tuple[int, ...] = (0, 1, 2, 3, 5), overlap: bool = False
               ) -> list[SpecRow]:
    """Predicted tok/s against the draft length k at concurrency n: k widens the experts a
    step touches (n (k + 1) tokens route) and adds k draft forwards; the step yields
    n x acceptance_length(k) tokens."""
    rows = []
    for k in k_values:
        length = acceptance_length(k, acceptance_rate)
        row = solve(profile, geometry, resident_share, (n,), overlap, k, length)[0]
        step_ms = row.step_ms + k * draft_ms_per_token
        rows.append(SpecRow(k, length, row.unique_per_layer, step_ms,
                            n * length / step_ms * 1e3))
    return rows


def recommend(rows: list[PlanRow], tpot_ms: float | None = None) -> PlanRow:
    """Highest predicted tok/s whose step time (the TPOT) meets the target, if any."""
    ok = [r for r in rows if tpot_ms is None or r.step_ms <= tpot_ms] or rows[:1]
    return max(ok, key=lambda r: r.tok_s)


def format_spec_table(rows: list[SpecRow], chosen: SpecRow) -> str:
    lines = [f"{'k':>3} {'accepted/step':>13} {'unique/layer':>12} {'step ms':>8} {'tok/s':>9}"]
    for r in rows:
        mark = "  <- recommended" if r is chosen else ""
        lines.append(f"{r.spec_tokens:>3} {r.acceptance_length:>13.2f} "
                     f"{r.unique_per_layer:>12.1f} {r.step_ms:>8.1f} {r.tok_s:>9.1f}{mark}")
    return "\n".join(lines)


def format_table(rows: list[PlanRow], chosen: PlanRow) -> str:
    lines = [f"{'n':>5} {'unique/layer':>12} {'I/O ms/layer':>12} {'GPU ms/layer':>12} "
             f"{'TPOT ms':>8} {'tok/s':>9} {'speed-up':>8}"]
    for r in rows:
        mark = "  <- recommended" if r is chosen else ""
        lines.append(f"{r.n:>5} {r.unique_per_layer:>12.1f} {r.io_ms_per_layer:>12.3f} "
                     f"{r.gpu_ms_per_layer:>12.3f} {r.step_ms:>8.1f} {r.tok_s:>9.1f} "
                     f"{r.speedup:>7.1f}x{mark}")
    return "\n".join(lines)
