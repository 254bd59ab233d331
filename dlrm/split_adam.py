"""The MLPs' Adam split between the ranks of one node: each rank updates its share of the parameters,
then the ranks exchange the updated values through shared memory.

Every rank holds the same summed gradients after the all-reduce, so replicated Adam repeats the same
arithmetic W times. It is the largest step after the GEMMs, and bound by memory: each step streams
the MLPs' weights, gradients and both moments (the small profile: 500k parameters, 8 MB read and 6 MB
written), which the embedding lookups between two steps evict from the caches; with both ranks doing
it at once a step's Adam took 2.4 ms in training against 0.6 ms alone with warm caches. Split, each rank
streams its share, and the exchange moves the updated weights only (2 MB in all).

The shares are whole parameters (balanced by size, the same on every rank), so each rank's part is a
plain fused torch.optim.Adam, and the arithmetic is exactly replicated Adam's. Checkpoints keep the
replicated optimizer's format (``state_dict`` gathers the shares): either kind resumes from either.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dlrm import dist
from dlrm.shm import SharedMemoryGroup


def shares(sizes: list[int], world_size: int) -> list[int]:
    """The rank that updates each parameter (of ``sizes`` elements): the largest first, each to the least
    loaded rank (ties to the lower rank), so the ranks' loads differ by at most the smallest of the large."""
    loads = [0] * world_size
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owner[i], loads[rank] = rank, loads[rank] + sizes[i]
    return owner


class SplitAdam:
    """Adam over ``params`` (the same list, in the same order, on every rank), each rank stepping its share
    (``shares``) and receiving the others' through ``group`` (a collective: every rank calls ``step``).
    Quacks like the torch.optim.Adam it replaces where training uses it: ``param_groups`` (the learning
    rate), ``step``, ``state_dict`` and ``load_state_dict`` (both collectives)."""

    def __init__(self, params: list[nn.Parameter], lr: float, rank: int, world_size: int, group: SharedMemoryGroup):
        self.params, self.rank, self.group = list(params), rank, group
        self.sizes = [p.numel() for p in self.params]
        owner = shares(self.sizes, world_size)
        # Each rank's parameters (numbers in ``params``), and their sizes: how its share arrives.
        self.shares = [[i for i, o in enumerate(owner) if o == r] for r in range(world_size)]
        self.share_sizes = [[self.sizes[i] for i in share] for share in self.shares]
        self.mine = self.shares[rank]
        largest = max(sum(sizes) for sizes in self.share_sizes)
        if largest > group.capacity:
            raise ValueError(f"a share of {largest} parameters does not fit the shared-memory group's {group.capacity}")
        # (A rank without parameters still takes part in the exchange.)
        self.adam = torch.optim.Adam([self.params[i] for i in self.mine] or [torch.zeros(0, requires_grad=True)],
                                     lr=lr, fused=True)

    @property
    def param_groups(self) -> list[dict]:
        return self.adam.param_groups

    @property
    def state(self) -> dict:
        """This rank's share's state (by parameter, as torch.optim keeps it)."""
        return self.adam.state

    @torch.no_grad()
    def step(self, meanwhile: Callable[[], None] | None = None) -> None:
        """Step this rank's share, offer it, run ``meanwhile`` (work that absorbs the other ranks' lateness:
        it must not touch ``params``), then take the others' shares."""
        if self.mine:
            self.adam.step()
        send = self.group.send_buffer(sum(self.share_sizes[self.rank]))
        if self.mine:
            torch.cat([self.params[i].reshape(-1) for i in self.mine], out=send)  # (logical order, any layout)
        self.group.all_gather_start(send)
        if meanwhile is not None:
            meanwhile()
        for rank, received in enumerate(self.group.all_gather_views()):
            if rank == self.rank:
                continue
            for i, values in zip(self.shares[rank], received.split(self.share_sizes[rank])):
                self.params[i].copy_(values.view(self.params[i].shape))

    def state_dict(self) -> dict:
        """Replicated Adam's state dict over ``params`` (a collective: the shares' states are gathered)."""
        own = self.adam.state_dict()
        # The inner optimizer numbers its parameters 0..len(mine)-1; renumber them as in ``params``.
        mine = {self.mine[k]: state for k, state in own["state"].items()} if self.mine else {}
        state = {}
        for share in dist.all_gather(mine):
            state.update(share)
        group = {**own["param_groups"][0], "params": list(range(len(self.params)))}
        return {"state": dict(sorted(state.items())), "param_groups": [group]}

    def load_state_dict(self, saved: dict) -> None:
        """Load replicated Adam's state dict over ``params``: this rank keeps its share's."""
        group = {**saved["param_groups"][0], "params": list(range(len(self.mine)))}
        state = {k: saved["state"][i] for k, i in enumerate(self.mine) if i in saved["state"]}
        if self.mine:
            self.adam.load_state_dict({"state": state, "param_groups": [group]})
