"""The embedding tables' optimizer: Adagrad, row-wise Adagrad or SGD, reading and writing only the rows a batch touched."""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch

from dlrm import native
from dlrm.dist import same_layout

SOURCE = Path(__file__).with_name("sparse_update.c")
FALLBACK = "PyTorch ops update the sparse rows"

Rule = Literal["adagrad", "rowwise_adagrad", "sgd"]

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


def state_columns(rule: Rule, dim: int) -> int:
    """Floats of state per table row: Adagrad's sum of squares per coordinate, row-wise Adagrad's one per
    row, none for SGD."""
    return {"adagrad": dim, "rowwise_adagrad": 1, "sgd": 0}[rule]


class SparseUpdateKernel:
    """The compiled update (dlrm/sparse_update.c) on tensors."""

    def __init__(self, library: ctypes.CDLL):
        self._update = library.sparse_update
        self._update.argtypes = [_i64, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i64, _i64, _i64, _f32, _f32,
                                 _ptr, _ptr, _ptr]
        self._update.restype = _i64

    @staticmethod
    def accepts(param: torch.Tensor, state: torch.Tensor, grad: torch.Tensor) -> bool:
        """Whether the C code can take these tensors as they lie: a sparse gradient of float32 rows of a
        [rows, d] float32 CPU weight and its [rows, d | 1 | 0] state, each row's floats contiguous."""
        values = grad._values()
        return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 2
                   and (t.stride(1) == 1 or t.shape[1] <= 1) for t in (param, state, values)) \
            and grad.sparse_dim() == 1 and values.shape[1] == param.shape[1]

    def update(self, param: torch.Tensor, state: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor,
               lr: float, eps: float, slots: torch.Tensor) -> None:
        """The rule ``state``'s width names (see sparse_update.c) on ``param`` and ``state`` for the gradient
        rows ``grad`` [n, d] of the weight rows ``rows`` (int64 [n], repeats allowed); ``slots``: int32
        [rows of param], all -1 (and left so)."""
        n, dim = grad.shape
        sums, distinct = grad.new_empty(n, dim), rows.new_empty(n)
        code = self._update(n, dim, rows.data_ptr(), rows.stride(0), grad.data_ptr(), grad.stride(0),
                            param.data_ptr(), param.stride(0), state.data_ptr(), state.stride(0), state.shape[1],
                            param.shape[0], lr, eps, slots.data_ptr(), sums.data_ptr(), distinct.data_ptr())
        if code < 0:
            raise IndexError(f"gradient row {-1 - code} names weight row {int(rows[-1 - code])}, outside the "
                             f"weight's {param.shape[0]} rows")
        # Written through pointers: tell autograd, as in-place ops do (a graph that saved them then raises).
        torch.autograd.graph.increment_version((param, state))


def load_kernel(compiler: str | None = None, march: str = "native") -> tuple[SparseUpdateKernel | None, str]:
    """The compiled sparse update, or None; and why (for the results)."""
    library, status = native.compile_library(SOURCE, compiler, march)
    if library is None:
        return None, f"{status}: {FALLBACK}"
    return SparseUpdateKernel(library), status


class SparseOptimizer(torch.optim.Optimizer):
    """The tables' update for sparse gradients, computed only for the rows a batch touched. With g a
    row's gradient (its entries summed when the batch names the row more than once):

        adagrad          torch.optim.Adagrad's arithmetic (no lr decay, sum starting at 0), a sum per
                         coordinate:  sum += g²;  row -= lr * g / (sqrt(sum) + eps)
        rowwise_adagrad  one sum per row (FBGEMM's and torchrec's exact row-wise Adagrad, 1/d of the
                         state):  sum += mean(g²);  row -= lr * g / (sqrt(sum) + eps)
        sgd              row -= lr * g

    Adagrad's step shrinks with the squared gradients a row has seen, so rare ids (most rows of a
    Zipf-distributed table, seen a few times in one epoch) still take large steps while frequent ids
    settle. With ``kernel`` (SparseUpdateKernel) an update is two passes of compiled code: the repeats
    of a row summed through a map of the weight's rows, then each row updated once (Adagrad: 0.2
    against 1.1 ms for 6,144 gradient rows of 64 floats on a core). Otherwise a handful of ops per
    table weight: duplicate ids summed with one sort (torch.unique) and one index_add, the state rows
    gathered once, updated and written back, and the weight rows updated by one index_add. A dense
    gradient, as small tables have, goes through torch's fused Adagrad kernel in one pass (Adagrad)
    or a few ops. torch's own sparse Adagrad builds and coalesces several sparse tensors per step
    instead (~2 ms more per step here).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, rule: Rule = "adagrad", eps: float = 1e-10,
                 kernel: SparseUpdateKernel | None = None):
        super().__init__(params, {"lr": lr, "eps": eps})
        self.rule, self.kernel = rule, kernel
        self._slots: dict[torch.nn.Parameter, torch.Tensor] = {}  # the kernel's row maps: scratch, not state
        for group in self.param_groups:
            for param in group["params"]:
                columns = state_columns(rule, param.shape[1])
                self.state[param]["sum"] = torch.zeros_like(param, memory_format=torch.preserve_format) \
                    if columns == param.shape[1] else param.new_zeros(param.shape[0], columns)
                self.state[param]["step"] = torch.zeros(())

    def state_sum(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The accumulated squared gradients of ``param``: [rows, d], [rows, 1] or (SGD) [rows, 0]."""
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
            _dense_update(self.rule, param, param.grad, state, self.state[param]["step"], lr, eps)
            return
        if param.grad._nnz() == 0:
            return
        if self.kernel is not None and self.kernel.accepts(param, state, param.grad):
            if param not in self._slots:
                self._slots[param] = torch.full((param.shape[0],), -1, dtype=torch.int32)
            self.kernel.update(param, state, param.grad._indices()[0], param.grad._values(), lr, eps,
                               self._slots[param])
            return
        rows, grad = _sum_duplicates(param.grad)
        if self.rule == "sgd":
            param.index_add_(0, rows, grad, alpha=-lr)
            return
        squares = grad * grad if self.rule == "adagrad" else (grad * grad).mean(1, keepdim=True)
        total = state.index_select(0, rows).add_(squares)
        state.index_copy_(0, rows, total)
        param.index_add_(0, rows, grad.div_(total.sqrt_().add_(eps)), alpha=-lr)


def _dense_update(rule: Rule, param: torch.Tensor, grad: torch.Tensor, state: torch.Tensor, step: torch.Tensor,
                  lr: float, eps: float) -> None:
    """``rule`` for a dense gradient (rows it does not touch are 0: they keep their weights and state)."""
    if rule == "sgd":
        param.add_(grad, alpha=-lr)
    elif rule == "rowwise_adagrad":
        state.add_((grad * grad).mean(1, keepdim=True))
        param.addcdiv_(grad, state.sqrt().add_(eps), value=-lr)
    elif same_layout(grad, param) and same_layout(state, param):
        # torch's fused Adagrad: one pass instead of four (0.15 against 0.41 ms for 5,647 x 64 on a
        # core). It walks the tensors as flat arrays, hence the same layouts. Without lr decay its
        # step count changes nothing; it counts in a tensor of its own.
        torch._fused_adagrad_([param], [grad], [state], [step], lr=lr, lr_decay=0.0, weight_decay=0.0, eps=eps,
                              maximize=False)
    else:
        state.addcmul_(grad, grad)
        param.addcdiv_(grad, state.sqrt().add_(eps), value=-lr)


def _sum_duplicates(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct rows, their summed gradient rows) of a sparse [rows, d] gradient; the values are a new tensor."""
    indices, values = grad._indices()[0], grad._values()
    if grad.is_coalesced():
        return indices, values.clone()
    rows, inverse = torch.unique(indices, return_inverse=True)
    return rows, values.new_zeros(len(rows), values.shape[1]).index_add_(0, inverse, values)
