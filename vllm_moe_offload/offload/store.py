"""`ExpertStore`: every routed expert of every MoE layer in host memory, one record per expert.

A record packs one expert's `w13 = [gate; up]` and `w2` weights (and, for FP8, their 128x128
block scales as fp32) at fixed, 256-byte aligned offsets, so one copy moves one expert and a
GPU slot holds exactly one record. Layouts match vLLM's FusedMoE parameters
(`w13_weight [2I, H]`, `w2_weight [H, I]`, `w13_weight_scale_inv [2*ceil(I/128), ceil(H/128)]`,
`w2_weight_scale_inv [ceil(H/128), ceil(I/128)]`), so vLLM's kernels can read slots directly.

Host memory is allocated once per layer at its exact size and, with CUDA, page-locked with
cudaHostRegister: PyTorch's pinned caching allocator rounds each block up to a power of two
(vLLM issue 56410), which would cost up to 2x the host memory.

Example:
    layout = ExpertLayout(hidden=2048, inter=768, weight_dtype=torch.float8_e4m3fn,
                          block=(128, 128))
    store = ExpertStore(layout, num_layers=48, num_experts=128)
    store.load(0, 5, "gate_proj.weight", tensor)
"""

import math
import weakref
from dataclasses import dataclass
from functools import cached_property

import torch

from vllm_moe_offload.units import format_bytes

_ALIGN = 256  # bytes; keeps every field 16-byte aligned for vectorised kernel loads
_PROJ_FIELDS = {"gate_proj": "w13", "up_proj": "w13", "down_proj": "w2"}


@dataclass(frozen=True)
class ExpertLayout:
    """Byte layout of one expert record. H hidden, I moe intermediate size."""

    hidden: int
    inter: int
    weight_dtype: torch.dtype
    block: tuple[int, int] | None = None  # FP8 weight_block_size (n, k); None: unquantized

    @property
    def is_fp8(self) -> bool:
        return self.block is not None

    @cached_property
    def fields(self) -> dict[str, tuple[tuple[int, ...], torch.dtype, int]]:
        """name -> (shape, dtype, byte offset) within a record."""
        h, i = self.hidden, self.inter
        specs = [("w13", (2 * i, h), self.weight_dtype), ("w2", (h, i), self.weight_dtype)]
        if self.block is not None:
            bn, bk = self.block
            specs += [
                ("s13", (2 * math.ceil(i / bn), math.ceil(h / bk)), torch.float32),
                ("s2", (math.ceil(h / bn), math.ceil(i / bk)), torch.float32),
            ]
        out, offset = {}, 0
        for name, shape, dtype in specs:
            out[name] = (shape, dtype, offset)
            offset = _align(offset + math.prod(shape) * dtype.itemsize)
        return out

    @cached_property
    def record_bytes(self) -> int:
        shape, dtype, offset = list(self.fields.values())[-1]
        return _align(offset + math.prod(shape) * dtype.itemsize)

    def views(self, records: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views [N, *shape] into `records`, a uint8 tensor [N, record_bytes]."""
        assert records.dtype == torch.uint8 and records.shape[-1] == self.record_bytes
        assert records.stride(-1) == 1
        out = {}
        for name, (shape, dtype, offset) in self.fields.items():
            nbytes = math.prod(shape) * dtype.itemsize
            raw = records[:, offset:offset + nbytes]  # [N, nbytes], row stride record_bytes
            out[name] = raw.view(dtype).view(records.shape[0], *shape)
        return out

    def part_target(self, part: str, views: dict[str, torch.Tensor], e: int) -> torch.Tensor:
        """Where checkpoint tensor `part` ("gate_proj.weight", ...) of expert `e` goes."""
        proj, kind = part.split(".", 1)
        if proj not in _PROJ_FIELDS or kind not in self.parts_per_proj:
            raise KeyError(part)
        field = _PROJ_FIELDS[proj]
        if kind == "weight_scale_inv":
            field = "s13" if field == "w13" else "s2"
        target = views[field][e]
        if field in ("w13", "s13"):  # [gate; up] stacked along dim 0, as vLLM's w13
            half = target.shape[0] // 2
            target = target[:half] if proj == "gate_proj" else target[half:]
        return target

    @property
    def parts_per_proj(self) -> tuple[str, ...]:
        return ("weight", "weight_scale_inv") if self.is_fp8 else ("weight",)

    @property
    def parts(self) -> list[str]:
        return [f"{p}.{k}" for p in _PROJ_FIELDS for k in self.parts_per_proj]


def shard(part: str, tensor: torch.Tensor, rank: int, tp_size: int) -> torch.Tensor:
    """Tensor parallelism: rank `rank`'s share of checkpoint tensor `part` of one expert, by
    the intermediate dimension: rows of gate/up ([I, H], scales [I/bn, H/bk]), columns of down
    ([H, I], scales [H/bn, I/bk]), as vLLM's FusedMoE shards w13 and w2."""
    if tp_size == 1:
        return tensor
    dim = 1 if part.startswith("down_proj") else 0
    size = tensor.shape[dim] // tp_size
    return tensor.narrow(dim, rank * size, size)


class ExpertStore:
    """All experts of all MoE layers in (pinned, with CUDA) host memory; with tensor
    parallelism, this rank's shard of each (`shard`)."""

    def __init__(self, layout: ExpertLayout, num_layers: int, num_experts: int,
                 pin: bool | None = None, limit_bytes: int | None = None,
                 rank: int = 0, tp_size: int = 1):
        self.layout = layout
        self.rank, self.tp_size = rank, tp_size
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.pin = torch.cuda.is_available() if pin is None else pin
        check_host_memory(self.nbytes, limit_bytes)
        self.records = [self._allocate(num_experts) for _ in range(num_layers)]  # [E, R] each
        self.views = [layout.views(r) for r in self.records]
        # Explicitly on the host: vLLM builds the model under `with torch.device("cuda")`,
        # where each of the ~37k marks was a kernel launch. Two engines loading side by side
        # on one H100 took 180 s each (one alone: 6 s), ~5 ms per mark, as if the cards'
        # time-slicing between the two contexts paced the launches.
        self.loaded = torch.zeros(num_layers, num_experts, len(layout.parts), dtype=torch.bool,
                                  device="cpu")

    @property
    def nbytes(self) -> int:
        return self.num_layers * self.num_experts * self.layout.record_bytes

    def _allocate(self, n: int) -> torch.Tensor:
        records = torch.empty(n, self.layout.record_bytes, dtype=torch.uint8, device="cpu")
        if self.pin:
            err = torch.cuda.cudart().cudaHostRegister(records.data_ptr(), records.numel(), 0)
            if int(err) != 0:
                raise RuntimeError(f"expert offload: cudaHostRegister of {records.numel()} bytes "
                                   f"failed ({err}); raise the memory lock limit (ulimit -l "
                                   "unlimited) or free host memory")
            # Unpin before the allocator can hand the pages to another tensor.
            weakref.finalize(records, torch.cuda.cudart().cudaHostUnregister,
                             records.data_ptr())
        return records

    def record(self, layer: int, expert: int) -> torch.Tensor:
        """uint8 [record_bytes]: what one fetch copies."""
        return self.records[layer][expert]

    def load(self, layer: int, expert: int, part: str, tensor: torch.Tensor) -> None:
        """Loads checkpoint tensor `part` of an expert (the whole tensor: this rank's shard of
        it is taken here)."""
        target = self.layout.part_target(part, self.views[layer], expert)
        tensor = shard(part, tensor, self.rank, self.tp_size)
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"expert offload: {part} of expert {expert} has shape "
                             f"{tuple(tensor.shape)}, expected {tuple(target.shape)}")
        target.copy_(tensor)
        self.loaded[layer, expert, self.layout.parts.index(part)] = True

    def missing(self) -> list[tuple[int, int, str]]:
        """(layer, expert, part) of every tensor not loaded yet."""
        parts = self.layout.parts
        return [(layer, e, parts[p]) for layer, e, p in (~self.loaded).nonzero().tolist()]

    def fill_random(self, seed: int = 0) -> None:
        """Random experts for load_format=dummy (speed runs): small finite weights, outputs of
        unit order. One layer is drawn and copied to the others: drawing 29 GB of random
        bytes would take minutes, copying takes seconds."""
        gen = torch.Generator().manual_seed(seed)
        first = self.views[0]
        for name, view in first.items():
            fan_in = view.shape[-1] * (self.layout.block[1] if name.startswith("s") else 1)
            if name.startswith("s"):  # FP8 scales: weights |q| < 2 scaled to ~1/sqrt(K)
                view.fill_(1.0 / math.sqrt(fan_in))
            elif self.layout.is_fp8:
                # Clearing bit 6 caps the e4m3 exponent: |q| < 2 and never NaN.
                raw = view.view(torch.uint8)
                raw.copy_(torch.randint(0, 256, raw.shape, generator=gen, dtype=torch.uint8,
                                        device="cpu"))
                raw.bitwise_and_(0xBF)
            else:
                view.uniform_(-1.0, 1.0, generator=gen).mul_(1.0 / math.sqrt(fan_in))
        for records in self.records[1:]:
            records.copy_(self.records[0])
        self.loaded.fill_(True)


def check_host_memory(required: int, limit_bytes: int | None) -> None:
    """Fails before allocating if the store cannot fit in host memory (or the user's cap)."""
    if limit_bytes is not None and required > limit_bytes:
        need, limit = _sizes_that_differ(required, limit_bytes)
        raise ValueError(
            f"expert offload: the expert store needs {need} of host memory, more than the "
            f"pinned_limit_gb (--expert-pinned-limit-gb) cap of {limit}; raise "
            "pinned_limit_gb or serve a smaller model")
    available = available_host_bytes()
    if required > available:
        need, free = _sizes_that_differ(required, available)
        raise ValueError(
            f"expert offload: the expert store needs {need} of host memory but only {free} "
            "is available; free host memory, use a machine with more RAM, or serve a smaller "
            "model")


def _sizes_that_differ(a: int, b: int) -> tuple[str, str]:
    """a and b in units that show they differ: rounded alike they may read the same."""
    shown = format_bytes(a), format_bytes(b)
    return shown if shown[0] != shown[1] else (f"{a:,} bytes", f"{b:,} bytes")


def available_host_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("expert offload: /proc/meminfo has no MemAvailable")


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN
