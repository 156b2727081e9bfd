"""The host eviction policies the cache simulator compares the device rule with, on scripted
uses: exact victims. (The device rule itself: tests/kernels/test_directory.py.)"""

from vllm_moe_offload.offload.policies import LFUPolicy, LRUPolicy


def test_lru_evicts_the_least_recently_used():
    policy = LRUPolicy(8)
    for e in (1, 2, 3):
        policy.insert(e)
    policy.touch(1)
    assert policy.victim(protected=set()) == 2
    assert policy.victim(protected={2}) == 3


def test_lfu_keeps_the_frequent_expert():
    policy = LFUPolicy(8, decay=1.0)
    for e in (1, 2, 3):
        policy.insert(e)
    for experts in ([1], [1], [2], [1, 3]):
        policy.observe(experts)
    assert policy.victim(protected=set()) == 2  # 1 used 3x, 3 used once but later, 2 once
    assert policy.victim(protected={2}) == 3
