"""Routing traces: the real Qwen3-30B-A3B trace, a generator calibrated to it, and the
statistics by which both are compared. The cache simulator replays them; the realistic-routing
checkpoints (`realistic.py`) route along a generated table.

The real trace (`benchmarks/data/real-routing/`, Apache-2.0, source in its README) is one
response of 128 decode tokens, top-6. The generator is a model of such routing, not a
derivation from it, with one part per effect the trace shows:

- a request's working set per layer: the `set_size` experts of highest score, where the score
  mixes the layer's popularity (shared by all requests: `share_popular`) with a request's own
  slowly drifting preference (a latent process with correlation length `set_drift` tokens).
  Members get `set_bonus` in the token's logits, and the score itself `set_pref` (frequent
  experts stay frequent, which is why LFU beats LRU on the trace);
- a token state shared by all layers (so the next layer is predictable from this one): a mix
  of a medium-range process (`mid`, length `mid_len`), a fast AR(1) one (`fast`,
  `fast_corr` per token, the t-1 reuse) and white noise, read by each layer through its own
  random projection;
- a bonus `follow` for the successors (a fixed random permutation per layer) of the experts
  the token chose at the layer before: what a first-order next-layer predictor learns;
- noise private to each layer, strongest in the first layers (layer 0 routes nearly
  uniformly in the trace), by the layer's place in a 48-layer model;
- top-k of the logits.

Assumption (no multi-request trace exists here): a batch is independent requests, each with
its own working set, drawn from the shared per-layer popularity. `table` instead walks one
stream around a cycle; requests that start at different points of it get their own working
sets, and requests that start close together share theirs.

Calibrated at 48 layers, top-6, batch 1 (tests/test_traces.py checks it): LRU and LFU hit
rates at 12.5/25/50% of the experts within 3 points of the real trace's.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

REAL_TRACE = (Path(__file__).resolve().parents[2]
              / "benchmarks" / "data" / "real-routing" / "qwen3-30b-a3b.route.csv")
PROFILE_LAYERS = 48  # the model the layer profile (private noise) was calibrated on


def load_real_trace(path: Path = REAL_TRACE) -> np.ndarray:
    """The trace's decode tokens as expert ids [steps, layers, 1, top_k] (rank order)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: the real routing trace ships with the repository "
                                "(benchmarks/data/real-routing/), not with the package")
    rows = [line.split(",") for line in Path(path).read_text().splitlines()
            if line and not line.startswith(("#", "turn"))]
    decode = np.array([[int(r[2]), int(r[3]), int(r[4]), int(r[5])] for r in rows if r[1] == "1"])
    step, layer, rank, expert = decode.T
    trace = np.full((step.max() - step.min() + 1, layer.max() + 1, 1, rank.max() + 1), -1)
    trace[step - step.min(), layer, 0, rank] = expert
    if (trace < 0).any():
        raise ValueError(f"{path}: incomplete decode rows")
    return trace


@dataclass(frozen=True)
class RoutingModel:
    num_layers: int = 48
    num_experts: int = 128
    top_k: int = 6
    dims: int = 6  # of the latent processes
    # Invisible in one request (its working set is fixed over 128 tokens either way); set so
    # that 8 requests x 128 tokens put ~90% of the routing on half the experts, the weak
    # global skew published for Qwen3-30B-A3B (1k-token windows)
    share_popular: float = 0.3
    set_size: int = 77
    set_bonus: float = 3.45
    set_pref: float = 0.8
    set_drift: float = 400.0  # tokens; not seen in 128 tokens: a 1k window holds a few sets
    mid: float = 0.343
    mid_len: float = 25.4
    fast: float = 0.343
    fast_corr: float = 0.544
    white: float = 0.354
    follow: float = 0.38  # logit bonus of the successors of the previous layer's experts
    private_deep: float = 0.418
    private_first: float = 2.6
    private_decay: float = 2.84  # layers (of 48)
    seed: int = 0


def _circular(m: int, kernel, n: int, rng: np.random.Generator) -> np.ndarray:
    """[m, n]: n independent stationary Gaussian processes (unit variance) on a cycle of m
    points, correlation kernel(d) at distance d: C^(1/2) w with C circulant, via the FFT."""
    d = np.arange(m)
    eigen = np.clip(np.fft.rfft(kernel(np.minimum(d, m - d))).real, 0.0, None)
    w = rng.standard_normal((m, n))
    return np.fft.irfft(np.sqrt(eigen)[:, None] * np.fft.rfft(w, axis=0), n=m, axis=0)


def _smooth(m: int, length: float):
    """The periodic squared-exponential kernel on a cycle of m: exp(-d^2 / 2 length^2) for
    d << m, positive definite for every m (a short cycle only makes the process smoother)."""
    return lambda d: np.exp(-0.5 * (m / (np.pi * length) * np.sin(np.pi * d / m)) ** 2)


class _Layers:
    """The parts shared by all requests: popularity, projections, private noise per layer."""

    def __init__(self, model: RoutingModel, rng: np.random.Generator):
        n, e, d = model.num_layers, model.num_experts, model.dims
        self.popularity = rng.standard_normal((n, e))
        self.set_proj = rng.standard_normal((n, e, d)) / np.sqrt(d)
        self.token_proj = rng.standard_normal((n, e, d)) / np.sqrt(d)
        place = np.arange(n) * (PROFILE_LAYERS - 1) / max(n - 1, 1)
        self.successor = np.stack([rng.permutation(e) for _ in range(n)])  # [L, E]
        self.private = model.private_deep + (model.private_first - model.private_deep) * np.exp(
            -place / model.private_decay)


def _stream(model: RoutingModel, layers: _Layers, m: int, rng: np.random.Generator
            ) -> np.ndarray:
    """One request's routing around a cycle of m tokens: [m, L, K] expert ids, rank order."""
    d, k = model.dims, model.top_k
    ws = _circular(m, _smooth(m, model.set_drift), d, rng)
    token = (np.sqrt(model.mid) * _circular(m, _smooth(m, model.mid_len), d, rng)
             + np.sqrt(model.fast) * _circular(m, lambda x: model.fast_corr ** x, d, rng)
             + np.sqrt(model.white) * rng.standard_normal((m, d)))
    out = np.empty((m, model.num_layers, k), dtype=np.int64)
    rows = np.arange(m)[:, None]
    for layer in range(model.num_layers):
        score = (np.sqrt(model.share_popular) * layers.popularity[layer]
                 + np.sqrt(1 - model.share_popular) * ws @ layers.set_proj[layer].T)  # [m, E]
        cut = -np.partition(-score, model.set_size - 1, axis=1)[:, model.set_size - 1:][:, :1]
        logits = (model.set_bonus * (score >= cut) + model.set_pref * score
                  + token @ layers.token_proj[layer].T
                  + layers.private[layer] * rng.standard_normal(score.shape))
        if layer > 0:  # what the previous layer chose leans this one to its successors
            logits[rows, layers.successor[layer][out[:, layer - 1]]] += model.follow
        top = np.argpartition(-logits, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(logits, top, 1), axis=1, kind="stable")
        out[:, layer] = np.take_along_axis(top, order, 1)
    return out


def generate(model: RoutingModel, batch: int, steps: int) -> np.ndarray:
    """Decode routing of `batch` independent requests: [steps, L, batch, K]."""
    rng = np.random.default_rng(model.seed)
    layers = _Layers(model, rng)
    m = max(2 * steps, 4 * int(model.set_drift))  # longer than the steps: no wrap seen
    trace = np.empty((steps, model.num_layers, batch, model.top_k), dtype=np.int64)
    for b in range(batch):
        trace[:, :, b] = _stream(model, layers, m, rng)[:steps]
    return trace


def table(model: RoutingModel, length: int) -> np.ndarray:
    """One stream's routing around a cycle of `length` tokens, [length, L, K]: token j routes
    like the j-th token of a request, and token length-1 is followed by token 0."""
    rng = np.random.default_rng(model.seed)
    return _stream(model, _Layers(model, rng), length, rng)


def uniform(num_layers: int, num_experts: int, top_k: int, batch: int, steps: int,
            seed: int = 0) -> np.ndarray:
    """vLLM's uniform_random routing simulator's trace: [steps, L, batch, K]."""
    rng = np.random.default_rng(seed)
    keys = rng.random((steps, num_layers, batch, num_experts))
    return np.argsort(keys, axis=-1)[..., :top_k]


def measure(trace: np.ndarray, num_experts: int) -> dict[str, float]:
    """Statistics of a decode trace [steps, L, batch, K], averaged over layers and requests:
    distinct_N: distinct experts a layer routes to in N consecutive tokens of a request
        (N = 8, 32, 128, where the trace is that long);
    reuse_N: share of a token's experts that the request's token N steps earlier also used;
    within_8: share of a token's experts that one of the request's 8 previous tokens used;
    reuse_1_early / reuse_1_deep: reuse_1 over the first quarter of the layers / the rest;
    next_layer_precision: share of a token's next-layer experts that a first-order predictor
        (top-k of sum_i P(b | a_i), fitted on the first half of the steps) gets right in the
        second half."""
    steps, layers, batch, k = trace.shape
    seq = trace.transpose(2, 1, 0, 3)  # [B, L, S, K]
    used = np.zeros((batch, layers, steps, num_experts), dtype=bool)
    np.put_along_axis(used, seq, True, axis=-1)
    out: dict[str, float] = {}
    for n in (8, 32, 128):
        if steps >= n:
            windows = [used[:, :, s:s + n].any(axis=2).sum(-1) for s in range(0, steps - n + 1, n)]
            out[f"distinct_{n}"] = float(np.mean(windows))
    for lag in (1, 8, 32):
        if steps > lag:
            out[f"reuse_{lag}"] = float((used[:, :, lag:] & used[:, :, :-lag]).sum() / (
                batch * layers * (steps - lag) * k))
    if steps > 8:
        recent = np.zeros_like(used[:, :, 8:])
        for lag in range(1, 9):
            recent |= used[:, :, 8 - lag:steps - lag]
        out["within_8"] = float((recent & used[:, :, 8:]).sum() / (batch * layers * (steps - 8)
                                                                   * k))
    per_layer = (used[:, :, 1:] & used[:, :, :-1]).sum(axis=(0, 2, 3)) / (
        batch * (steps - 1) * k)
    quarter = max(1, layers // 4)
    out["reuse_1_early"] = float(per_layer[:quarter].mean())
    out["reuse_1_deep"] = float(per_layer[quarter:].mean())
    out["next_layer_precision"] = _next_layer_precision(trace, num_experts)
    return out


def _next_layer_precision(trace: np.ndarray, num_experts: int) -> float:
    steps, layers, batch, k = trace.shape
    half = steps // 2
    precision = []
    for layer in range(layers - 1):
        src = trace[:half, layer].reshape(-1, k)  # [N, K]
        dst = trace[:half, layer + 1].reshape(-1, k)
        pairs = np.full((num_experts, num_experts), 1e-9)
        np.add.at(pairs, (np.repeat(src, k, axis=1).ravel(), np.tile(dst, (1, k)).ravel()), 1.0)
        cond = pairs / pairs.sum(axis=1, keepdims=True)
        scores = cond[trace[half:, layer].reshape(-1, k)].sum(axis=1)  # [N', E]
        guess = np.zeros_like(scores, dtype=bool)
        np.put_along_axis(guess, np.argsort(-scores, axis=1, kind="stable")[:, :k], True, 1)
        truth = trace[half:, layer + 1].reshape(-1, k)
        precision.append(np.take_along_axis(guess, truth, 1).mean())
    return float(np.mean(precision))
