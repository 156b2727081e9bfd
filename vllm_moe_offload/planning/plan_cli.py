"""`vllm-moe-offload plan`: a hardware profile and the model's shape in, the predicted
tok/s table and the recommended concurrency out (printed, and as JSON with --out)."""

import json
from dataclasses import asdict
from pathlib import Path

import torch

from vllm_moe_offload.planning.planner import (
    format_spec_table,
    format_table,
    recommend,
    solve,
    solve_spec,
)
from vllm_moe_offload.planning.profiler import HardwareProfile, profile_hardware
from vllm_moe_offload.synthetic.checkpoint import model_geometry


def run_plan(args) -> None:
    geometry = model_geometry(args.model)
    if args.profile:
        profile = HardwareProfile.from_json(Path(args.profile).read_text())
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"plan: measuring {device} (a few seconds)", flush=True)
        profile = profile_hardware(geometry, device)
    rows = solve(profile, geometry, args.cache_share, overlap=args.overlap)
    chosen = recommend(rows, args.tpot_ms)
    print(f"{profile.device}: h2d {profile.h2d_gbps:.1f} GB/s, cache share "
          f"{args.cache_share:.0%}, {geometry.num_moe_layers} MoE layers, uniform routing")
    print(format_table(rows, chosen))
    print(f"recommended: --max-num-seqs {chosen.n}")
    plan = {"profile": asdict(profile), "cache_share": args.cache_share,
            "recommended_max_num_seqs": chosen.n, "rows": [asdict(r) for r in rows]}
    if args.acceptance_rate is not None:
        n = args.concurrency or chosen.n
        spec = solve_spec(profile, geometry, args.cache_share, n, args.acceptance_rate,
                          args.draft_ms, overlap=args.overlap)
        best = max(spec, key=lambda r: r.tok_s)
        print(f"speculation at n={n}, acceptance rate {args.acceptance_rate:.2f}:")
        print(format_spec_table(spec, best))
        print(f"recommended: num_speculative_tokens {best.spec_tokens}")
        plan.update(acceptance_rate=args.acceptance_rate, spec_concurrency=n,
                    recommended_num_speculative_tokens=best.spec_tokens,
                    spec_rows=[asdict(r) for r in spec])
    if args.out:
        Path(args.out).write_text(json.dumps(plan, indent=2))
