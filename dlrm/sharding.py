"""Hybrid parallelism for the embedding tables: large tables sharded across the ranks, small ones replicated.

As the reference DLRM (``--dist-backend``, its all-to-all "butterfly") and Intel's DLRM workflow:
  * the MLPs are data-parallel: every rank holds them and one all-reduce averages their
    gradients (dlrm.dist.GradientBuffer);
  * a table with at least ``train.shard_min_rows`` rows lives on ONE rank (model-parallel,
    whole tables, largest first onto the rank holding the fewest rows so far). Its owner
    looks up the ids of the whole global batch (the loader reads them for it), and one
    all-to-all hands every rank the vectors of its own rows. Backward is the same exchange
    in reverse, so the owner receives the gradient of every row of the global batch and
    updates its tables alone;
  * smaller tables are replicated: each rank looks up its own rows and their gradients
    are averaged over the ranks. When they hold no more rows than one rank's batch looks
    up (rows <= b * tables: a batch touches most of them anyway) their gradient is dense
    and averaged with the MLPs' in the same all-reduce; otherwise the touched rows are
    averaged in one sparse all-reduce.

    rank r:  replicated tables: ids [b, n]    ─> [b, n, d] ─────────────────────────┐
             its own tables:    ids [G, k_r]  ─> [G, k_r, d] ─ all-to-all ─> [b, k_0 + k_1 + ..., d]
                                                      (rows of rank j's part go to rank j) │
             both blocks ─> DLRM's interaction  (``tables`` says which vector is which table) <─┘

b is this rank's part of the global batch G (b = G/W in training). A plan with nothing
sharded is plain data parallelism; one rank owning tables is a single process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.distributed as torch_dist
from torch import nn

from dlrm.interaction_kernel import Block, Lookup
from dlrm.model import EmbeddingTables
from dlrm.shm import SharedMemoryGroup


@dataclass(frozen=True)
class ShardingPlan:
    """Where each table lives: ``owners[t]`` is the rank holding table t, None when replicated."""

    vocab_sizes: tuple[int, ...]
    owners: tuple[int | None, ...]
    world_size: int
    shard_min_rows: int
    replicated_dense: bool  # the replicated tables' gradients are dense (see the module docstring)

    @property
    def replicated(self) -> list[int]:
        return [t for t, owner in enumerate(self.owners) if owner is None]

    def owned(self, rank: int) -> list[int]:
        return [t for t, owner in enumerate(self.owners) if owner == rank]

    @property
    def any_sharded(self) -> bool:
        return any(owner is not None for owner in self.owners)

    def concatenated(self) -> list[int]:
        """The tables in the order ShardedEmbeddings hands out their vectors: the replicated
        ones, then those owned by rank 0, rank 1, ..."""
        return self.replicated + [t for r in range(self.world_size) for t in self.owned(r)]

    def describe(self) -> dict:
        """For train.json: which tables are replicated and which rank holds which."""
        return {
            "shard_min_rows": self.shard_min_rows,
            "replicated_tables": self.replicated,
            "replicated_rows": sum(self.vocab_sizes[t] for t in self.replicated),
            "replicated_gradients": "dense" if self.replicated_dense else "sparse",
            "ranks": [{"rank": r, "tables": self.owned(r), "rows": sum(self.vocab_sizes[t] for t in self.owned(r))}
                      for r in range(self.world_size)],
        }


def plan_tables(vocab_sizes: list[int], world_size: int, shard_min_rows: int, local_batch: int) -> ShardingPlan:
    """Shard every table of at least ``shard_min_rows`` rows (0: none), balancing rows per rank;
    ``local_batch``: the rows of one rank's part of a batch (decides dense replicated gradients).

    Greedy, largest first, each onto the rank with the fewest rows so far (ties: fewer
    tables, then the lower rank), which keeps ranks within one table of each other.
    """
    owners: list[int | None] = [None] * len(vocab_sizes)
    rows = [0] * world_size
    tables = [0] * world_size
    if shard_min_rows > 0:
        candidates = sorted((t for t, size in enumerate(vocab_sizes) if size >= shard_min_rows),
                            key=lambda t: (-vocab_sizes[t], t))
        for t in candidates:
            rank = min(range(world_size), key=lambda r: (rows[r], tables[r], r))
            owners[t] = rank
            rows[rank] += vocab_sizes[t]
            tables[rank] += 1
    replicated = [size for size, owner in zip(vocab_sizes, owners) if owner is None]
    dense = sum(replicated) <= local_batch * len(replicated)
    return ShardingPlan(tuple(vocab_sizes), tuple(owners), world_size, shard_min_rows, dense)


class ShardedIds(NamedTuple):
    """The ids one rank needs for one global batch (what data.read_sharded_batch reads)."""

    replicated: torch.Tensor  # int64 [b, len(plan.replicated)]: this rank's rows
    owned: torch.Tensor  # int64 [G, len(plan.owned(rank))]: every rank's rows, in rank order
    batch_sizes: tuple[int, ...]  # rows of each rank's part; G is their sum


class Exchange:
    """The all-to-all "butterfly" of one global batch: each owner's lookups -> each rank's vectors for its rows.

    forward:  this rank's tables' rows for the whole batch, [G, k_me, d] -> blocks [b_me, k_j, d], one
              per rank j (rank j's tables' vectors for my rows); the rows of rank j's part (rows
              sum(b_<j) .. sum(b_<=j) of G) go to rank j.
    backward: the gradients travel back the same way: the blocks' gradients -> [G, k_me, d], the
              sparse gradient of this rank's tables.

    One all_to_all_single each way (gloo supports it on CPU, with uneven splits; or ``shared``, a
    dlrm.shm group of the ranks on one node, used for nothing else), each started
    asynchronously by one autograd node and waited for by another (_Send, _Receive): ``start``
    sends, ``finish`` waits, and the work in between overlaps the exchange - the bottom MLP in
    forward; in backward, which runs the nodes in reverse order of creation, the bottom MLP's and
    the replicated tables' backward. Through shared memory, the lookups and the gradients are
    written straight into this rank's slot, and the vectors received are read where they lie.
    """

    def __init__(self, batch_sizes: tuple[int, ...], tables_per_rank: tuple[int, ...], rank: int,
                 shared: SharedMemoryGroup | None = None):
        self.batch_sizes, self.tables_per_rank, self.rank, self.shared = batch_sizes, tables_per_rank, rank, shared
        self.work: torch_dist.Work | None = None
        self.buffers: tuple[torch.Tensor, ...] = ()  # the tensors of the exchange in flight, kept alive
        self.receive_sizes: list[int] = []
        self.dim = 0

    def start(self, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Start sending rows ``rows`` (int64 [G, k_me]) of this rank's tables' ``weight``; returns the
        token ``finish`` takes (an empty tensor: the autograd graph's link from one node to the other).
        The weight's gradient is sparse: the rows' gradients, repeats not summed."""
        self.dim = weight.shape[1]
        return _Send.apply(weight, rows, self)

    def finish(self, token: torch.Tensor) -> list[torch.Tensor]:
        """Wait for the vectors; one block [b_me, k_j, d] per rank j. Through shared memory the blocks are
        views of the other ranks' slots, valid until this rank's next exchange (in training, the same
        step's backward): read them, do not keep or modify them."""
        return list(_Receive.apply(token, self))

    def sizes(self) -> tuple[list[int], list[int]]:
        """Elements this rank sends to and receives from each rank in forward (backward: the reverse)."""
        owned = self.tables_per_rank[self.rank]
        mine = self.batch_sizes[self.rank]
        return ([b * owned * self.dim for b in self.batch_sizes],
                [mine * k * self.dim for k in self.tables_per_rank])

    def send_buffer(self, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Where to write the ``n`` values the next ``run`` sends (through shared memory: in place, float32)."""
        return self.shared.send_buffer(n) if self.shared is not None else torch.empty(n, dtype=dtype)

    def run(self, send: torch.Tensor, send_sizes: list[int], receive_sizes: list[int]) -> torch.Tensor:
        """Start one all-to-all of the flat ``send`` (``received`` waits for it); returns an empty token."""
        self.receive_sizes = receive_sizes
        if self.shared is not None:
            self.shared.all_to_all_start(send, send_sizes)
            self.buffers = (send,)
        else:
            received = send.new_empty(sum(receive_sizes))
            self.buffers = (send, received)
            self.work = torch_dist.all_to_all_single(received, send, receive_sizes, send_sizes, async_op=True)
        return send.new_empty(0)

    def received(self) -> list[torch.Tensor]:
        """Wait for the all-to-all ``run`` started: each rank's segment for this rank (flat). Through
        shared memory they are views of the shared file, valid until this rank's next call on it."""
        if self.shared is None:
            return list(self.received_whole().split(self.receive_sizes))
        self.buffers = ()
        return self.shared.all_to_all_views(self.receive_sizes)

    def received_whole(self) -> torch.Tensor:
        """``received``'s segments end to end, in a tensor of this rank's own."""
        if self.shared is not None:
            return torch.cat(self.received())
        self.work.wait()
        whole = self.buffers[1]
        self.work, self.buffers = None, ()
        return whole


class _Send(torch.autograd.Function):
    """Looks up this rank's rows into the send buffer and starts the forward exchange; backward waits
    for the gradients' exchange (_Receive started it) and makes them the weight's sparse gradient."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rows: torch.Tensor, exchange: Exchange) -> torch.Tensor:
        send, receive = exchange.sizes()
        if rows.numel() * weight.shape[1] != sum(send):
            raise ValueError(f"{tuple(rows.shape)} ids to look up, where the batch sizes {exchange.batch_sizes} "
                             f"and this rank's {exchange.tables_per_rank[exchange.rank]} tables make "
                             f"{sum(send) // weight.shape[1]}")
        ctx.exchange, ctx.weight_shape = exchange, weight.shape
        rows = rows.reshape(-1)
        ctx.save_for_backward(rows)
        buffer = exchange.send_buffer(sum(send), weight.dtype)
        torch.index_select(weight, 0, rows, out=buffer.view(-1, weight.shape[1]))
        return exchange.run(buffer, send, receive)

    @staticmethod
    def backward(ctx, _grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (rows,) = ctx.saved_tensors
        # What F.embedding(sparse=True) gives: a row per lookup, uncoalesced.
        values = ctx.exchange.received_whole().view(-1, ctx.weight_shape[1])
        return torch.sparse_coo_tensor(rows.unsqueeze(0), values, ctx.weight_shape), None, None


class _Receive(torch.autograd.Function):
    """Waits for the forward exchange (a block per sending rank); backward starts the gradients' exchange."""

    @staticmethod
    def forward(ctx, _token: torch.Tensor, exchange: Exchange) -> tuple[torch.Tensor, ...]:
        ctx.exchange = exchange
        mine = exchange.batch_sizes[exchange.rank]
        return tuple(segment.view(mine, k, exchange.dim)
                     for segment, k in zip(exchange.received(), exchange.tables_per_rank))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor, None]:
        exchange: Exchange = ctx.exchange
        send, receive = exchange.sizes()
        packed = exchange.send_buffer(sum(receive), grads[0].dtype)
        for block, grad in zip(packed.split(receive), grads):
            block.view_as(grad).copy_(grad)  # the interaction's gradient blocks are strided views
        return exchange.run(packed, receive, send), None


class ShardedEmbeddings(nn.Module):
    """This rank's share of the 26 tables (``replicated``: copies on every rank; ``local``: the
    tables it owns) behaving, across the ranks, like all of them: ids -> [b, 26, d], vector i
    belonging to table ``tables[i]``."""

    def __init__(self, plan: ShardingPlan, rank: int, dim: int):
        super().__init__()
        self.plan, self.rank = plan, rank
        sizes = plan.vocab_sizes
        self.replicated = EmbeddingTables(plan.replicated, [sizes[t] for t in plan.replicated], dim,
                                          sparse=not plan.replicated_dense)
        self.local = EmbeddingTables(plan.owned(rank), [sizes[t] for t in plan.owned(rank)], dim)
        self.tables_per_rank = tuple(len(plan.owned(r)) for r in range(plan.world_size))
        self.tables = plan.concatenated()  # which table each output vector belongs to
        self.shared: SharedMemoryGroup | None = None

    def exchange_through(self, shared: SharedMemoryGroup) -> None:
        """Exchange the vectors through ``shared`` (a dlrm.shm group for this alone), not the backend."""
        self.shared = shared

    def reset_parameters(self, seeds: list[int]) -> None:
        self.replicated.reset_parameters(seeds)
        self.local.reset_parameters(seeds)

    def forward(self, ids: ShardedIds) -> list[torch.Tensor]:
        """[b, n, d] from the replicated tables, then (if any are sharded) [b, k_r, d] from each owner r
        (through shared memory, views valid until the next exchange: see Exchange.finish)."""
        return [b.gather() if isinstance(b, Lookup) else b for b in self.start(ids)()]

    def start(self, ids: ShardedIds) -> Callable[[], list[Block]]:
        """``forward`` in two halves: look up and start the exchange; the function returned waits for it
        and returns forward's blocks (DLRM runs its bottom MLP in between)."""
        # The replicated tables' vectors are mostly read where they are (EmbeddingTables.deferred).
        if not self.plan.any_sharded or self.plan.world_size == 1:  # nothing to exchange
            parts = [self.replicated.deferred(ids.replicated), *([self.local(ids.owned)] if self.plan.any_sharded else [])]
            return lambda: parts
        exchange = Exchange(ids.batch_sizes, self.tables_per_rank, self.rank, self.shared)
        received = exchange.start(self.local.weight, ids.owned + self.local.offsets)
        # After the start: a lookup still made here (sparse gradients) runs while the vectors travel, and
        # its backward while theirs do (autograd runs the nodes in reverse order of creation).
        replicated = self.replicated.deferred(ids.replicated)
        return lambda: [replicated, *exchange.finish(received)]

    def reduce_sparse_gradients(self) -> None:
        """After backward: the replicated tables' sparse gradients summed over the ranks (one sparse
        all-reduce of the touched rows). Each rank's loss is scaled to its share of the global
        batch's mean loss (dlrm.train), so the sum is that mean's gradient; the owned tables'
        gradients are already the sum over every rank's rows (the backward exchange), and the dense
        ones are summed with the MLPs' (dlrm.dist.GradientBuffer)."""
        if self.plan.world_size > 1 and self.plan.replicated and self.replicated.sparse:
            grad = self.replicated.weight.grad.coalesce()  # fewer rows to send: a batch repeats ids
            torch_dist.all_reduce(grad)  # sparse: every rank's rows gathered and summed, in place
            self.replicated.weight.grad = grad.coalesce()

    def gather(self, replicated: torch.Tensor, local: torch.Tensor) -> torch.Tensor | None:
        """All tables' rows [sum(vocab), ...] in table order on rank 0 (None on the others), from
        every rank's tensors laid out like ``self.replicated.weight`` and ``self.local.weight``
        (the weights themselves, or optimizer state of their shape). A collective."""
        full = None
        plan = self.plan
        if self.rank == 0:
            full = replicated.new_empty(sum(plan.vocab_sizes), *replicated.shape[1:])
            starts = torch.tensor([0, *plan.vocab_sizes]).cumsum(0).tolist()
            for rank in range(plan.world_size):
                if rank == 0:
                    pieces = local
                else:
                    rows = sum(plan.vocab_sizes[t] for t in plan.owned(rank))
                    pieces = replicated.new_empty(rows, *replicated.shape[1:])
                    if rows:
                        torch_dist.recv(pieces, src=rank)
                _place(full, starts, plan.owned(rank), plan.vocab_sizes, pieces)
            _place(full, starts, plan.replicated, plan.vocab_sizes, replicated)
        elif local.shape[0]:
            torch_dist.send(local.contiguous(), dst=0)
        return full

    def split(self, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (replicated, local) rows of a tensor laid out like all the tables (``gather``'s inverse)."""
        starts = torch.tensor([0, *self.plan.vocab_sizes]).cumsum(0).tolist()

        def rows(tables: list[int]) -> torch.Tensor:
            if not tables:
                return full.new_empty(0, *full.shape[1:])
            return torch.cat([full[starts[t]:starts[t + 1]] for t in tables])

        return rows(self.plan.replicated), rows(self.plan.owned(self.rank))


def _place(full: torch.Tensor, starts: list[int], tables: list[int], sizes: tuple[int, ...],
           pieces: torch.Tensor) -> None:
    """Copy ``pieces`` (the rows of ``tables``, end to end) to their places in ``full``."""
    offset = 0
    for t in tables:
        full[starts[t]:starts[t + 1]] = pieces[offset:offset + sizes[t]]
        offset += sizes[t]
