"""Distributed plumbing: who am I (from the launcher), which backend, which cores, join the group.

Every rank is an independent process started by a launcher (mpiexec, torchrun, or
nothing at all). torch.distributed does not talk to MPI here: the launcher only
tells each process its rank, and the ranks meet over TCP at MASTER_ADDR:MASTER_PORT.
"""

from __future__ import annotations

import datetime
import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

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


def pin_threads(info: RankInfo, cores: list[int] | None = None, max_threads: int | None = None) -> dict:
    """Give this rank its own share of the node's cores and as many intra-op threads.

    ``cores``: the node's cores shared by all local ranks; None means this process's
    current affinity (mpiexec without binding gives every rank the whole node).
    Leftover cores (when they do not divide evenly) stay unused so ranks are equal.
    ``max_threads`` (e.g. the launcher's OMP_NUM_THREADS) caps the share.
    """
    if cores is None:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(
            range(os.cpu_count() or 1))
    cores = sorted(cores)
    if not cores:
        raise ValueError("no cores to pin to")
    mine, oversubscribed = _share(cores, info)
    if max_threads is not None:
        mine = mine[:max(1, max_threads)]
    pinned = False
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, mine)
        pinned = True
    torch.set_num_threads(len(mine))
    return {"cores": mine, "threads": len(mine), "pinned": pinned,
            "oversubscribed": oversubscribed}


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


def allreduce_sparse_grads(weights: list[torch.Tensor]) -> None:
    """Average the embedding tables' sparse gradients over all ranks in ONE collective.

    DDP would all-reduce each table separately, and every sparse all-reduce pays a
    fixed cost (gloo: all-gather of sizes, then of indices and values): 26 tables
    took ~160 ms per step on 2 ranks of a 2-core machine, one stacked tensor ~9 ms.
    So the tables are stacked row-wise (table c's row j is row offset[c] + j), reduced
    once, and cut apart again.
    """
    world_size = dist.get_world_size()
    if world_size == 1:
        return
    dim = weights[0].shape[1]
    row_offsets = [0]
    for weight in weights:
        row_offsets.append(row_offsets[-1] + weight.shape[0])
    # Coalesce first: a batch touches many rows more than once, so this shrinks the message.
    grads = [weight.grad.coalesce() for weight in weights]
    indices = torch.cat([g.indices()[0] + offset for g, offset in zip(grads, row_offsets)])
    values = torch.cat([g.values() for g in grads])
    stacked = torch.sparse_coo_tensor(indices.unsqueeze(0), values, (row_offsets[-1], dim), is_coalesced=True)
    dist.all_reduce(stacked)  # sum over ranks, in place
    stacked = stacked.coalesce()
    indices, values = stacked.indices()[0], stacked.values() / world_size
    # Coalesced indices are sorted, so each table's rows are one contiguous run.
    bounds = torch.searchsorted(indices, torch.tensor(row_offsets, dtype=indices.dtype)).tolist()
    for c, weight in enumerate(weights):
        start, stop = bounds[c], bounds[c + 1]
        weight.grad = torch.sparse_coo_tensor((indices[start:stop] - row_offsets[c]).unsqueeze(0),
                                              values[start:stop], weight.shape, is_coalesced=True)
