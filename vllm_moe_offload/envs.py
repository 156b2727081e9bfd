"""Runtime-only knobs, read from the environment. Structural settings belong in
`additional_config["expert_offload"]` (hashed into vLLM's compile cache); these do not change
what is computed. (No `VLLM_` prefix: vLLM warns about `VLLM_*` variables it does not
know.)

| variable | default | meaning |
|---|---|---|
| `MOE_OFFLOAD_LOG_INTERVAL_S` | 10 | seconds between `expert offload: ...` log lines; 0: none |
| `MOE_OFFLOAD_ROUTING_LOG` | 0 | expert ids of this many eager layer steps kept; 0: none |

`MOE_OFFLOAD_ROUTING_LOG` is for tests: `collective_rpc("expert_offload_routing_log")` returns
the routing an engine did.
"""

import os


def log_interval_s() -> float:
    value = float(os.environ.get("MOE_OFFLOAD_LOG_INTERVAL_S", "10"))
    if value < 0:
        raise ValueError(f"MOE_OFFLOAD_LOG_INTERVAL_S must be >= 0 (0 turns the log off), "
                         f"got {value}")
    return value


def routing_log_steps() -> int:
    value = int(os.environ.get("MOE_OFFLOAD_ROUTING_LOG", "0"))
    if value < 0:
        raise ValueError(f"MOE_OFFLOAD_ROUTING_LOG must be >= 0 (0 turns it off), got {value}")
    return value
