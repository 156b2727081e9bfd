"""`OffloadConfig`: the user's knobs, parsed once and strictly from
`additional_config["expert_offload"]` (what `--enable-expert-offload` and friends fold into).

Example:
    OffloadConfig.from_dict({"enabled": True, "cache_slots": 64})
"""

from dataclasses import dataclass, fields
from typing import Any

ADDITIONAL_CONFIG_KEY = "expert_offload"
# Keys of earlier releases: decoding now always updates the cache on the GPU, inside CUDA
# graphs, with one rule (LFU with decay), and no host prefetcher can act inside a graph.
REMOVED_KEYS = {
    "decode": "decode now always updates the expert cache on the GPU, inside CUDA graphs "
              "(no zero-copy / synced / auto modes); drop --expert-decode",
    "policy": "the cache's rule is fixed (LFU with decay, run on the GPU); drop "
              "--expert-cache-policy",
    "prefetch": "the host-side prefetcher was removed (it never won, and cannot act inside "
                "CUDA graphs); drop --expert-prefetch",
}


@dataclass(frozen=True, slots=True)
class OffloadConfig:
    enabled: bool = False
    cache_gb: float | None = None  # GPU expert cache budget in GiB ...
    cache_slots: int | None = None  # ... or in expert slots, summed over all MoE layers
    pinned_limit_gb: float | None = None  # cap on host memory for the expert store

    def __post_init__(self) -> None:
        _check_type("enabled", self.enabled, bool, "true or false")
        _check_type("cache_gb", self.cache_gb, (int, float), "a number of GiB", optional=True)
        _check_type("cache_slots", self.cache_slots, int, "a whole number of slots",
                    optional=True)
        _check_type("pinned_limit_gb", self.pinned_limit_gb, (int, float), "a number of GiB",
                    optional=True)
        if self.cache_gb is not None and self.cache_slots is not None:
            raise ValueError("expert offload: give cache_gb (--expert-cache-gb) or cache_slots "
                             "(--expert-cache-slots), not both")
        for name, flag in (("cache_gb", "--expert-cache-gb"),
                           ("cache_slots", "--expert-cache-slots"),
                           ("pinned_limit_gb", "--expert-pinned-limit-gb")):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"expert offload: {flag} must be > 0, got {value}")

    @classmethod
    def from_dict(cls, raw: Any) -> "OffloadConfig":
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ValueError(
                f"expert offload: additional_config['{ADDITIONAL_CONFIG_KEY}'] must be an "
                f'object such as {{"enabled": true, "cache_gb": 8}}, got {raw!r}')
        for key in raw:
            if key in REMOVED_KEYS:
                raise ValueError(f"expert offload: '{key}' is no longer a setting: "
                                 f"{REMOVED_KEYS[key]}")
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


def _check_type(name: str, value, types, expected: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    # bool is an int subclass: a flag value of True must not pass as a slot count.
    wrong_bool = isinstance(value, bool) and bool not in _as_tuple(types)
    if wrong_bool or not isinstance(value, types):
        raise ValueError(f"expert offload: {name} must be {expected}, got {value!r} "
                         f"({type(value).__name__})")


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)
