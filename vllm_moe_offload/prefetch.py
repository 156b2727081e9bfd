"""`CorrelationPrefetcher`: predicts layer l+1's experts from layer l's routing of the batch.

Online first-order statistics (Klotski's correlation idea): transitions(l)[a, b] counts
tokens routed to expert a at layer l and to b at layer l+1, decayed by `decay` per update so
the table follows drifting traffic; a step of more than MAX_TOKENS tokens (a prefill) adds an
even sample of that many, so it weighs no more than a large decode batch. For a batch routed
at layer l, a token's chance to use b
at l+1 is estimated as min(1, sum_k P(b | a_k)) with P(b | a) = transitions[a, b] / row sum,
and the batch uses b unless every token misses it. Experts whose chance reaches `threshold`
are predicted, most likely first, at most `max_experts` of them; below the threshold a guess
is not worth the slot it would take. Given what layer l+1 holds, the i-th guess must also
beat, by `margin`, the chance of the i-th least likely resident (free slots displace
nothing): where the batch uses nearly every expert (big batches, uniform routing) a prefetch
would only swap one used expert for another and cost its bytes. This weighs a guess against
the best victim; the cache's policy picks the actual one, which may be likelier.

Example:
    prefetcher = CorrelationPrefetcher(num_layers=48, num_experts=128)
    prefetcher.prefetch_next(cache, layer, ids)  # ids: [T, K] routed experts at `layer`
"""

from collections.abc import Collection

import numpy as np

_PRIOR = 1e-3  # added to every transition count when predicting (not decayed with them)
_RESCALE_BELOW = 1e-100
# The host runs this between a layer's kernels and the next layer's sync, on the step's
# critical path: a prefill of thousands of tokens is learned from and predicted with an even
# sample of this many, so its cost stays that of a decode batch.
MAX_TOKENS = 256


def _sample(n: int) -> np.ndarray | slice:
    return slice(None) if n <= MAX_TOKENS else np.linspace(0, n - 1, MAX_TOKENS).astype(int)


class CorrelationPrefetcher:
    def __init__(self, num_layers: int, num_experts: int, decay: float = 0.999,
                 threshold: float = 0.5, margin: float = 0.25):
        if not 0.0 < decay <= 1.0:  # the stored counts divide by decay^steps
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.num_experts = num_experts
        self.decay = decay
        self.threshold = threshold
        self.margin = margin
        # [L-1, E, E] the decayed transition counts of `transitions` divided by each layer's
        # _scale: decaying multiplies one number instead of E x E (the host runs it every step)
        self._stored = np.zeros((max(num_layers - 1, 0), num_experts, num_experts))
        self._scale = np.ones(len(self._stored))
        self._previous: tuple[int, np.ndarray] | None = None  # (layer, ids [T, K])

    def transitions(self, layer: int) -> np.ndarray:
        """[E, E] decayed counts of tokens routed to a at `layer` and to b at layer + 1."""
        return self._stored[layer] * self._scale[layer]

    def observe(self, layer: int, ids: np.ndarray) -> None:
        """Records layer `layer`'s routing [T, K]; pairs it with layer-1's routing of the same
        tokens if that was the previous observation."""
        prev = self._previous
        if prev is not None and prev[0] == layer - 1 and prev[1].shape[0] == ids.shape[0]:
            src, e = layer - 1, self.num_experts
            self._scale[src] *= self.decay
            if self._scale[src] < _RESCALE_BELOW:  # fold it in before 1/scale overflows
                self._stored[src] *= self._scale[src]
                self._scale[src] = 1.0
            rows = _sample(ids.shape[0])
            pairs = (prev[1][rows, :, None] * e + ids[rows, None, :]).ravel()  # a_i x every b_j
            counts = self._stored[src].reshape(-1)  # a view
            if 8 * pairs.size < counts.size:  # a few tokens: touch only their pairs
                np.add.at(counts, pairs, 1.0 / self._scale[src])
            else:
                counts += np.bincount(pairs, minlength=e * e) / self._scale[src]
        self._previous = (layer, np.asarray(ids))

    def predict(self, layer: int, ids: np.ndarray, max_experts: int,
                resident: Collection[int] | None = None, free_slots: int = 0) -> list[int]:
        """Experts layer+1 is likely to route to, given layer `layer`'s routing [T, K]. With
        `resident` (the experts layer+1 holds; `free_slots` more fit without eviction) only
        those not resident whose chance beats the displaced expert's by `margin`."""
        if layer >= len(self._stored) or max_experts <= 0 or len(ids) == 0:
            return []
        sample = ids[_sample(ids.shape[0])]  # [S, K]
        rows, where = slice(None), sample
        if 2 * sample.size < self.num_experts:  # P(b | a) only for the few experts a routed
            rows, where = np.unique(sample, return_inverse=True)
            where = where.reshape(sample.shape)
        table = self._stored[layer][rows] * self._scale[layer] + _PRIOR  # [R, E]; the prior:
        probs = table / table.sum(axis=1, keepdims=True)  # no row divides by zero, ever
        per_token = np.minimum(1.0, probs[where].sum(axis=1))  # [S, E]
        # the sample's misses stand for all T tokens': (1 - p) multiplied over T tokens
        log_miss = np.log1p(-np.minimum(per_token, 1.0 - 1e-12)).sum(axis=0)
        used = 1.0 - np.exp(log_miss * (ids.shape[0] / len(sample)))  # [E]
        order = np.argsort(-used, kind="stable")
        chosen = order[used[order] >= self.threshold]
        if resident is None:
            return chosen[:max_experts].tolist()
        held = np.fromiter(resident, dtype=np.int64)
        is_held = np.zeros(self.num_experts, dtype=bool)
        is_held[held] = True
        chosen = chosen[~is_held[chosen]][:max_experts]
        displaced = np.sort(used[held])  # least likely first
        # the i-th guess displaces the (i - free_slots)-th least likely resident, if any
        victim = np.arange(len(chosen)) - free_slots
        bar = np.full(len(chosen), -np.inf)
        evicts = victim >= 0
        bar[evicts] = np.inf  # nothing left to displace
        has_victim = evicts & (victim < len(displaced))
        bar[has_victim] = displaced[victim[has_victim]] + self.margin
        fails = np.flatnonzero(used[chosen] < bar)
        return chosen[:fails[0] if len(fails) else len(chosen)].tolist()

    def prefetch_next(self, cache, layer: int, ids: np.ndarray) -> None:
        """Learns layer `layer`'s transition from its routing [T, K] and loads the next
        layer's likely experts into `cache` (an `ExpertCache`), weighed against its residents."""
        self.observe(layer, ids)
        nxt = layer + 1
        if nxt < len(cache.quotas):
            cache.prefetch(nxt, self.predict(layer, ids, cache.quotas[nxt],
                                             cache.resident_experts(nxt), cache.free_slots(nxt)))
