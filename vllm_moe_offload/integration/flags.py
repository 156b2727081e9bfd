"""The `--enable-expert-offload` flag family on `vllm serve` (and on every vLLM command that
takes engine arguments).

The flags are sugar for `--additional-config '{"expert_offload": {...}}'`: `install_flags()`
(called by `plugin.register()`) wraps `EngineArgs.add_cli_args` (adds an "ExpertOffload"
argument group) and `EngineArgs.from_cli_args` (folds the parsed flags into
`additional_config`). vLLM gives general plugins no parser hook; it loads them inside
`AsyncEngineArgs.add_cli_args` just before it calls `EngineArgs.add_cli_args`, so the wrapped
version is the one used. The wrapper also makes a malformed `--additional-config` name its
JSON error.
"""

import argparse
import json

from vllm_moe_offload.config import ADDITIONAL_CONFIG_KEY

# (flag, OffloadConfig key, argparse kwargs)
_FLAGS = [
    ("--enable-expert-offload", "enabled",
     dict(action="store_true", default=None,
          help="Keep the routed experts of a Qwen3-MoE model in host memory and fetch them "
               "into a GPU expert cache on demand.")),
    ("--expert-cache-gb", "cache_gb",
     dict(type=float, default=None,
          help="GPU memory for the expert cache, GiB (default: half of what vLLM may use).")),
    ("--expert-cache-slots", "cache_slots",
     dict(type=int, default=None,
          help="Expert cache size in experts, summed over MoE layers (instead of -gb).")),
    ("--expert-pinned-limit-gb", "pinned_limit_gb",
     dict(type=float, default=None,
          help="Fail at start-up if the host expert store would need more than this, GiB.")),
]
_WRAPPED = "_expert_offload_wrapped"


def add_offload_args(parser) -> None:
    group = parser.add_argument_group(
        "ExpertOffload", "Expert offload (vllm-moe-offload): routed experts in host memory, "
        "a GPU expert cache, fetched on demand.")
    for flag, _, kwargs in _FLAGS:
        group.add_argument(flag, **kwargs)


def fold_offload_args(args: argparse.Namespace, engine_args) -> None:
    """Moves the parsed flags into engine_args.additional_config["expert_offload"]."""
    values = {key: getattr(args, flag[2:].replace("-", "_"), None) for flag, key, _ in _FLAGS}
    given = {k: v for k, v in values.items() if v is not None}
    if not given:
        return
    additional = dict(engine_args.additional_config or {})
    merged = {**additional.get(ADDITIONAL_CONFIG_KEY, {}), **given}
    if not merged.get("enabled"):
        raise ValueError(f"expert offload: {sorted(given)} given without "
                         "--enable-expert-offload; add it or drop the expert flags")
    additional[ADDITIONAL_CONFIG_KEY] = merged
    engine_args.additional_config = additional


def name_json_errors(parser) -> None:
    """Makes `--additional-config` name what is wrong with its JSON. vLLM's own type says only
    "cannot be converted to <function loads>" for a value shaped like an object, and passes any
    other string on (a truncated object, say), which VllmConfig then refuses with "Input should
    be a valid dictionary", far from the flag."""
    action = getattr(parser, "_option_string_actions", {}).get("--additional-config")
    if action is None or action.type is None:
        return
    vllm_type = action.type

    def additional_config(value: str):
        if value.strip() in ("", "None"):  # vLLM's way to say "no additional config"
            return vllm_type(value)
        example = '{"expert_offload": {"enabled": true}}'
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(
                f"not valid JSON ({e}) in {value!r}; give a JSON object such as "
                f"'{example}', or use --enable-expert-offload and the --expert-* flags") from e
        if not isinstance(parsed, dict):
            raise argparse.ArgumentTypeError(
                f"must be a JSON object such as '{example}', got {value!r}")
        return vllm_type(value)

    action.type = additional_config


def install_flags() -> None:
    from vllm.engine.arg_utils import EngineArgs
    if getattr(EngineArgs.add_cli_args, _WRAPPED, False):
        return
    add_cli_args = EngineArgs.add_cli_args  # a staticmethod, read through the class
    from_cli_args = EngineArgs.from_cli_args.__func__  # a classmethod's function

    def add_cli_args_with_offload(parser, *args, **kwargs):
        parser = add_cli_args(parser, *args, **kwargs)
        add_offload_args(parser)
        name_json_errors(parser)
        return parser

    def from_cli_args_with_offload(cls, args: argparse.Namespace):
        engine_args = from_cli_args(cls, args)
        fold_offload_args(args, engine_args)
        return engine_args

    setattr(add_cli_args_with_offload, _WRAPPED, True)
    EngineArgs.add_cli_args = staticmethod(add_cli_args_with_offload)
    EngineArgs.from_cli_args = classmethod(from_cli_args_with_offload)
