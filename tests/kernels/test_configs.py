"""Which tuned tiles a pass gets: the device's own table, the zero-copy table for passes that
read host memory, a same-architecture device's table where this one was never tuned, and the
heuristic where no table fits."""

import json

import pytest

from vllm_moe_offload.offload.kernels import grouped_gemm

HOPPER = (9, 0)


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(grouped_gemm, "_CONFIG_DIR", tmp_path)
    grouped_gemm._tuned_configs.cache_clear()
    yield tmp_path
    grouped_gemm._tuned_configs.cache_clear()


def write(folder, name, configs, capability=HOPPER):
    (folder / name).write_text(json.dumps({"device": name, "capability": list(capability),
                                           "configs": configs}))


def tile(n):
    return dict(BLOCK_M=16, BLOCK_N=n, BLOCK_K=128, num_warps=4, num_stages=3)


def test_device_table_row_at_or_above_the_pair_count(config_dir):
    write(config_dir, "GPU_A,w1.json", {"8": tile(32), "512": tile(64)})
    device = ("GPU A", HOPPER)
    assert grouped_gemm.pick_config(8, 1, device) == tile(32)
    assert grouped_gemm.pick_config(9, 1, device) == tile(64)
    assert grouped_gemm.pick_config(513, 1, device)["BLOCK_N"] == 128  # beyond: heuristic


def test_zero_copy_passes_take_the_host_table(config_dir):
    write(config_dir, "GPU_A,w1.json", {"64": tile(64)})
    write(config_dir, "GPU_A,w1,host.json", {"64": tile(16)})
    assert grouped_gemm.pick_config(8, 1, ("GPU A", HOPPER)) == tile(64)
    assert grouped_gemm.pick_config(8, 1, ("GPU A", HOPPER), host=True) == tile(16)


def test_untuned_device_takes_a_same_architecture_table(config_dir):
    write(config_dir, "GPU_A,w1.json", {"64": tile(32)})
    write(config_dir, "GPU_OLD,w1.json", {"64": tile(128)}, capability=(8, 0))
    assert grouped_gemm.pick_config(8, 1, ("GPU B", HOPPER)) == tile(32)
    heuristic = grouped_gemm.pick_config(8, 1, ("GPU C", (10, 0)))
    assert heuristic == dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    assert grouped_gemm.pick_config(8, 2, ("GPU B", HOPPER))["BLOCK_K"] == 64  # no w2 table


def test_committed_tables_name_their_architecture():
    paths = sorted(grouped_gemm._CONFIG_DIR.glob("*.json"))
    assert paths, grouped_gemm._CONFIG_DIR  # the tuned tables ship beside the kernels
    for path in paths:
        table = json.loads(path.read_text())
        assert len(table["capability"]) == 2 and table["configs"], path.name
