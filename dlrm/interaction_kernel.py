"""DLRM's dot interaction as one compiled C kernel (dlrm/interaction.c), forward and backward.

The PyTorch interaction (dlrm.model.DotInteraction) concatenates the vectors into T, runs
two batched matmuls of tiny [28, d] matrices, and gathers and concatenates columns: in a
training step of the small profile on one core that is 8-9 ms of the ~52, the batched
matmuls at a third of the GEMM rate because each pass streams T from memory. The kernel
takes one sample at a time while its vectors are in L1: the pairs' dot products straight
into the top MLP's input, and backward dT = S T with S gathered per sample, writing each
block's gradient contiguous (no copies before the lookups' backward or the all-to-all).
Tables it can read in place (a ``Lookup``: the weight and the batch's ids) are not gathered
first at all: the kernel reads each sample's rows from the weight, and backward adds their
gradients to a dense gradient of the weight. That is the small replicated tables in training
(a small-profile step no longer makes the [B, 20, d] lookup, its gradient and the index_add
scattering it) and every table at inference.

It computes in fp32 also in bf16 training (the bottom MLP's bf16 output is widened; the
products of bf16 values are exact in fp32), where it replaces a bf16 batched matmul.
It is compiled when a training or inference job starts (dlrm.native). Without a compiler the
model uses the PyTorch interaction; train.json says which ("interaction_kernel").
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dlrm import native
from dlrm.accumulate import grad_to_accumulate

SOURCE = Path(__file__).with_name("interaction.c")
FALLBACK = "the PyTorch interaction is used"

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


@dataclass(frozen=True)
class Lookup:
    """n tables' vectors for a batch, not gathered yet: sample b's vector of the j-th table is row
    ids[b, j] of that table, which is rows offsets[j] .. offsets[j] + rows[j] of ``weight`` [sum, d].
    ``gather()`` makes the [B, n, d] tensor (with the gradient the tables' module gives it); the
    kernel reads the rows in place instead."""

    weight: torch.Tensor
    offsets: tuple[int, ...]
    rows: tuple[int, ...]
    ids: torch.Tensor  # int64 [B, n]
    gather: Callable[[], torch.Tensor]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.ids.shape[0], self.ids.shape[1], self.weight.shape[1]


Block = torch.Tensor | Lookup  # vectors [B, n, d], or where to read them


class InteractionKernel:
    """The compiled kernel's two functions on tensors. Batches are split over torch's thread
    count, one slice per thread (ctypes releases the GIL during a call)."""

    def __init__(self, library: ctypes.CDLL):
        self._forward, self._backward = library.interaction_forward, library.interaction_backward
        self._forward.argtypes = [_i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _i64]
        self._backward.argtypes = [_i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _i64, _ptr,
                                   _ptr]
        self._forward.restype = self._backward.restype = _i64
        self._pool: ThreadPoolExecutor | None = None
        self._pool_threads = 0

    def __deepcopy__(self, memo: dict) -> InteractionKernel:
        return self  # stateless code: a copied model (e.g. by IPEX's optimize) shares it

    def forward(self, first: torch.Tensor, second: torch.Tensor, width: int, bottom: torch.Tensor,
                blocks: list[Block]) -> torch.Tensor:
        """[B, width]: bottom, then <T_first[p], T_second[p]> for each pair p (int32 positions in
        T = cat(bottom, *blocks)), then zeros. The inputs must be ``readable``."""
        batch, dim = bottom.shape
        out = bottom.new_empty(batch, width)
        vectors = _Vectors([bottom, *blocks])
        self._run(batch, lambda start, stop, thread=0: _check(self._forward(
            start, stop, dim, vectors.count, *vectors.sources(), len(first), first.data_ptr(), second.data_ptr(),
            out.data_ptr(), width)))
        return out

    def backward(self, symmetric: torch.Tensor, pairs: int, grad: torch.Tensor, bottom: torch.Tensor,
                 blocks: list[Block]) -> list[torch.Tensor]:
        """The gradients of bottom and of each block from the output's gradient ``grad`` [B, width]:
        new contiguous tensors; a Lookup's is added to its weight's .grad when backward() accumulates
        there (dlrm.accumulate: None is returned for it), else it is the dense gradient of the weight;
        ``symmetric`` [F * F] int32: the column among the pairs of pair (f, o)'s gradient, ``pairs``
        on the diagonal (see dlrm.model._Layout)."""
        batch, dim = bottom.shape
        grad = grad.contiguous()
        inputs = [bottom, *blocks]
        threads = slices(batch)
        accumulate = [grad_to_accumulate(t.weight) if isinstance(t, Lookup) else None for t in inputs]
        accumulate = [g if g is not None and g.stride(-1) == 1 else None for g in accumulate]
        # Samples of different threads may share a Lookup's rows: each thread adds to its own copy of
        # the weight's gradient (the first thread to .grad itself when accumulating there), and the
        # copies are summed at the end.
        grads = [torch.zeros(threads - (g is not None), *t.weight.shape) if isinstance(t, Lookup)
                 else torch.empty_like(t, memory_format=torch.contiguous_format) for t, g in zip(inputs, accumulate)]
        vectors = _Vectors(inputs)

        def destination(t: Block, g: torch.Tensor, into: torch.Tensor | None, thread: int) -> Block | torch.Tensor:
            if not isinstance(t, Lookup):
                return g
            return replace(t, weight=into if into is not None and thread == 0 else g[thread - (into is not None)])

        destinations = [_Vectors([destination(t, g, into, i) for t, g, into in zip(inputs, grads, accumulate)])
                        for i in range(threads)]
        self._run(batch, lambda start, stop, thread=0: _check(self._backward(
            start, stop, dim, vectors.count, *vectors.sources(), pairs, symmetric.data_ptr(), grad.data_ptr(),
            grad.shape[1], destinations[thread].base, destinations[thread].stride)))
        result: list[torch.Tensor | None] = []
        for t, g, into in zip(inputs, grads, accumulate):
            if not isinstance(t, Lookup):
                result.append(g)
            elif into is not None:
                if len(g):
                    into.add_(g.sum(0))
                result.append(None)
            else:
                result.append(g[0] if threads == 1 else g.sum(0))
        return result

    def _run(self, batch: int, call: Callable[..., None]) -> None:
        """call(start, stop, thread=i) for the i-th of the slices the batch is split into, one per thread."""
        threads = slices(batch)
        if threads == 1:
            call(0, batch)
            return
        if self._pool_threads != threads:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="interaction")
            self._pool_threads = threads
        bounds = [batch * i // threads for i in range(threads + 1)]
        futures = [self._pool.submit(call, a, b, thread=i) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        # Every slice must be done before anything is raised: the C code writes through raw pointers into
        # tensors the caller could free once an error reaches it.
        wait(futures)
        for future in futures:
            future.result()


def slices(batch: int) -> int:
    """How many slices (one per torch thread) the kernel splits a batch into."""
    return max(1, min(torch.get_num_threads(), batch))


def _check(code: int) -> None:
    """The kernel's return code: -1 - b when sample b names a table row out of range."""
    if code < 0:
        raise IndexError(f"sample {-1 - code} of the batch names a table row out of range: "
                         "the ids must be table-local rows (check the data against its vocabularies)")


def readable(bottom: torch.Tensor, blocks: list[Block]) -> bool:
    """Whether the kernel can read these inputs in place: bottom [B, d] and blocks [B, n_i, d] or
    Lookups of [B, n_i] int64 ids into [rows, d] weights, float32 on the CPU, each vector's d floats
    contiguous (the C code trusts the shapes)."""
    if bottom.dim() != 2:
        return False
    batch, dim = bottom.shape
    floats = [bottom, *(b.weight if isinstance(b, Lookup) else b for b in blocks)]
    lookups = [b for b in blocks if isinstance(b, Lookup)]
    return all(t.device.type == "cpu" and t.layout == torch.strided and t.dtype == torch.float32
               and t.stride(-1) == 1 for t in floats) \
        and all(b.dim() == 3 and b.shape[0] == batch and b.shape[2] == dim and b.stride(1) == dim
                for b in blocks if not isinstance(b, Lookup)) \
        and all(b.weight.dim() == 2 and b.weight.shape[1] == dim and b.ids.dtype == torch.int64
                and b.ids.device.type == "cpu" and b.ids.dim() == 2 and b.ids.shape == (batch, len(b.offsets))
                and len(b.rows) == len(b.offsets) and all(o + r <= b.weight.shape[0] for o, r in zip(b.offsets, b.rows))
                for b in lookups)


class _Vectors:
    """Where the kernel finds vector f of sample b (see interaction.c), as its C arrays: base[f] and
    stride[f] (in floats); for a Lookup's tables index[f] (its ids' column), index_stride[f] and rows[f]."""

    def __init__(self, blocks: list[Block]):
        base, stride, index, index_stride, rows = [], [], [], [], []
        for t in blocks:
            # (Each tensor's address and strides read once: this runs three times a training step.)
            if isinstance(t, Lookup):
                weight, row_stride, ids, (sample_stride, column_stride) = t.weight.data_ptr(), t.weight.stride(0), \
                    t.ids.data_ptr(), t.ids.stride()
                base += [weight + 4 * offset * row_stride for offset in t.offsets]
                stride += [row_stride] * len(t.offsets)
                index += [ids + 8 * j * column_stride for j in range(len(t.offsets))]
                index_stride += [sample_stride] * len(t.offsets)
                rows += t.rows
            else:
                vectors, first, vector_stride = (1 if t.dim() == 2 else t.shape[1]), t.data_ptr(), t.stride()
                base += [first + 4 * j * vector_stride[1] for j in range(vectors)] if t.dim() == 3 else [first]
                stride += [vector_stride[0]] * vectors
                index += [None] * vectors
                index_stride += [0] * vectors
                rows += [0] * vectors
        self.count = len(base)
        self.base = (ctypes.c_void_p * self.count)(*base)
        self.stride = (ctypes.c_int64 * self.count)(*stride)
        self.index = (ctypes.c_void_p * self.count)(*index)
        self.index_stride = (ctypes.c_int64 * self.count)(*index_stride)
        self.rows = (ctypes.c_int64 * self.count)(*rows)

    def sources(self) -> tuple[ctypes.Array, ...]:
        return self.base, self.stride, self.index, self.index_stride, self.rows


def load(compiler: str | None = None, march: str = "native") -> tuple[InteractionKernel | None, str]:
    """The kernel compiled for this CPU (or the instruction set ``march`` names), or None; and why
    (for the results). Its vector width follows the instruction set: AVX-512, AVX or SSE."""
    library, status = native.compile_library(SOURCE, compiler, march)
    if library is None:
        return None, f"{status}: {FALLBACK}"
    return InteractionKernel(library), status
