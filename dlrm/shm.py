"""Shared-memory collectives for ranks on one node: gloo's all-reduce and all-to-all without its sockets.

Gloo moves every byte through TCP on the loopback interface, and on CPU ranks of one core each its
threads take that core from the computation. On the 2-core development machine a gloo all-reduce
of the small profile's dense gradients (3.4 MB) took 3.3 ms (~2 ms of CPU), 1.4 MB 2.2 ms; through
shared memory they take 0.8 and 0.3 ms. Each rank copies its tensor into its slot of a shared file
and raises its sequence number; once every rank's number has reached the call's, an all-reduce sums
the slots, an all-to-all copies out this rank's segment of every slot (each sender also stores its
split sizes, so the splits may be uneven, as gloo's all_to_all_single allows).

Every rank sums the slots in rank order, so all get bit-identical results (the replicas of the
MLPs must stay equal). Slots alternate between two halves from one call to the next: a rank
writing call s's half has seen every rank's number reach s - 1, posted after that rank finished
reading call s - 2's (the same half) - provided each rank finishes a call before it starts the
next on the same group (an all-to-all started and finished around other work counts as one call:
use one group per stream of calls). The copies in and out can be skipped: a rank may write its data
straight into its slot (``send_buffer``) and read the others' where they lie (``all_to_all_views``),
which holds those views valid until it starts its next call on the group (the others cannot write
that half again before). The data are stored before the number and read after it;
x86's memory model keeps both orders without fences, so this is used on x86-64 only.

``open_group`` is collective. The file lives in /dev/shm only while the ranks map it: rank 0
unlinks it as soon as all have, so a crash leaves nothing behind.
"""

from __future__ import annotations

import mmap
import os
import platform
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as torch_dist

from dlrm.dist import RankInfo

SHM_DIR = Path("/dev/shm")
MAX_RANKS = 8
# Before the slots: one int64 sequence number per rank, each rank's pid, then each half's split sizes
# (rank x rank int64s).
PIDS = 8 * MAX_RANKS
SPLITS = PIDS + 8 * MAX_RANKS
HEADER = SPLITS + 2 * MAX_RANKS * MAX_RANKS * 8
LIVENESS_CHECK_S = 0.1  # how often a waiting rank checks that the ranks it waits for still run


def file_bytes(world_size: int, capacity: int) -> int:
    """The shared file's size for tensors of up to ``capacity`` floats."""
    return HEADER + 2 * world_size * capacity * 4


def unavailable(info: RankInfo, backend: str, capacity: int) -> str | None:
    """Why this job cannot use shared-memory collectives for tensors of up to ``capacity`` floats
    in all (None: it can)."""
    if info.world_size == 1:
        return "one rank: nothing to sum"
    if backend != "gloo":
        return f"the {backend} backend reduces on its own"
    if info.local_size != info.world_size:
        return "the ranks are on more than one node"
    if info.world_size > MAX_RANKS:
        return f"more than {MAX_RANKS} ranks"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"{platform.machine()} orders memory more weakly than x86-64"
    if not (SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)):
        return f"{SHM_DIR} is not a writable directory"
    stat = os.statvfs(SHM_DIR)
    free, needed = stat.f_bavail * stat.f_frsize, file_bytes(info.world_size, capacity)
    if free < 2 * needed:  # (a container's /dev/shm is 64 MB by default)
        return f"{SHM_DIR} has {free / 1e6:.0f} MB free, less than twice the {needed / 1e6:.0f} MB needed"
    return None


class SharedMemoryGroup:
    """All-reduce (a sum) and all-to-all of float32 tensors of up to ``capacity`` elements per rank
    over the ranks of the default process group."""

    def __init__(self, buffer: mmap.mmap, rank: int, world_size: int, capacity: int, timeout_s: float,
                 name: str = "anonymous"):
        self._buffer, self.name = buffer, name
        self.rank, self.world_size, self.capacity, self.timeout_s = rank, world_size, capacity, timeout_s
        # The sequence numbers through a memoryview: the wait loop reads them with no torch op per spin.
        self._sequence = memoryview(buffer)[:8 * world_size].cast("q")
        self._pids = pid_slots(buffer, world_size)
        self._splits = torch.frombuffer(buffer, dtype=torch.int64, count=2 * MAX_RANKS * MAX_RANKS,
                                        offset=SPLITS).view(2, MAX_RANKS, MAX_RANKS)[:, :world_size, :world_size]
        self._slots = torch.frombuffer(buffer, dtype=torch.float32, count=2 * world_size * capacity,
                                       offset=HEADER).view(2, world_size, capacity)
        self._calls = 0
        self._started: str | None = None  # the call begun by its _start and not finished yet ("all_reduce", ...)
        self._lent: int | None = None  # the call send_buffer's slot was handed out for

    def all_reduce_(self, tensor: torch.Tensor, out: torch.Tensor | None = None) -> None:
        """``tensor`` (float32, contiguous) replaced by its sum over the ranks, or the sum written to ``out``
        (as large; required when ``tensor`` is this rank's ``send_buffer``, which the other ranks read).
        Every rank must call this with a tensor of the same size, in the same order of calls (a different
        size is an error)."""
        if out is None and self._lent == self._calls + 1 and self._in_own_slots(tensor):
            raise ValueError("the sum of a send buffer goes to another tensor (out=): the other ranks read the slot")
        self.all_reduce_start(tensor)
        self.all_reduce_finish(tensor if out is None else out)

    def all_reduce_start(self, tensor: torch.Tensor) -> None:
        """``all_reduce_`` in two halves: offer ``tensor`` and return at once (it may be changed then: it
        was copied, or is the send buffer the others read); ``all_reduce_finish`` waits for the other
        ranks and writes the sum. Work between the two absorbs the other ranks' lateness."""
        self._post(tensor, [tensor.numel()] * self.world_size)
        self._started = "all_reduce"

    def all_reduce_finish(self, out: torch.Tensor) -> None:
        """The sum of the call ``all_reduce_start`` began, written to ``out`` (as large as what was offered)."""
        self._finish("all_reduce")
        n = out.numel()
        half = self._calls % 2
        sizes = self._splits[half, :, 0].tolist()
        if sizes != [n] * self.world_size:
            raise RuntimeError(f"shared-memory all-reduce {self._calls}: the ranks passed {sizes} elements, "
                               f"{n} expected")
        slots = self._slots[half, :, :n]
        flat = out.view(-1)
        if self.world_size == 1:
            flat.copy_(slots[0])
        else:
            torch.add(slots[0], slots[1], out=flat)
        for other in range(2, self.world_size):
            flat.add_(slots[other])

    def all_to_all_start(self, send: torch.Tensor, send_sizes: list[int]) -> None:
        """Offer ``send`` (float32, contiguous): its first send_sizes[0] elements for rank 0, the next
        send_sizes[1] for rank 1, ... Returns at once; ``all_to_all_finish`` receives."""
        if len(send_sizes) != self.world_size or sum(send_sizes) != send.numel():
            raise ValueError(f"split sizes {send_sizes} do not cut {send.numel()} elements for {self.world_size} ranks")
        self._post(send, send_sizes)
        self._started = "all_to_all"

    def all_to_all_finish(self, received: torch.Tensor, receive_sizes: list[int]) -> None:
        """Fill ``received`` (contiguous) with every rank's segment for this rank, in rank order, of the
        call ``all_to_all_start`` began; receive_sizes[j]: the elements rank j sends here."""
        torch.cat(self.all_to_all_views(receive_sizes), out=received.view(-1))

    def all_to_all_views(self, receive_sizes: list[int]) -> list[torch.Tensor]:
        """``all_to_all_finish`` without the copy: each rank's segment for this rank (receive_sizes[j]
        elements from rank j) where it lies in the shared file, valid until this rank's next call."""
        self._finish("all_to_all")
        half = self._calls % 2
        splits = self._splits[half].tolist()
        expected = [row[self.rank] for row in splits]
        if expected != list(receive_sizes):
            raise ValueError(f"rank {self.rank} expected {list(receive_sizes)} elements from the ranks, they sent {expected}")
        return [self._slots[half, sender, sum(row[:self.rank]):sum(row[:self.rank + 1])]
                for sender, row in enumerate(splits)]

    def all_gather_start(self, tensor: torch.Tensor) -> None:
        """Offer ``tensor`` (float32, contiguous; the ranks' sizes may differ) to every rank and return at
        once; ``all_gather_views`` waits for the others'."""
        self._post(tensor, [tensor.numel()] * self.world_size)
        self._started = "all_gather"

    def all_gather_views(self) -> list[torch.Tensor]:
        """Every rank's tensor of the call ``all_gather_start`` began, in rank order, where each lies in
        the shared file (this rank's too), valid until this rank's next call."""
        self._finish("all_gather")
        half = self._calls % 2
        return [self._slots[half, sender, :n] for sender, n in enumerate(self._splits[half, :, 0].tolist())]

    def send_buffer(self, n: int) -> torch.Tensor:
        """This rank's slot for its next call (its first ``n`` elements): written there, a tensor is
        posted by that call without being copied. Only between calls, and for the very next one."""
        self._refuse_while_started()  # its half could still be read by the other ranks
        if n > self.capacity:
            raise ValueError(f"a send buffer of {n} elements is larger than the capacity {self.capacity}")
        self._lent = self._calls + 1
        return self._slots[self._lent % 2, self.rank, :n]

    def _post(self, tensor: torch.Tensor, splits: list[int]) -> torch.Tensor:
        """Copy ``tensor`` and ``splits`` (an all-to-all's split sizes, or an all-reduce's size) into this
        rank's slot and row of the next call's half, then raise the sequence number; returns that half's slots."""
        self._refuse_while_started()  # its half could be overwritten before the other ranks have read it
        n = tensor.numel()
        if tensor.dtype != torch.float32 or not tensor.is_contiguous() or n > self.capacity:
            raise ValueError(f"shared-memory collectives take contiguous float32 tensors of up to "
                             f"{self.capacity} elements, got {tensor.dtype} {tuple(tensor.shape)}")
        call = self._calls + 1
        half = call % 2
        slot = self._slots[half, self.rank]
        in_place = tensor.data_ptr() == slot.data_ptr() and self._lent == call  # written there (send_buffer)
        if not in_place and self._in_own_slots(tensor):
            raise RuntimeError("a send buffer is for the call right after send_buffer: another call came in between")
        self._calls, self._lent = call, None
        if not in_place:
            slot[:n].copy_(tensor.view(-1))
        self._splits[half, self.rank] = torch.tensor(splits)
        self._sequence[self.rank] = self._calls  # after the data (x86: stores stay in order)
        return self._slots[half]

    def _refuse_while_started(self) -> None:
        if self._started:
            raise RuntimeError(f"a shared-memory group takes one call at a time: {self._started}_start was not finished")

    def _finish(self, call: str) -> None:
        """Wait for every rank's part of the ``call`` this rank started."""
        if self._started != call:
            raise RuntimeError(f"{call}_finish without {call}_start")
        self._started = None
        self._wait_for_all()

    def _in_own_slots(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` starts inside this rank's slot of either half."""
        starts = [self._slots[half, self.rank].data_ptr() for half in (0, 1)]
        return any(start <= tensor.data_ptr() < start + 4 * self.capacity for start in starts)

    def _wait_for_all(self) -> None:
        """Until every rank has posted this call. A rank that died (killed, crashed) would never post:
        its pid is checked every LIVENESS_CHECK_S, so the job stops at once (mpiexec then ends the rest),
        as gloo's broken connections stop it; a rank alive but stuck, after timeout_s."""
        deadline = check = None
        while min(self._sequence) < self._calls:
            # Yield: on a one-core rank gloo's threads (a collective in flight) need the core meanwhile.
            os.sched_yield()
            now = time.monotonic()
            deadline, check = deadline or now + self.timeout_s, check or now + LIVENESS_CHECK_S
            if now <= check and now <= deadline:
                continue
            late = [r for r in range(self.world_size) if self._sequence[r] < self._calls]
            if now > check:
                check = now + LIVENESS_CHECK_S
                for r in late:
                    if not _running(self._pids[r]):
                        raise RuntimeError(f"rank {r} (pid {self._pids[r]}) exited while rank {self.rank} waited "
                                           f"for it at shared-memory collective {self._calls}")
            if now > deadline:
                raise RuntimeError(f"rank {self.rank} waited {self.timeout_s:g} s for rank(s) {late} at "
                                   f"shared-memory collective {self._calls}: they stopped or hung")

    def close(self) -> None:
        self._sequence.release()
        self._pids.release()
        del self._splits, self._slots  # the views must go before the mapping can close
        self._buffer.close()


def pid_slots(buffer: mmap.mmap, world_size: int) -> memoryview:
    """The header's pids, one int64 per rank (each rank writes its own when it maps the file)."""
    return memoryview(buffer)[PIDS:PIDS + 8 * world_size].cast("q")


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (dead, not yet reaped by its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def open_group(rank: int, world_size: int, capacity: int, timeout_s: float = 1800.0) -> SharedMemoryGroup:
    """Map one shared file on every rank (collective over the default process group)."""
    size = file_bytes(world_size, capacity)
    name: list[str | None] = [None]
    created = None
    try:
        if rank == 0:
            created = SHM_DIR / f"dlrm-shm-{uuid.uuid4().hex}"
            fd = os.open(created, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                # Zero-filled (every sequence number starts at 0), and allocated now: a full /dev/shm fails
                # here with an error, not later with SIGBUS on a write to the mapping.
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
            name = [str(created)]
        torch_dist.broadcast_object_list(name, src=0)
        fd = os.open(name[0], os.O_RDWR)
        try:
            buffer = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        pid_slots(buffer, world_size)[rank] = os.getpid()
        torch_dist.barrier()  # every rank has mapped it, and written its pid
    finally:
        if created is not None:  # also when anything above failed
            created.unlink(missing_ok=True)
    return SharedMemoryGroup(buffer, rank, world_size, capacity, timeout_s, name[0])
