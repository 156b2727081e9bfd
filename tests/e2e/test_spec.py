"""EAGLE-3 speculative decoding with expert offload: lossless under greedy decoding.

The draft is make-model's `copy` draft (it proposes the token just sampled), which a random
target accepts now and then, so verification accepts multi-token runs and rolls back the rest.
"""

import pytest

from tests.e2e.conftest import CACHE_SLOTS, PROMPTS, assert_greedy_close, generate
from vllm_moe_offload.draft import write_draft

pytestmark = pytest.mark.e2e
OFFLOAD = {"expert_offload": {"enabled": True, "cache_slots": CACHE_SLOTS}}
NUM_SPECULATIVE_TOKENS = 3


def test_eagle3_with_offload_equals_offload_alone(models, tmp_path):
    draft = write_draft(tmp_path / "draft", models["tiny"], kind="copy",
                        num_speculative_tokens=NUM_SPECULATIVE_TOKENS, progress=False)
    plain = generate(models["tiny"], tmp_path, OFFLOAD, llm_kwargs={"enforce_eager": True})
    speculative = generate(models["tiny"], tmp_path, OFFLOAD, llm_kwargs={
        "enforce_eager": True, "disable_log_stats": False,
        "speculative_config": {"method": "eagle3", "model": str(draft),
                               "num_speculative_tokens": NUM_SPECULATIVE_TOKENS}})
    assert len(PROMPTS) >= 8
    assert_greedy_close(plain, speculative)
    spec = speculative["spec_decode"]
    assert spec["spec_decode_num_drafts"] > 0, spec
    assert spec["spec_decode_num_draft_tokens"] == (
        NUM_SPECULATIVE_TOKENS * spec["spec_decode_num_drafts"]), spec
    assert spec["spec_decode_num_accepted_tokens"] > 0, spec
    assert len(spec["spec_decode_num_accepted_tokens_per_pos"]) == NUM_SPECULATIVE_TOKENS
    # verification ran on the offloaded target, with a cache too small for all experts
    assert speculative["stats"]["misses"] > 0 and speculative["stats"]["evictions"] > 0
