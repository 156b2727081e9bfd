"""`OffloadConfig`: the user's knobs, parsed once and strictly from
`additional_config["expert_offload"]` (what `--enable-expert-offload` and friends fold into).

Example:
    OffloadConfig.from_dict({"enabled": True, "cache_slots": 64, "policy": "lru"})
"""

from dataclasses import dataclass, fields
from typing import Any

from vllm_moe_offload.policies import POLICIES

ADDITIONAL_CONFIG_KEY = "expert_offload"
PREFETCH_MODES = ("off", "correlation")
DECODE_MODES = ("auto", "synced", "zero-copy")
# "auto": decode batches of at most this many tokens run zero-copy in CUDA graphs, larger ones
# fetch. Measured crossover (H200, 25% cache, benchmarks/results/e2e-h200/session4): zero-copy
# 24.5 against synced 13.1 tok/s at 1 sequence, 29.6 against 31.7 at 4, 8-18% behind up to 128
# (its kernels read host memory at 43-46 GB/s, the copy engine moves 52-53). 2 and 3 were not
# measured; at 2 the synced step's ~1.5 ms of host work per layer still outlasts its copies.
AUTO_GRAPH_TOKENS = 2


@dataclass(frozen=True, slots=True)
class OffloadConfig:
    enabled: bool = False
    cache_gb: float | None = None  # GPU expert cache budget in GiB ...
    cache_slots: int | None = None  # ... or in expert slots, summed over all MoE layers
    policy: str = "lfu"  # beat or tied lru in every cell of benchmarks/cache_sim.py
    prefetch: str = "off"  # "correlation": load the next layer's predicted experts early
    pinned_limit_gb: float | None = None  # cap on host memory for the expert store
    # "synced": every layer step syncs on routing and fetches its missing experts.
    # "zero-copy": decode steps run inside FULL CUDA graphs, reading missing experts from host
    # memory (see step.graph_step); prefill keeps the host-synced fetch.
    # "auto": zero-copy for decode batches up to AUTO_GRAPH_TOKENS tokens, synced beyond.
    decode: str = "auto"

    def __post_init__(self) -> None:
        _check_type("enabled", self.enabled, bool)
        _check_type("cache_gb", self.cache_gb, (int, float), optional=True)
        _check_type("cache_slots", self.cache_slots, int, optional=True)
        _check_type("policy", self.policy, str)
        _check_type("prefetch", self.prefetch, str)
        _check_type("pinned_limit_gb", self.pinned_limit_gb, (int, float), optional=True)
        _check_type("decode", self.decode, str)
        if self.decode not in DECODE_MODES:
            raise ValueError(f"expert offload: unknown --expert-decode {self.decode!r}; "
                             f"choose one of {', '.join(DECODE_MODES)}")
        if self.cache_gb is not None and self.cache_slots is not None:
            raise ValueError("expert offload: give cache_gb (--expert-cache-gb) or cache_slots "
                             "(--expert-cache-slots), not both")
        if self.cache_gb is not None and self.cache_gb <= 0:
            raise ValueError(f"expert offload: --expert-cache-gb must be > 0, got {self.cache_gb}")
        if self.cache_slots is not None and self.cache_slots <= 0:
            raise ValueError(
                f"expert offload: --expert-cache-slots must be > 0, got {self.cache_slots}")
        if self.prefetch not in PREFETCH_MODES:
            raise ValueError(f"expert offload: unknown --expert-prefetch {self.prefetch!r}; "
                             f"choose one of {', '.join(PREFETCH_MODES)}")
        if self.policy not in POLICIES:
            raise ValueError(f"expert offload: unknown --expert-cache-policy {self.policy!r}; "
                             f"choose one of {', '.join(POLICIES)}")

    def decode_path(self, vllm_config) -> str:
        """"synced" or "zero-copy": what `decode` means for this engine, on the front end's
        config hook (before vLLM fills in its graph defaults) as in the worker's model: the
        hook leaves a graph mode (PIECEWISE for synced) that resolves alike there."""
        if self.decode != "auto":
            return self.decode
        from vllm.platforms import current_platform
        if (not current_platform.is_cuda() or vllm_config.model_config.enforce_eager
                or not _full_decode_graphs(vllm_config)):
            return "synced"  # every decode step runs eagerly anyway
        if vllm_config.speculative_config is not None:
            # EAGLE-3 with offload is measured host-synced; its decode batches in FULL graphs
            # over the cache are not validated on a GPU yet
            return "synced"
        return "zero-copy"

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "OffloadConfig":
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"expert offload: unknown key(s) {unknown} in additional_config"
                             f"['{ADDITIONAL_CONFIG_KEY}']; known keys: {sorted(known)}")
        return cls(**raw)

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "OffloadConfig":
        additional = getattr(vllm_config, "additional_config", None)
        if not isinstance(additional, dict):
            return cls()
        return cls.from_dict(additional.get(ADDITIONAL_CONFIG_KEY))


def _full_decode_graphs(vllm_config) -> bool:
    """Whether vLLM runs decode in FULL CUDA graphs. The worker sees the final graph mode; the
    config hook, which runs before vLLM fills it in, the user's mode, else the optimization
    level's default, and none for pooling or a KV-transfer instance, where vLLM may override
    full graphs with PIECEWISE (whatever the hook decides, the mode it leaves decides alike
    in the worker)."""
    mode = vllm_config.compilation_config.cudagraph_mode
    if mode is None:
        transfer = getattr(vllm_config, "kv_transfer_config", None)
        if (getattr(vllm_config.model_config, "pooler_config", None) is not None
                or getattr(transfer, "is_kv_transfer_instance", False)):
            return False
        from vllm.config.vllm import OPTIMIZATION_LEVEL_TO_CONFIG
        mode = OPTIMIZATION_LEVEL_TO_CONFIG[vllm_config.optimization_level][
            "compilation_config"]["cudagraph_mode"]
    return mode.has_full_cudagraphs()


def _check_type(name: str, value, types, optional: bool = False) -> None:
    if value is None and optional:
        return
    # bool is an int subclass: a flag value of True must not pass as a slot count.
    if isinstance(value, bool) and types is not bool and bool not in _as_tuple(types):
        raise ValueError(f"expert offload: {name} must be a number, got {value!r}")
    if not isinstance(value, types):
        raise ValueError(f"expert offload: {name} has the wrong type: {value!r}")


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)
