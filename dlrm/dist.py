"""Distributed plumbing: who am I (from the launcher), which backend, which cores, join the group.

Every rank is an independent process started by a launcher (mpiexec, torchrun, or
nothing at all). torch.distributed does not talk to MPI here: the launcher only
tells each process its rank, and the ranks meet over TCP at MASTER_ADDR:MASTER_PORT.
"""

from __future__ import annotations

import datetime
import functools
import importlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from dlrm.shm import SharedMemoryGroup

Importer = Callable[[str], object]

# (rank, world size, local rank, local size) variable names, most specific launcher first.
_LAUNCHER_VARS: tuple[tuple[str, tuple[str, str, str, str]], ...] = (
    ("mpich", ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")),  # also Intel MPI
    ("openmpi", ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                 "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")),
    ("torchrun", ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")),
)


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_size: int
    launcher: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(env: dict[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"launcher variable {name}={env[name]!r} is not an integer") from None


def launcher_env(env: dict[str, str] | None = None) -> RankInfo:
    """This process's place in the job, read from whichever launcher started it."""
    env = dict(os.environ if env is None else env)
    for launcher, (rank_var, size_var, local_rank_var, local_size_var) in _LAUNCHER_VARS:
        if rank_var not in env:
            continue
        if size_var not in env:
            raise ValueError(f"{launcher} launcher set {rank_var} but not {size_var}")
        rank, world_size = _env_int(env, rank_var), _env_int(env, size_var)
        if local_rank_var in env and local_size_var in env:
            local_rank, local_size = _env_int(env, local_rank_var), _env_int(env, local_size_var)
        else:
            # Without local information, assume all ranks share this node (the safe
            # assumption for thread pinning: it never oversubscribes).
            local_rank, local_size = rank, world_size
        info = RankInfo(rank, world_size, local_rank, local_size, launcher)
        if not (0 <= rank < world_size and 0 <= local_rank < local_size <= world_size):
            raise ValueError(f"inconsistent {launcher} launcher environment: {info}")
        return info
    return RankInfo(0, 1, 0, 1, "none")


def choose_backend(importer: Importer = importlib.import_module) -> str:
    """"ccl" when Intel's oneCCL bindings import (importing them registers the backend), else "gloo"."""
    try:
        importer("oneccl_bindings_for_pytorch")
    except Exception:  # ImportError, or a broken native library (OSError) - either way unusable
        return "gloo"
    return "ccl"


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


def ipex_status(importer: Importer = importlib.import_module) -> tuple[bool, str]:
    """Whether Intel Extension for PyTorch can be used, and why (not)."""
    try:
        ipex = importer("intel_extension_for_pytorch")
    except Exception as err:
        return False, f"not importable: {type(err).__name__}: {err}".splitlines()[0]
    ipex_version = str(getattr(ipex, "__version__", "unknown"))
    try:
        matches = _major_minor(ipex_version) == _major_minor(torch.__version__)
    except ValueError:
        matches = False
    if not matches:
        # IPEX is built against one torch minor; a mismatch fails at runtime or silently does nothing.
        return False, f"version {ipex_version} does not match torch {torch.__version__}"
    return True, f"version {ipex_version} matches torch {torch.__version__}"


def _share(cores: list[int], info: RankInfo) -> tuple[list[int], bool]:
    """This rank's equal share of the node's cores, and whether cores had to be shared."""
    per_rank = len(cores) // info.local_size
    if per_rank == 0:
        # More ranks than cores: one core each, round robin (unavoidably oversubscribed).
        return [cores[info.local_rank % len(cores)]], True
    start = info.local_rank * per_rank
    return cores[start:start + per_rank], False


def pin_threads(info: RankInfo, cores: list[int] | None = None, max_threads: int | None = None,
                ccl_worker: bool = False) -> dict:
    """Give this rank its own share of the node's cores and as many intra-op threads.

    ``cores``: the node's cores shared by all local ranks; None means this process's
    current affinity (mpiexec without binding gives every rank the whole node).
    Leftover cores (when they do not divide evenly) stay unused so ranks are equal.
    ``max_threads`` (e.g. the launcher's OMP_NUM_THREADS) caps the share.
    ``ccl_worker``: also place oneCCL's worker thread (see ccl_environment): on a core of
    the share the compute threads do not use; failing that, on the last of two or more
    compute cores, taken from the compute threads (Intel's DLRM layout); a rank with one
    core shares it with its worker (there is nothing to give it).
    """
    if cores is None:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(
            range(os.cpu_count() or 1))
    cores = sorted(cores)
    if not cores:
        raise ValueError("no cores to pin to")
    share, oversubscribed = _share(cores, info)
    mine = share if max_threads is None else share[:max(1, max_threads)]
    worker = None
    if ccl_worker:
        spare = [core for core in share if core not in mine]
        if not spare and len(mine) >= 2:
            mine, spare = mine[:-1], mine[-1:]
        worker = spare[:1] or mine[-1:]
    pinned = False
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, mine)
        pinned = True
    torch.set_num_threads(len(mine))
    record = {"cores": mine, "threads": len(mine), "pinned": pinned, "oversubscribed": oversubscribed}
    if worker is not None:
        record["ccl_worker_cores"] = worker
    return record


def ccl_environment(pinning: dict) -> dict[str, str]:
    """oneCCL's settings for a rank pinned by pin_threads(ccl_worker=True): one worker thread
    (it progresses the rank's collectives; one is plenty for one rank's traffic), on the core
    pin_threads chose. oneCCL reads them when its first communicator is created, so they
    must be in the environment before the process group is."""
    return {"CCL_WORKER_COUNT": "1", "CCL_WORKER_AFFINITY": ",".join(str(c) for c in pinning["ccl_worker_cores"])}


def init(info: RankInfo, backend: str, timeout_s: float = 1800.0) -> None:
    """Join the process group (always, even alone, so one code path serves every world size)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if info.world_size == 1 and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
        # Alone and no rendezvous address: an in-memory store needs no port.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise RuntimeError(
            f"{' and '.join(missing)} not set: with {info.world_size} ranks the launcher must pass the "
            "rendezvous address, e.g. mpiexec -genv MASTER_ADDR <host> -genv MASTER_PORT <port>")
    addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=info.rank,
                            world_size=info.world_size, timeout=timeout)


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_gather(obj: object) -> list[object]:
    """Every rank's (picklable) ``obj``, in rank order, on every rank (supported by every backend)."""
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast(obj: object, src: int = 0) -> object:
    """Rank ``src``'s (picklable) ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class GradientBuffer:
    """The gradients of ``buckets`` of parameters as views of one flat tensor, summed over the ranks
    by one all-reduce per bucket, started as soon as backward has produced the bucket's gradients.

    Data parallelism for the MLPs (and small dense-gradient tables) without DDP's per-step
    bookkeeping: no copies in or out of the buffer, and a bucket's all-reduce (gloo works on
    its own threads) overlaps the rest of backward - list the buckets in the order backward
    completes them (the top MLP's before the bottom's). backward accumulates into the views in
    place, so the buffer is zeroed (``zero``) instead of the gradients being set to None (an
    optimizer's zero_grad must not be called on these parameters). The ranks' gradients are
    summed, not averaged: each rank scales its loss to its share of the global loss.

    ``shared_memory``: sum them through it instead (dlrm.shm: ranks on one node), all buckets as one,
    offered when complete and summed by ``wait`` (what the rank does between absorbs the others'
    lateness). There the rank computes the sum itself, so a second bucket would overlap nothing, only
    add a point where the ranks wait for each other. backward accumulates straight into
    this rank's slot of the shared file (``zero`` points the gradients there), and the sum lands in
    ``flat``, where the gradients point again once it is done: no copy into the slot (3.4 MB per step
    on the small profile).
    """

    def __init__(self, buckets: list[list[torch.nn.Parameter]], shared_memory: SharedMemoryGroup | None = None):
        buckets = [bucket for bucket in buckets if bucket]
        if shared_memory is not None:
            buckets = [[param for bucket in buckets for param in bucket]]
        self.params = [param for bucket in buckets for param in bucket]
        self.flat = torch.zeros(sum(p.numel() for p in self.params))
        self._summed = self._views(self.flat)
        for param, view in zip(self.params, self._summed):
            param.grad = view
        self.slices: list[torch.Tensor] = []
        offset = 0
        for bucket in buckets:
            size = sum(p.numel() for p in bucket)
            self.slices.append(self.flat[offset:offset + size])
            offset += size
        self.sizes = [len(bucket) for bucket in buckets]
        self.parallel = dist.get_world_size() > 1
        self.shared_memory = shared_memory
        self._slot_views: dict[int, list[torch.Tensor]] = {}  # by the slot's address (two halves)
        self._slot: torch.Tensor | None = None  # where backward accumulates, when in shared memory
        self._awaited = list(self.sizes)  # gradients each bucket still waits for in this backward
        self._started = [False] * len(buckets)
        self._works: list[dist.Work] = []
        if self.parallel:
            for i, bucket in enumerate(buckets):
                for param in bucket:
                    param.register_post_accumulate_grad_hook(functools.partial(self._accumulated, i))

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's gradient as a view of ``flat``, in the parameters' order."""
        views, offset = [], 0
        for param in self.params:
            views.append(_view_like(flat[offset:offset + param.numel()], param))
            offset += param.numel()
        return views

    def _point(self, views: list[torch.Tensor]) -> None:
        for param, view in zip(self.params, views):
            param.grad = view

    def _accumulated(self, bucket: int, _param: torch.nn.Parameter) -> None:
        self._awaited[bucket] -= 1
        if self._awaited[bucket] == 0:
            self._start(bucket)

    def _start(self, bucket: int) -> None:
        self._started[bucket] = True
        if self._slot is not None:
            self.shared_memory.all_reduce_start(self._slot)  # summed by wait()
        else:
            self._works.append(dist.all_reduce(self.slices[bucket], async_op=True))  # a sum

    def zero(self) -> None:
        """Before backward: every gradient zero (in shared memory: in this rank's slot for the next call)."""
        if self.shared_memory is not None and self.parallel:
            self._slot = self.shared_memory.send_buffer(self.flat.numel())
            views = self._slot_views.get(self._slot.data_ptr())
            if views is None:
                views = self._slot_views[self._slot.data_ptr()] = self._views(self._slot)
            self._slot.zero_()
            self._point(views)
        else:
            self.flat.zero_()
        self._awaited = list(self.sizes)

    def wait(self) -> None:
        """After backward: every rank's gradients replaced by their sum over the ranks (a bucket
        backward left incomplete, e.g. a layer without a gradient this step, is sent now)."""
        if not self.parallel:
            return
        for bucket, started in enumerate(self._started):
            if not started:
                self._start(bucket)
        for work in self._works:
            work.wait()
        if self._slot is not None:
            self.shared_memory.all_reduce_finish(self.flat)
            self._slot = None
            self._point(self._summed)
        self._started = [False] * len(self._started)
        self._works = []


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one shape lay their elements out in the same memory order (the strides
    of size-1 dimensions do not count: a one-output layer is dense with strides (1, 1) or (13, 1)),
    as kernels that walk several tensors as flat arrays (fused Adam, fused Adagrad) need."""
    return a.shape == b.shape and all(x == y for x, y, size in zip(a.stride(), b.stride(), a.shape) if size > 1)


def _view_like(flat: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``flat`` viewed in ``param``'s shape *and memory layout* (a dense parameter, e.g. a transposed
    weight: dlrm.model.DLRM's first layer). Fused Adam walks a parameter, its gradient and its
    moments as flat arrays, so a gradient laid out differently would update the wrong entries."""
    outer_first = sorted(range(param.dim()), key=lambda d: -param.stride(d))
    view = flat.view([param.shape[d] for d in outer_first]).permute(*[outer_first.index(d) for d in range(param.dim())])
    if not same_layout(view, param):
        raise ValueError(f"a parameter of strides {param.stride()} is not dense: its gradient cannot be a view")
    return view
