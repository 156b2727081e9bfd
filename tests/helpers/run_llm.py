"""Runs one vLLM engine in its own process (vLLM state does not reset between engines in one
process): greedy generation of the prompts in a JSON file, written back as JSON.

usage: python -m tests.helpers.run_llm MODEL IN.json OUT.json [ADDITIONAL_CONFIG_JSON]
IN.json: {"prompts": [...] (texts, or lists of token ids), "max_tokens": N, "logprobs": K,
          "llm_kwargs": {...}}
OUT.json: {"token_ids": [[...]], "prompt_token_ids": [[...]], "logprobs": [[{id: lp}]],
           "stats": {...} | null, "routing_log": [...] | null (with MOE_OFFLOAD_ROUTING_LOG),
           "spec_decode": {counter: value} | null (vLLM's cumulative spec-decode counters)}
"""

import json
import sys

from vllm import LLM, SamplingParams


def spec_decode_counters(llm) -> dict:
    """vllm:spec_decode_* counters (needs disable_log_stats=False); per-position ones as lists."""
    return {m.name.removeprefix("vllm:"): getattr(m, "value", None) or getattr(m, "values", None)
            for m in llm.get_metrics() if m.name.startswith("vllm:spec_decode")}


def main() -> None:
    model, inp, out = sys.argv[1:4]
    additional = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    spec = json.load(open(inp))
    kwargs = dict(dtype="bfloat16", max_model_len=512, gpu_memory_utilization=0.3, seed=0)
    llm = LLM(model=model, additional_config=additional, **kwargs | spec.get("llm_kwargs", {}))
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"],
                            logprobs=spec["logprobs"], ignore_eos=True)
    prompts = [{"prompt_token_ids": p} if isinstance(p, list) else p for p in spec["prompts"]]
    outputs = llm.generate(prompts, params)
    result = {
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "prompt_token_ids": [list(o.prompt_token_ids) for o in outputs],
        "logprobs": [[{str(t): lp.logprob for t, lp in step.items()}
                      for step in o.outputs[0].logprobs] for o in outputs],
        "stats": llm.collective_rpc("expert_offload_stats")[0] if additional else None,
        "routing_log": llm.collective_rpc("expert_offload_routing_log")[0] if additional
        else None,
        "spec_decode": spec_decode_counters(llm) if "speculative_config" in spec.get(
            "llm_kwargs", {}) else None,
    }
    json.dump(result, open(out, "w"))


if __name__ == "__main__":
    main()
