"""Host->device traffic of the offload path on a dedicated copy stream: the fill kernel of a
device step (between `fork` and `join`, also inside CUDA graphs), the staged copies of a large
step with the events that order them against the compute stream, the per-pass maps of staged
passes, and small device->host reads.

Ordering (CUDA). A fork makes the copy stream wait for all compute queued so far, so a fill
never overwrites a slot an earlier step still reads; the join makes the compute stream wait for
the fills before the pass that reads them. A staged pass's kernels wait on an event recorded
after its copies (`wait_copied`); the next pass's copies into the same staging slots wait for
that pass (`copy_after`); a staged step's first copies follow its host sync, when the compute
stream has finished everything queued before it.

Stall: for every wait the compute stream records a timing event where it reaches the wait;
the time from there to the copy's completion (if positive) is stall. Both events are complete
by the next host sync, where `collect_stall_ms` reads them without another sync.

On CPU every copy is synchronous and no event exists.
"""

from contextlib import nullcontext

import numpy as np
import torch


class Transfers:
    def __init__(self, device: torch.device | str):
        device = torch.device(device)
        self.is_cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.is_cuda else None
        self._waits: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._copies_since_mark = False

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """One expert record (pinned host -> slot), asynchronous on the copy stream."""
        if self.stream is None:
            dst.copy_(src)
            return
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
        self._copies_since_mark = True

    def copy_after(self, event: "torch.cuda.Event | None") -> None:
        """Later copies wait until the compute stream has passed `event`."""
        if self.stream is not None and event is not None:
            self.stream.wait_event(event)

    def mark_copied(self) -> "torch.cuda.Event | None":
        """An event after every copy issued so far; None when nothing was copied since the
        last mark (or on CPU)."""
        if self.stream is None or not self._copies_since_mark:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.stream)
        self._copies_since_mark = False
        return event

    def mark_computed(self) -> "torch.cuda.Event | None":
        """An event after the compute work queued so far (for `copy_after`)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def wait_copied(self, event: "torch.cuda.Event | None") -> None:
        """The compute stream waits for `event` (a `mark_copied`), timing the stall."""
        if event is None:
            return
        reached = torch.cuda.Event(enable_timing=True)
        reached.record()
        torch.cuda.current_stream().wait_event(event)
        self._waits.append((reached, event))

    def collect_stall_ms(self) -> float:
        """Stall of the waits recorded so far. Call only after a host sync on the compute
        stream that followed them (the layer's routing sync): their events are complete."""
        stall = sum(max(0.0, reached.elapsed_time(done)) for reached, done in self._waits)
        self._waits.clear()
        return stall

    def fork(self) -> None:
        """The copy stream waits for the compute stream's work so far; what runs on it next
        (`torch.cuda.stream(transfers.stream)`) overlaps the compute that follows, until
        `join`. Both are recorded into a CUDA graph being captured, as a fork and a join."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream())

    def on_copy_stream(self):
        """A context in which work is queued on the copy stream (CPU: no-op)."""
        return torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()

    def join(self) -> None:
        """The compute stream waits for everything queued on the copy stream so far."""
        if self.stream is not None:
            torch.cuda.current_stream().wait_stream(self.stream)

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def synchronize_compute(self) -> None:
        if self.stream is not None:
            torch.cuda.current_stream().synchronize()


class HostCopy:
    """A small device tensor brought to the host without waiting for the whole stream: the
    copy and an event are queued now, `wait` blocks only until they are done."""

    def __init__(self, numel: int, device: torch.device | str):
        self.is_cuda = torch.device(device).type == "cuda"
        self.host = torch.empty(numel, dtype=torch.int32, device="cpu", pin_memory=self.is_cuda)
        self.done = torch.cuda.Event() if self.is_cuda else None

    def start(self, src: torch.Tensor) -> None:
        self.host.copy_(src, non_blocking=self.is_cuda)
        if self.done is not None:
            self.done.record()

    def wait(self) -> np.ndarray:
        if self.done is not None:
            self.done.synchronize()
        return self.host.numpy()


class SlotMaps:
    """Per-pass expert->slot maps ([E] int32, -1: not in the pass) for the kernels, staged
    through pinned rows. Row i serves a step's i-th pass and is rewritten only in a later
    layer step, after that step's host sync, when its previous upload has completed."""

    def __init__(self, num_experts: int, max_passes: int, device: torch.device | str):
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        self._host = torch.full((max_passes, num_experts), -1, dtype=torch.int32,
                                device="cpu", pin_memory=pin)
        self._host_np = self._host.numpy()
        self._dev = self._host.to(self.device)
        self._next = 0

    def new_step(self) -> None:
        self._next = 0

    def upload(self, experts: list[int], slots: list[int]) -> torch.Tensor:
        row = self._next
        self._next += 1
        host = self._host_np[row]
        host.fill(-1)
        host[np.asarray(experts, dtype=np.int64)] = slots
        dev = self._dev[row]
        dev.copy_(self._host[row], non_blocking=True)
        return dev
