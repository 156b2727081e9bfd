"""Shared pieces of the end-to-end tests: tiny checkpoints, one engine per process, and the
greedy-equality rule."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_moe_offload.synthetic.checkpoint import write_checkpoint

REPO = Path(__file__).resolve().parents[2]
HAS_CUDA = torch.cuda.is_available()
PROMPTS = [
    "Hello world, what is",
    "The",
    "Once upon a time there was a tall tree and a small house near the river, and the people "
    "who lived there",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12",
    "Why?",
    "Sten thea gou lloung rack the stoud, and more words follow here to make the prompt longer "
    "than the others by far, much longer indeed, so that prefill routes many tokens at once",
    "!",
]
# 2 MoE layers x 16 experts = 32; 12 slots hold under half, 6 per layer (top-k is 4).
CACHE_SLOTS = 12


def engine_env(**extra: str) -> dict:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=path)
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {p: write_checkpoint(root / p, p, progress=False) for p in ("tiny", "tiny-fp8")}


def run_engine(model: Path, tmp_path: Path, additional: dict | None = None,
               max_tokens: int = 32, llm_kwargs: dict | None = None, env: dict | None = None,
               helper: str = "run_llm", prompts: list | None = None
               ) -> subprocess.CompletedProcess:
    """Runs tests/helpers/<helper>.py in a fresh process; returns the finished process."""
    spec = {"prompts": prompts or PROMPTS, "max_tokens": max_tokens, "logprobs": 5,
            "llm_kwargs": llm_kwargs or {}}
    tag = f"{helper}-{len(list(tmp_path.iterdir()))}"
    inp, out = tmp_path / f"{tag}.in.json", tmp_path / f"{tag}.out.json"
    inp.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", f"tests.helpers.{helper}", str(model), str(inp), str(out)]
    if additional is not None:
        cmd.append(json.dumps(additional))
    proc = subprocess.run(cmd, cwd=REPO, env=env or engine_env(), capture_output=True,
                          text=True, timeout=900)
    proc.result_path = out
    return proc


def generate(*args, **kwargs) -> dict:
    proc = run_engine(*args, **kwargs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(proc.result_path.read_text())


def assert_greedy_close(ref: dict, test: dict, drift_nats: float = 1.0,
                        min_mean_prefix: float = 8.0) -> list[int]:
    """vLLM's check_logprobs_close convention, plus two checks that a real bug fails.

    Per prompt, tokens must be equal up to the first divergence, and there each run's token
    must be among the other run's top-5 (vLLM's rule). Before it, the chosen tokens' logprobs
    may differ by at most `drift_nats`, and the matched prefixes must average at least
    `min_mean_prefix` tokens. Returns the matched prefix length of each prompt.

    Why: a random model is chaotic. Runs that differ only in summation order part after some
    tokens, mostly at near-ties, sometimes where rounding flipped one router top-k choice,
    which moves the logits by a few nats at once (seen on an H100, CUDA graphs, bf16: a
    2-nat swap after 21 identical tokens). Over 8 prompts x 32 tokens correct runs matched
    15-28 tokens on average, drift <= 0.6. A real bug fails fast: with the top-k
    renormalisation removed, runs parted after 1-7 tokens (mean 2.1), some tokens outside
    the other run's top-5.
    """
    prefixes = []
    for i, (a, b) in enumerate(zip(ref["token_ids"], test["token_ids"], strict=True)):
        assert len(a) == len(b)
        prefix = len(a)
        for j, (x, y) in enumerate(zip(a, b, strict=True)):
            lp_ref, lp_test = ref["logprobs"][i][j], test["logprobs"][i][j]
            if x == y:
                drift = abs(lp_ref[str(x)] - lp_test[str(x)])
                assert drift <= drift_nats, f"prompt {i} token {j}: logprob drift {drift:.3f}"
                continue
            assert str(y) in lp_ref and str(x) in lp_test, f"prompt {i} token {j}: {x} vs {y}"
            prefix = j
            break
        prefixes.append(prefix)
    assert sum(prefixes) / len(prefixes) >= min_mean_prefix, f"matched prefixes {prefixes}"
    return prefixes
