"""End-to-end tokens/s of one system on the Qwen3-30B-A3B-Instruct-2507-FP8 shape
(load_format=dummy), in the method of ../shared/device/baseline_reference.py, which measured
the `stock` and `uva` baselines in benchmarks.md: offline LLM, random prompt ids, temperature
1.0, ignore_eos, one short warm-up generate, wall time of one `generate` per scenario.

usage (GPU machine, kit env; VLLM_MOE_ROUTING_SIMULATION_STRATEGY=uniform_random for uniform
routing): python benchmarks/bench_e2e.py SYSTEM SCENARIOS [--out F.json]
  SYSTEM: stock | uva25 | uva50 | offload25 | offload50 | offload100  (share of expert bytes
          kept on the GPU)      SCENARIOS: comma-separated lat,thr,ttft
"""

import argparse
import json
import os
import random
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from vllm_moe_offload.checkpoint import PRESETS, hf_config
from vllm_moe_offload.geometry import MoeGeometry

SCENARIOS = {"lat": (1, 128, 256), "thr": (64, 128, 256), "ttft": (16, 2048, 16)}
GIB = 1 << 30


def h2d_bandwidth(record_bytes: int) -> float:
    """Pinned host->device copies of one expert record, bytes per second."""
    src = torch.empty(64, record_bytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty_like(src, device="cuda")
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(64):
            dst[i].copy_(src[i], non_blocking=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    return src.numel() / dt


def engine_kwargs(system: str, model_dir: Path, expert_gib: float) -> dict:
    kw = dict(model=str(model_dir), skip_tokenizer_init=True, load_format="dummy",
              max_model_len=4096, kv_cache_memory_bytes=8 << 30, max_num_seqs=256, seed=0)
    if system.startswith("uva"):  # exactly as baseline_reference.py
        share = int(system[3:]) / 100
        kw.update(cpu_offload_gb=29.0 * (1 - share) * 0.93, cpu_offload_params={"experts"})
    elif system.startswith("offload"):
        share = int(system[7:]) / 100
        kw["additional_config"] = {"expert_offload": {"enabled": True,
                                                      "cache_gb": expert_gib * share}}
    return kw


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("system")
    parser.add_argument("scenarios")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    preset = PRESETS["qwen3-30b-a3b-fp8"]
    config = hf_config(preset)
    model_dir = Path("/root/q3shape-offload")
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config))
    geometry = MoeGeometry.from_hf_config(SimpleNamespace(**config), torch.bfloat16, "fp8")
    expert_gib = geometry.total_experts * geometry.layout.record_bytes / GIB
    bw = h2d_bandwidth(geometry.layout.record_bytes)
    t0 = time.time()
    llm = LLM(**engine_kwargs(args.system, model_dir, expert_gib))
    load_s = time.time() - t0
    random.seed(0)
    rows = []
    for scen in args.scenarios.split(","):
        n, plen, olen = SCENARIOS[scen]
        prompts = [TokensPrompt(prompt_token_ids=[random.randrange(1000, 150000)
                                                  for _ in range(plen)]) for _ in range(n)]
        params = SamplingParams(max_tokens=olen, temperature=1.0, ignore_eos=True,
                                detokenize=False, seed=0)
        llm.generate(prompts[:1], SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False),
                     use_tqdm=False)
        before = _stats(llm, args.system)
        t0 = time.time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.time() - t0
        after = _stats(llm, args.system)
        ntok = sum(len(o.outputs[0].token_ids) for o in outs)
        row = dict(system=args.system, scenario=scen, n=n, prompt=plen, out=olen,
                   tok_s=round(ntok / dt, 2), wall_s=round(dt, 2), load_s=round(load_s, 1),
                   routing=os.environ.get("VLLM_MOE_ROUTING_SIMULATION_STRATEGY", "model"))
        if after:
            hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
            moved = after["bytes_h2d"] - before["bytes_h2d"]
            row.update(hit_rate=round(hits / max(1, hits + misses), 3),
                       pcie_gb_per_tok=round(moved / 1e9 / ntok, 4),
                       layer_steps=after["layer_steps"] - before["layer_steps"])
        rows.append(row)
        print("RESULT", json.dumps(row), flush=True)
    result = dict(card=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"),
                  bw_h2d_gbs=round(bw / 1e9, 1), rows=rows)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{result['card']}  bw_h2d {result['bw_h2d_gbs']} GB/s")
    for r in rows:
        print(f"{r['system']:>11} {r['scenario']:>5} {r['tok_s']:>9.1f} tok/s  "
              f"hit {r.get('hit_rate', '-')}  PCIe GB/tok {r.get('pcie_gb_per_tok', '-')}")


def _stats(llm, system: str) -> dict | None:
    return llm.collective_rpc("expert_offload_stats")[0] if system.startswith("offload") else None


if __name__ == "__main__":
    main()
