"""The embedding tables' optimizer: Adagrad that reads and writes only the rows a batch touched."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from dlrm.dist import same_layout


class SparseAdagrad(torch.optim.Optimizer):
    """torch.optim.Adagrad's arithmetic (no lr decay, accumulator starting at 0), for sparse gradients:

        g = the row's gradient (its entries summed);  sum += g²;  row -= lr * g / (sqrt(sum) + eps)

    fused into a handful of ops per table weight: duplicate ids are summed with one sort
    (torch.unique) and one index_add, the accumulator rows are gathered once, updated and
    written back, and the weight rows updated by one index_add (a dense gradient, as small
    tables have, goes through torch's fused Adagrad kernel in one pass). torch's sparse Adagrad
    builds and coalesces several sparse tensors per step instead (~2 ms more per step here).
    Its per-coordinate step shrinks with the squared gradients a row has seen, so rare ids
    (most rows of a Zipf-distributed table, seen a few times in one epoch) still take large
    steps while frequent ids settle.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, eps: float = 1e-10):
        super().__init__(params, {"lr": lr, "eps": eps})
        for group in self.param_groups:
            for param in group["params"]:
                self.state[param]["sum"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                self.state[param]["step"] = torch.zeros(())

    def state_sum(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The accumulated squared gradients of ``param`` (its shape)."""
        return self.state[param]["sum"]

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                self._update(param, group)

    @torch.no_grad()
    def update(self, param: torch.nn.Parameter) -> None:
        """``step`` for one of the parameters (dlrm.train updates a table as soon as its gradient is complete)."""
        (group,) = [g for g in self.param_groups if any(p is param for p in g["params"])]
        self._update(param, group)

    def _update(self, param: torch.nn.Parameter, group: dict) -> None:
        if param.grad is None:
            return
        lr, eps, state = group["lr"], group["eps"], self.state[param]["sum"]
        if not param.grad.is_sparse:  # a small table's dense gradient: untouched rows have 0, stay put
            if same_layout(param.grad, param) and same_layout(state, param):
                # torch's fused Adagrad: one pass instead of four (0.15 against 0.41 ms for 5,647 x 64 on a
                # core). It walks the tensors as flat arrays, hence the same layouts. Without lr decay its
                # step count changes nothing; it counts in a tensor of its own.
                torch._fused_adagrad_([param], [param.grad], [state], [self.state[param]["step"]], lr=lr,
                                      lr_decay=0.0, weight_decay=0.0, eps=eps, maximize=False)
            else:
                state.addcmul_(param.grad, param.grad)
                param.addcdiv_(param.grad, state.sqrt().add_(eps), value=-lr)
            return
        if param.grad._nnz() == 0:
            return
        rows, grad = _sum_duplicates(param.grad)
        total = state.index_select(0, rows).addcmul_(grad, grad)
        state.index_copy_(0, rows, total)
        param.index_add_(0, rows, grad.div_(total.sqrt_().add_(eps)), alpha=-lr)


def _sum_duplicates(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct rows, their summed gradient rows) of a sparse [rows, d] gradient; the values are a new tensor."""
    indices, values = grad._indices()[0], grad._values()
    if grad.is_coalesced():
        return indices, values.clone()
    rows, inverse = torch.unique(indices, return_inverse=True)
    return rows, values.new_zeros(len(rows), values.shape[1]).index_add_(0, inverse, values)
