"""`make-model --draft`: EAGLE-3 drafts in the `speculators` format for a make-model target.

vLLM loads a directory as a speculators draft when its `config.json` has `speculators_config`
and `speculators_model_type: "eagle3"` (vllm/transformers_utils/configs/speculators/): the
`transformer_layer_config` (a one-layer Llama) becomes the draft's HF config and the EAGLE-3
fields beside it are copied over. The files are written by hand, the way
`speculators.models.Eagle3DraftModel.save_pretrained` writes them, so the `speculators`
package (which pins its own torch) is not needed.

Three kinds of draft:
- `random`: random weights, the shape of a real draft for the target. Almost never accepted.
- `copy`: proposes the token just sampled, again and again. `fc` picks the aux state of the
  target's last layer, the decoder layer adds nothing (`o_proj` and `down_proj` are zero),
  and `norm`/`lm_head` are the target's, so the draft's logits are the target's logits at
  the current position. Random targets repeat tokens a lot under greedy decoding, so these
  proposals are accepted often enough to exercise multi-token acceptance and KV rollback.
- `oracle`: for a `make-model --predictable` target, proposes its greedy continuation except
  on a chosen share `miss_rate` of the tokens, to sweep acceptance length (predictable.py).

Example:
    write_checkpoint(Path("/tmp/tiny"), "tiny")
    write_draft(Path("/tmp/tiny-draft"), Path("/tmp/tiny"), kind="copy")
    write_checkpoint(Path("/tmp/walk"), "tiny", predictable=True)
    write_draft(Path("/tmp/walk-draft"), Path("/tmp/walk"), kind="oracle", miss_rate=0.2)
"""

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from vllm_moe_offload.synthetic.predictable import (
    check_target,
    cycle_for,
    missed_positions,
    oracle_tensor,
)

DRAFT_KINDS = ("random", "copy", "oracle")
# The speculators EAGLE-3 releases for Qwen3 (e.g. RedHatAI/Qwen3-*-speculator.eagle3) draft
# from the 32k most frequent target tokens and map them back with `d2t`.
MAX_DRAFT_VOCAB = 32000
SPECULATORS_VERSION = "0.9.0"  # the release whose save_pretrained layout this reproduces


def aux_layer_ids(num_layers: int, kind: str) -> list[int]:
    """Target "layers" whose outputs feed the draft; id 0 is the embeddings, id i the output
    of decoder layer i-1. vLLM's default is (2, L//2, L-3); the copy and oracle drafts need the
    last layer's output, id L. Written explicitly: vLLM's default breaks on very short targets."""
    low, mid = 2, num_layers // 2
    high = num_layers if kind in ("copy", "oracle") else num_layers - 3
    ids = sorted({low, mid, high})
    if len(ids) != 3 or ids[0] < 0 or ids[-1] > num_layers:
        raise ValueError(f"no three distinct aux layers in a {num_layers}-layer target")
    return ids


def draft_config(target: dict, target_dir: Path, kind: str, num_speculative_tokens: int) -> dict:
    """The speculators-format config.json for a draft of `target` (its HF config)."""
    h = target["hidden_size"]
    layer = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": target["vocab_size"],
        "hidden_size": h,
        # the target's dense FFN width, as the speculators Qwen3 drafts use
        "intermediate_size": target["intermediate_size"],
        "num_hidden_layers": 1,
        "num_attention_heads": target["num_attention_heads"],
        "num_key_value_heads": target["num_key_value_heads"],
        "head_dim": target["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": target["max_position_embeddings"],
        "rms_norm_eps": target["rms_norm_eps"],
        "rope_parameters": {"rope_theta": target["rope_theta"], "rope_type": "default"},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": target.get("bos_token_id"),
        "eos_token_id": target["eos_token_id"],
        "pad_token_id": target.get("pad_token_id"),
    }
    return {
        "architectures": ["Eagle3DraftModel"],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "draft_vocab_size": min(target["vocab_size"], MAX_DRAFT_VOCAB),
        "target_hidden_size": h,
        "eagle_aux_hidden_state_layer_ids": aux_layer_ids(target["num_hidden_layers"], kind),
        # vLLM defaults a missing norm_before_residual to True, speculators to False: always
        # write it. False keeps fc's output unnormalised in the residual, which `copy` needs.
        "norm_before_residual": False,
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "embed_requires_grad": False,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "transformer_layer_config": layer,
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "accept_tolerance": 0.0,
                                  "speculative_tokens": num_speculative_tokens,
                                  "verifier_accept_k": 1}],
            "verifier": {"name_or_path": str(target_dir.resolve()),
                         "architectures": target["architectures"]},
        },
    }


def tensor_plan(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the draft's tensors, speculators names. No `embed_tokens`: vLLM then
    shares the target's, as the speculators releases do."""
    layer = config["transformer_layer_config"]
    h, hd, di = layer["hidden_size"], layer["head_dim"], layer["intermediate_size"]
    q, kv = layer["num_attention_heads"] * hd, layer["num_key_value_heads"] * hd
    num_aux = len(config["eagle_aux_hidden_state_layer_ids"])
    p = "layers.0"
    return [
        ("fc.weight", (h, num_aux * config["target_hidden_size"])),
        (f"{p}.hidden_norm.weight", (h,)),
        (f"{p}.input_layernorm.weight", (h,)),
        (f"{p}.post_attention_layernorm.weight", (h,)),
        # the first (only) layer attends over concat(embeddings, hidden): 2H inputs
        (f"{p}.self_attn.q_proj.weight", (q, 2 * h)),
        (f"{p}.self_attn.k_proj.weight", (kv, 2 * h)),
        (f"{p}.self_attn.v_proj.weight", (kv, 2 * h)),
        (f"{p}.self_attn.o_proj.weight", (h, q)),
        (f"{p}.mlp.gate_proj.weight", (di, h)),
        (f"{p}.mlp.up_proj.weight", (di, h)),
        (f"{p}.mlp.down_proj.weight", (h, di)),
        ("norm.weight", (h,)),
        ("lm_head.weight", (config["draft_vocab_size"], h)),
    ]


def _random_tensor(shape, gen: torch.Generator, device) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm weights
        return 1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)
    return torch.randn(shape, generator=gen, device=device) / math.sqrt(shape[1])


def _copy_tensor(name: str, shape, target: "_TargetTensors", device) -> torch.Tensor:
    if name == "fc.weight":  # [0 | 0 | I]: the last aux chunk is the target's last layer
        h = shape[0]
        return torch.cat([torch.zeros(h, shape[1] - h, device=device),
                          torch.eye(h, device=device)], dim=1)
    if name == "norm.weight":
        return target.get("model.norm.weight")
    if name == "lm_head.weight":
        return target.get("lm_head.weight")[: shape[0]]  # the draft vocab is its first ids
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return torch.zeros(shape, device=device)
    return None


class _TargetTensors:
    """Reads single tensors of a (sharded) target checkpoint."""

    def __init__(self, target_dir: Path):
        self.dir = target_dir
        index = target_dir / "model.safetensors.index.json"
        self.weight_map = (json.loads(index.read_text())["weight_map"] if index.exists()
                           else None)

    def get(self, name: str) -> torch.Tensor:
        shard = self.weight_map[name] if self.weight_map else "model.safetensors"
        with safe_open(self.dir / shard, "pt") as f:
            return f.get_tensor(name)


def write_draft(out: Path, target_dir: Path, kind: str = "random",
                num_speculative_tokens: int = 3, seed: int = 0, device: str | None = None,
                progress: bool = True, miss_rate: float = 0.0) -> Path:
    """Writes an EAGLE-3 draft for the make-model checkpoint in `target_dir` (only its
    config.json for `random`; also its `norm` and `lm_head` for `copy`; its `lm_head`, to check
    that it is predictable, for `oracle`, which misses `miss_rate` of the tokens, the missed
    cycle positions drawn with `seed`); returns `out`."""
    if kind not in DRAFT_KINDS:
        raise ValueError(f"unknown draft kind {kind!r}; choose one of {list(DRAFT_KINDS)}")
    if miss_rate and kind != "oracle":
        raise ValueError(f"a miss rate is for the oracle draft, not {kind!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    target = json.loads((target_dir / "config.json").read_text())
    config = draft_config(target, target_dir, kind, num_speculative_tokens)
    source = _TargetTensors(target_dir) if kind != "random" else None
    if kind == "oracle":
        cycle = cycle_for(target)
        check_target(cycle, source.get("lm_head.weight"))
        missed = missed_positions(len(cycle.ids), miss_rate, seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))

    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    plan = tensor_plan(config)
    for name, shape in tqdm(plan, desc=f"make-model --draft {kind}", unit="tensor",
                            disable=not progress):
        if kind == "copy":
            t = _copy_tensor(name, shape, source, device)
        elif kind == "oracle":
            t = oracle_tensor(name, shape, cycle, missed)
        else:
            t = None
        if t is None:
            t = _random_tensor(shape, gen, device)
        assert tuple(t.shape) == shape, (name, tuple(t.shape), shape)
        tensors[name] = t.to(torch.bfloat16).cpu().contiguous()
    tensors.update(_vocab_maps(config["draft_vocab_size"], target["vocab_size"]))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _vocab_maps(draft_vocab: int, vocab: int) -> dict[str, torch.Tensor]:
    """`d2t` (target id = draft id + d2t[draft id]) and `t2d` (is the target id drafted), for
    a draft vocabulary of the first `draft_vocab` ids; none when it is the whole vocabulary."""
    if draft_vocab == vocab:
        return {}
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[:draft_vocab] = True
    return {"d2t": torch.zeros(draft_vocab, dtype=torch.int64), "t2d": t2d}
