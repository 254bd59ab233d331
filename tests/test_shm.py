"""dlrm.shm: when the shared-memory all-reduce is used, and its sums on real mpiexec ranks."""

import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dlrm import shm
from dlrm.dist import RankInfo
from tests.test_dlrm_end_to_end import run


@pytest.mark.parametrize("info, backend, machine, reason", [
    (RankInfo(0, 1, 0, 1), "gloo", "x86_64", "one rank: nothing to sum"),
    (RankInfo(0, 2, 0, 2), "ccl", "x86_64", "the ccl backend reduces on its own"),
    (RankInfo(0, 4, 0, 2), "gloo", "x86_64", "the ranks are on more than one node"),
    (RankInfo(0, 9, 0, 9), "gloo", "x86_64", "more than 8 ranks"),
    (RankInfo(0, 2, 0, 2), "gloo", "aarch64", "aarch64 orders memory more weakly than x86-64"),
    (RankInfo(1, 2, 1, 2), "gloo", "x86_64", None),
])
def test_used_only_by_gloo_ranks_on_one_x86_node(monkeypatch, info, backend, machine, reason):
    monkeypatch.setattr(shm.platform, "machine", lambda: machine)
    assert shm.unavailable(info, backend, capacity=1000) == reason


def test_not_used_without_a_writable_shared_memory_directory(monkeypatch, tmp_path):
    monkeypatch.setattr(shm.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(shm, "SHM_DIR", tmp_path / "missing")
    assert shm.unavailable(RankInfo(0, 2, 0, 2), "gloo", 1000) == f"{tmp_path / 'missing'} is not a writable directory"


def test_not_used_when_shared_memory_is_short(monkeypatch):
    monkeypatch.setattr(shm.platform, "machine", lambda: "x86_64")
    free = shm.os.statvfs(shm.SHM_DIR)
    floats = free.f_bavail * free.f_frsize // 16 + 1  # 2 ranks x 2 halves x 4 bytes: just over the free space
    assert shm.unavailable(RankInfo(0, 2, 0, 2), "gloo", floats).startswith(f"{shm.SHM_DIR} has ")


def sums_worker(out: str) -> None:
    """On every rank: sums of tensors of several sizes over many calls (both halves, sizes up to the
    capacity), every rank's result written out to be compared bit for bit; all-to-alls; bad calls."""
    from dlrm import dist

    info = dist.launcher_env()
    dist.init(info, "gloo")
    group = shm.open_group(info.rank, info.world_size, capacity=1000, timeout_s=60)
    torch.distributed.barrier()  # rank 0 has returned from open_group too
    unlinked = not Path(group.name).exists()
    results = []
    for call, size in enumerate([1000, 7, 1000, 1, 500]):
        generator = torch.Generator().manual_seed(100 * call + info.rank)
        mine = torch.randn(size, generator=generator)
        every = [torch.randn(size, generator=torch.Generator().manual_seed(100 * call + r))
                 for r in range(info.world_size)]
        tensor = mine.clone()
        group.all_reduce_(tensor)
        torch.testing.assert_close(tensor, sum(every), rtol=0, atol=1e-5)
        results.append(tensor.tolist())
    # Summed from the send buffer (written in place, as dist.GradientBuffer's backward does) into another tensor.
    for call in range(2):
        send = group.send_buffer(6)
        send.copy_(torch.arange(6.0) * (info.rank + 1) + call)
        summed = torch.empty(6)
        group.all_reduce_(send, out=summed)
        ranks = info.world_size
        assert torch.equal(summed, torch.arange(6.0) * ranks * (ranks + 1) / 2 + call * ranks)
    with pytest.raises(ValueError, match=r"the sum of a send buffer goes to another tensor \(out=\)"):
        group.all_reduce_(group.send_buffer(6))
    group.all_reduce_(torch.zeros(6))  # (the send buffer is not for later calls: this one copies in)
    # All-to-all with uneven splits (rank r sends (r + 1) * (d + 1) elements to rank d, none to itself
    # on rank 1), twice: both halves of the slots.
    for call in range(2):
        sizes = [0 if r == d == 1 else (r + 1) * (d + 1) for r in range(info.world_size) for d in [info.rank]]
        send_sizes = [0 if info.rank == d == 1 else (info.rank + 1) * (d + 1) for d in range(info.world_size)]
        send = torch.cat([torch.full((n,), 100.0 * call + 10 * info.rank + d) for d, n in enumerate(send_sizes)])
        group.all_to_all_start(send, send_sizes)
        received = torch.empty(sum(sizes))
        group.all_to_all_finish(received, sizes)
        expected = torch.cat([torch.full((n,), 100.0 * call + 10 * r + info.rank) for r, n in enumerate(sizes)])
        assert torch.equal(received, expected)
    # The same without copies: written into the send buffer, read where it lies (both halves again).
    for call in range(2):
        send_sizes = [0 if info.rank == d == 1 else (info.rank + 1) * (d + 1) for d in range(info.world_size)]
        buffer = group.send_buffer(sum(send_sizes))
        torch.cat([torch.full((n,), 100.0 * call + 10 * info.rank + d) for d, n in enumerate(send_sizes)], out=buffer)
        group.all_to_all_start(buffer, send_sizes)
        views = group.all_to_all_views(sizes)
        assert [v.numel() for v in views] == sizes
        assert torch.equal(torch.cat(views), torch.cat([torch.full((n,), 100.0 * call + 10 * r + info.rank)
                                                        for r, n in enumerate(sizes)]))
    # All-gather of uneven sizes (rank 1 sends nothing), written into the send buffer, twice (both halves).
    for call in range(2):
        buffer = group.send_buffer(0 if info.rank == 1 else info.rank + 2)
        buffer.fill_(10.0 * call + info.rank)
        group.all_gather_start(buffer)
        views = group.all_gather_views()
        assert [v.tolist() for v in views] == [[10.0 * call + r] * (0 if r == 1 else r + 2) for r in range(info.world_size)]
    group.all_to_all_start(torch.zeros(info.world_size), [1] * info.world_size)
    with pytest.raises(ValueError, match=rf"rank {info.rank} expected \[2, 2, 2\] elements from the ranks, they sent \[1, 1, 1\]"):
        group.all_to_all_finish(torch.empty(6), [2, 2, 2])
    with pytest.raises(ValueError, match=r"split sizes \[1, 1\] do not cut 3 elements for 3 ranks"):
        group.all_to_all_start(torch.zeros(3), [1, 1])
    # Tensors of different sizes on the ranks: every rank stops with the sizes.
    sizes = str(list(range(3, 3 + info.world_size))).replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(RuntimeError, match=rf"all-reduce \d+: the ranks passed {sizes} elements"):
        group.all_reduce_(torch.zeros(3 + info.rank))
    with pytest.raises(ValueError, match="contiguous float32 tensors of up to 1000 elements"):
        group.all_reduce_(torch.zeros(1001))
    with pytest.raises(ValueError, match="contiguous float32 tensors"):
        group.all_reduce_(torch.zeros(10, dtype=torch.float64))
    group.close()
    Path(out, f"rank{info.rank}.json").write_text(json.dumps({"results": results, "unlinked": unlinked}))
    dist.finish()


def test_ranks_get_the_same_exact_sums_exchange_segments_and_leave_no_file(tmp_path):
    run(["-c", f"from tests.test_shm import sums_worker; sums_worker({str(tmp_path)!r})"], ranks=3)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert ranks[0]["results"] == ranks[1]["results"] == ranks[2]["results"]  # bit-identical replicas
    assert [len(r) for r in ranks[0]["results"]] == [1000, 7, 1000, 1, 500]
    # Unlinked once every rank had mapped it: gone while the ranks still used it.
    assert all(r["unlinked"] for r in ranks)


def absent_peer_worker(out: str) -> None:
    """Rank 0 sums; rank 1 leaves instead (exit status 0: mpiexec lets rank 0 run on): rank 0 must
    notice that rank 1's process is gone, long before its timeout, and say so."""
    from dlrm import dist

    info = dist.launcher_env()
    dist.init(info, "gloo")
    group = shm.open_group(info.rank, info.world_size, capacity=4, timeout_s=120)
    if info.rank == 0:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"rank 1 \(pid \d+\) exited while rank 0 waited for it at "
                                               r"shared-memory collective 1"):
            group.all_reduce_(torch.ones(4))
        assert time.monotonic() - start < 60
        Path(out, "rank0.ok").touch()
    dist.finish()


def test_a_rank_whose_peer_left_stops_with_its_number(tmp_path):
    run(["-c", f"from tests.test_shm import absent_peer_worker; absent_peer_worker({str(tmp_path)!r})"], ranks=2)
    assert (tmp_path / "rank0.ok").exists()


def lone_group(peer_pid: int, timeout_s: float) -> shm.SharedMemoryGroup:
    """Rank 0 of a 2-rank group in anonymous memory whose rank 1 (process ``peer_pid``) never posts."""
    buffer = mmap.mmap(-1, shm.file_bytes(2, 4))
    shm.pid_slots(buffer, 2)[1] = peer_pid
    return shm.SharedMemoryGroup(buffer, rank=0, world_size=2, capacity=4, timeout_s=timeout_s)


def test_a_rank_whose_peer_process_died_stops_at_once():
    """A killed rank posts nothing and raises nothing; its peers notice that its process is gone
    (mpiexec usually ends them first, but they must not depend on it)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # exited and reaped: its pid runs nothing now
    group = lone_group(dead.pid, timeout_s=120)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"rank 1 \(pid {dead.pid}\) exited while rank 0 waited for it at "
                                           r"shared-memory collective 1"):
        group.all_reduce_(torch.ones(4))
    assert time.monotonic() - start < 60  # the liveness check, not the 120 s timeout


def test_a_rank_whose_peer_hangs_stops_after_the_timeout():
    group = lone_group(os.getpid(), timeout_s=0.3)  # a live peer process that never posts
    with pytest.raises(RuntimeError, match=r"rank 0 waited 0.3 s for rank\(s\) \[1\] at shared-memory collective 1"):
        group.all_reduce_(torch.ones(4))


def test_a_group_takes_one_call_at_a_time():
    """An all-to-all's half is read by the other ranks until they finish it: nothing else may start
    on the group before this rank has finished it too."""
    group = lone_group(os.getpid(), timeout_s=0.3)
    with pytest.raises(RuntimeError, match="all_to_all_finish without all_to_all_start"):
        group.all_to_all_finish(torch.empty(2), [1, 1])
    group.all_to_all_start(torch.ones(2), [1, 1])  # posts and returns
    for call in (lambda: group.all_reduce_(torch.ones(2)), lambda: group.all_to_all_start(torch.ones(2), [1, 1])):
        with pytest.raises(RuntimeError, match="one call at a time: all_to_all_start was not finished"):
            call()


def test_an_all_reduce_in_two_halves_sums_what_was_offered_and_blocks_other_calls_meanwhile():
    buffer = mmap.mmap(-1, shm.file_bytes(1, 4))
    shm.pid_slots(buffer, 1)[0] = os.getpid()
    group = shm.SharedMemoryGroup(buffer, rank=0, world_size=1, capacity=4, timeout_s=1)
    with pytest.raises(RuntimeError, match="all_reduce_finish without all_reduce_start"):
        group.all_reduce_finish(torch.empty(3))
    offered = torch.tensor([1.0, 2.0, 3.0])
    group.all_reduce_start(offered)
    offered.fill_(9.0)  # (copied when offered: free to change meanwhile)
    for call in (lambda: group.all_reduce_(torch.ones(3)), lambda: group.all_to_all_start(torch.ones(2), [2]),
                 lambda: group.send_buffer(2), lambda: group.all_to_all_finish(torch.empty(2), [2])):
        with pytest.raises(RuntimeError, match="all_reduce_start was not finished|all_to_all_finish without"):
            call()
    summed = torch.empty(3)
    group.all_reduce_finish(summed)
    assert summed.tolist() == [1.0, 2.0, 3.0]
    group.all_reduce_(offered)  # and the group takes calls again
    assert offered.tolist() == [9.0, 9.0, 9.0]


def test_a_send_buffer_is_posted_where_it_was_written_and_only_by_its_call():
    """Written into send_buffer, a tensor is posted from there (the rank reads its own segment at the
    very memory it wrote; a copy of the slot onto itself would show nothing, so the bookkeeping is
    checked instead: a buffer is taken only by the call it was handed out for). Any call in between,
    or a buffer two calls old (the same half again), is refused, and the refused call leaves the
    group's call count where it was."""
    buffer = mmap.mmap(-1, shm.file_bytes(1, 4))
    shm.pid_slots(buffer, 1)[0] = os.getpid()
    group = shm.SharedMemoryGroup(buffer, rank=0, world_size=1, capacity=4, timeout_s=1)
    for value in (1.0, 2.0, 3.0):  # through both halves
        send = group.send_buffer(3)
        send.fill_(value)
        group.all_to_all_start(send, [3])
        (view,) = group.all_to_all_views([3])
        assert view.data_ptr() == send.data_ptr() and torch.equal(view, torch.full((3,), value))
    with pytest.raises(ValueError, match="a send buffer of 5 elements is larger than the capacity 4"):
        group.send_buffer(5)
    for calls_between in (1, 2):
        stale = group.send_buffer(2)
        for _ in range(calls_between):
            group.all_to_all_start(torch.ones(2), [2])
            group.all_to_all_views([2])
        calls = group._calls
        with pytest.raises(RuntimeError, match="another call came in between"):
            group.all_to_all_start(stale, [2])
        assert group._calls == calls and group._started is None
    group.all_to_all_start(torch.ones(2), [2])
    with pytest.raises(RuntimeError, match="one call at a time: all_to_all_start was not finished"):
        group.send_buffer(2)
