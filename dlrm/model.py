"""DLRM (Naumov et al., 2019): the click model being benchmarked.

    dense [B, 13] ──> bottom MLP ──> x [B, d] ─┐
    ids   [B, 26] ──> 26 embedding tables ──> E [B, 26, d] ─┤
                                                           ├─> dot interaction ─> top MLP ─> logit [B]
    T = cat(x, E)                      [B, 27, d]
    Z = T Tᵀ                           [B, 27, 27]   every pairwise dot product
    features = cat(x, tril(Z, -1))     [B, d + 351]  each pair once, no self-products
                                                    (+ zero columns up to a multiple of 16: see DLRM)

The 26 tables live end to end in one weight (EmbeddingTables), so a batch is one
lookup and its gradient one *sparse* tensor holding only the rows the batch touched;
the optimizer and the all-reduce only move those rows, as in the reference.
In training, ``dlrm.sharding.ShardedEmbeddings`` takes the tables' place: the same
[B, 26, d] from tables spread over the ranks.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from bench.config import NUM_DENSE, ModelConfig
from dlrm import interaction_kernel
from dlrm.interaction_kernel import Block, InteractionKernel, Lookup
from dlrm.mlp import MLP, MLPKernel


def column_major(layer: nn.Linear) -> None:
    """Store the layer's weight transposed in memory (same shape and values). For a layer of few inputs
    (the bottom MLP's first: 13) that makes autograd compute the weight's gradient as xᵀ g, a
    [13, B] x [B, 512] product, instead of (gᵀ x)ᵀ, which PyTorch picks for a row-major weight and
    which MKL runs 2.6x slower for 13 columns (0.30 against 0.79 ms per 1024 rows on one core)."""
    layer.weight = nn.Parameter(layer.weight.detach().t().contiguous().t())


class EmbeddingTables(nn.Module):
    """Some of the model's tables stored end to end: row j of the i-th is weight row offsets[i] + j.

    ``tables``: which of the model's tables these are (their numbers), ``rows``: their sizes.
    Looking up every table of a batch is one index_select; its gradient is one sparse
    tensor of the touched rows (nn.functional.embedding's sparse path: no dense
    [rows, d] gradient is ever made), or with ``sparse=False`` a dense one, cheaper for
    tables so small that a batch touches most of their rows anyway.
    """

    def __init__(self, tables: list[int], rows: list[int], dim: int, sparse: bool = True):
        super().__init__()
        self.tables, self.rows, self.sparse = list(tables), list(rows), sparse
        self.weight = nn.Parameter(torch.empty(sum(rows), dim))
        self.register_buffer("offsets", torch.tensor([0, *rows], dtype=torch.int64).cumsum(0)[:-1],
                             persistent=False)
        self.row_offsets = tuple(self.offsets.tolist())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids int64 [B, len(tables)] (table-local row numbers) -> vectors [B, len(tables), d]."""
        rows = (ids + self.offsets).flatten()
        lookup = F.embedding(rows, self.weight, sparse=True) if self.sparse else DenseGradLookup.apply(self.weight, rows)
        return lookup.view(*ids.shape, self.weight.shape[1])

    def deferred(self, ids: torch.Tensor) -> Block:
        """``forward``'s vectors as a Lookup, which the compiled interaction reads in place (and whose
        gradient it adds to a dense gradient of the weight), or gathers when it cannot; the vectors
        themselves when the gradient must be sparse."""
        if self.sparse and self.weight.requires_grad and torch.is_grad_enabled():
            return self(ids)
        return Lookup(self.weight, self.row_offsets, tuple(self.rows), ids, lambda: self(ids))

    def start(self, ids: torch.Tensor) -> Callable[[], list[Block]]:
        """``forward`` in two halves, as ShardedEmbeddings has them (DLRM.forward runs its bottom MLP in
        between): here nothing needs to wait, and the function returned gives the ``deferred`` vectors."""
        looked_up = [self.deferred(ids)]
        return lambda: looked_up

    def table(self, i: int) -> torch.Tensor:
        """The i-th table's rows (a view of the weight)."""
        start = int(self.offsets[i])
        return self.weight[start:start + self.rows[i]]

    @torch.no_grad()
    def reset_parameters(self, seeds: list[int]) -> None:
        """Uniform in ±sqrt(1/rows) like the reference; table t draws from its own generator
        seeded with seeds[t], so a table starts the same whichever rank holds it."""
        for i, (table, rows) in enumerate(zip(self.tables, self.rows)):
            bound = math.sqrt(1.0 / rows)
            self.table(i).uniform_(-bound, bound, generator=torch.Generator().manual_seed(seeds[table]))


class DenseGradLookup(torch.autograd.Function):
    """weight[rows] with a dense gradient made by one index_add (F.embedding's dense backward
    is ~3x slower on CPU)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.weight_shape = weight.shape
        return weight.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (rows,) = ctx.saved_tensors
        return grad.new_zeros(ctx.weight_shape).index_add_(0, rows, grad), None


class _Layout:
    """Where DotInteraction reads each output pair in its (padded) Z, and where each entry of the
    symmetric gradient S comes from, for one order of the tables."""

    def __init__(self, tables: tuple[int, ...]):
        self.pairs = pairs = _pairs(tables)
        self.features = len(tables) + 1
        self.padded = -(-self.features // 4) * 4
        rows, cols = pairs // self.features, pairs % self.features
        self.padded_pairs = rows * self.padded + cols
        # S[i, j] = S[j, i] = the gradient of pair (i, j); the diagonal reads column len(pairs), a zero.
        symmetric = torch.full((self.features * self.features,), len(pairs), dtype=torch.int64)
        symmetric[pairs] = torch.arange(len(pairs))
        symmetric[cols * self.features + rows] = torch.arange(len(pairs))
        self.symmetric = symmetric
        # The same for dlrm.interaction_kernel: each pair's two vectors, and S's sources.
        self.first, self.second = rows.to(torch.int32), cols.to(torch.int32)
        self.symmetric32 = symmetric.to(torch.int32)


@functools.lru_cache(maxsize=8)
def _layout(tables: tuple[int, ...]) -> _Layout:
    return _Layout(tables)


class DotInteraction(torch.autograd.Function):
    """features = cat(x, tril(T Tᵀ, -1), zeros) with T = cat(x, E), as one autograd node; the zero
    columns fill the output to ``width`` (the top MLP's padded input, see top_input_size).

    Z = T Tᵀ is symmetric, so its gradient needs one batched matmul, not two:
    dT = S T with S = dZ + dZᵀ, dZ holding the incoming gradient at the pairs' positions
    and zeros elsewhere; S is gathered in one pass from the gradient (``_Layout.symmetric``).
    In fp32, T gets zero rows up to a multiple of 4 features (27 -> 28): MKL's batched matmul
    of 28-row matrices is ~25% faster than of 27-row ones, and the zero rows change no product.
    """

    @staticmethod
    def forward(ctx, layout: _Layout, width: int, bottom: torch.Tensor, *embedded: torch.Tensor) -> torch.Tensor:
        # Under bf16 autocast T is cast once here, and kept for backward in bf16 too.
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else bottom.dtype
        vectors = [bottom.unsqueeze(1), *embedded]
        pad = dtype == torch.float32 and layout.padded > layout.features  # (bf16's batched matmul: no gain)
        if pad:
            vectors.append(bottom.new_zeros(bottom.shape[0], layout.padded - layout.features, bottom.shape[1]))
        t = torch.cat(vectors, dim=1).to(dtype)  # [B, F or padded, d]
        ctx.save_for_backward(t)
        ctx.layout, ctx.split = layout, [1] + [e.shape[1] for e in embedded]
        z = torch.bmm(t, t.transpose(1, 2))
        pairs = _columns(z.flatten(1), layout.padded_pairs if pad else layout.pairs).to(z.dtype)
        zeros = pairs.new_zeros(pairs.shape[0], width - bottom.shape[1] - pairs.shape[1])
        return torch.cat([bottom, pairs, zeros], dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (t,) = ctx.saved_tensors
        layout: _Layout = ctx.layout
        batch, dim = grad.shape[0], t.shape[2]
        # Column P (one past the pairs) is the zero that S's diagonal and unused entries read.
        extended = torch.cat([grad[:, dim:dim + len(layout.pairs)], grad.new_zeros(batch, 1)], dim=1)
        symmetric = _columns(extended, layout.symmetric).view(batch, layout.features, layout.features)
        grad_t = torch.bmm(symmetric.to(t.dtype), t[:, :layout.features])  # [B, F, d]
        grad_x, *grad_embedded = grad_t.split(ctx.split, dim=1)
        return None, None, grad[:, :dim] + grad_x.squeeze(1), *grad_embedded


class FusedDotInteraction(torch.autograd.Function):
    """DotInteraction's function computed by dlrm.interaction_kernel: the same features, forward
    and backward, from the vectors where they lie (in fp32), reading a Lookup's rows from its
    weight. ``blocks`` holds the embedded blocks and Lookups; ``tensors`` are, in the same order,
    the blocks and the Lookups' weights, whose gradients backward returns."""

    @staticmethod
    def forward(ctx, kernel: InteractionKernel, layout: _Layout, width: int, blocks: list[Block],
                bottom: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        lookups = [b for b in blocks if isinstance(b, Lookup)]
        # The Lookups' ids are saved too: changed in place before backward, they raise autograd's error.
        ctx.save_for_backward(bottom, *tensors, *(b.ids for b in lookups))
        ctx.kernel, ctx.layout, ctx.blocks = kernel, layout, len(blocks)
        ctx.lookups = [b if isinstance(b, Lookup) else None for b in blocks]
        return kernel.forward(layout.first, layout.second, width, bottom, blocks)

    @staticmethod
    @once_differentiable  # the kernel's gradient has no graph of its own
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        bottom, *saved = ctx.saved_tensors
        tensors, ids = saved[:ctx.blocks], iter(saved[ctx.blocks:])
        layout: _Layout = ctx.layout
        blocks = [t if lookup is None else replace(lookup, weight=t, ids=next(ids))
                  for t, lookup in zip(tensors, ctx.lookups)]
        grads = ctx.kernel.backward(layout.symmetric32, len(layout.pairs), grad, bottom, blocks)
        return None, None, None, None, *grads


def _columns(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[:, index]; a bf16 x is widened to fp32 first (fp32's index_select is ~3x faster than bf16's)."""
    return (x.float() if x.dtype == torch.bfloat16 else x).index_select(1, index)


@functools.lru_cache(maxsize=8)
def _pairs(tables: tuple[int, ...]) -> torch.Tensor:
    """Flat positions in Z of the pairs (i, j), j < i, of features 0 (bottom), 1 + t (table t),
    row by row (each unordered pair once), when table t's vector is T's column 1 + tables.index(t)."""
    position = [0] + [1 + tables.index(t) for t in range(len(tables))]
    rows, cols = torch.tril_indices(len(position), len(position), offset=-1)
    return torch.tensor([position[i] * len(position) + position[j] for i, j in zip(rows.tolist(), cols.tolist())])


def dot_interaction(bottom: torch.Tensor, embedded: torch.Tensor | list[Block],
                    tables: list[int] | None = None, width: int | None = None,
                    kernel: InteractionKernel | None = None) -> torch.Tensor:
    """bottom [B, d], embedded [B, 26, d] (or blocks [B, n_i, d] that together make it, or Lookups
    of them) -> [B, d + 27*26/2] (see the module docstring), or [B, width] ending in zero columns.

    ``tables``: which table each of embedded's vectors belongs to (None: vector t is table t's);
    the output's pairs are in table order either way, so no vectors need to be moved.
    ``kernel``: computed by it (FusedDotInteraction, in fp32 also under bf16 autocast) when it can
    read the vectors in place (``interaction_kernel.readable``); otherwise Lookups are gathered.
    """
    blocks = [embedded] if isinstance(embedded, torch.Tensor) else embedded
    vectors = sum(b.shape[1] for b in blocks)
    order = tuple(range(vectors) if tables is None else tables)
    if len(order) != vectors:
        raise ValueError(f"{len(order)} tables named for {vectors} embedded vectors")
    size = interaction_size(len(order), bottom.shape[1])
    if width is not None and width < size:
        raise ValueError(f"the interaction has {size} features, more than the width {width} asked for")
    if kernel is not None:
        # Under bf16 autocast the bottom MLP's output is bf16: the kernel's fp32 products are exact for it.
        wide = bottom.float() if bottom.dtype == torch.bfloat16 else bottom
        blocks = [_in_place_or_gathered(b) for b in blocks]
        if interaction_kernel.readable(wide, blocks):
            tensors = [b.weight if isinstance(b, Lookup) else b for b in blocks]
            return FusedDotInteraction.apply(kernel, _layout(order), width or size, blocks, wide, *tensors)
    gathered = [b.gather() if isinstance(b, Lookup) else b for b in blocks]
    return DotInteraction.apply(_layout(order), width or size, bottom, *gathered)


def _in_place_or_gathered(block: Block) -> Block:
    """A Lookup for the kernel to read in place, unless its weight's gradient is wanted and the batch is
    split over threads that would each add into a copy of that gradient larger than the gathered
    vectors' (many threads, or tables with more rows than the batch looks up): then the vectors."""
    if not isinstance(block, Lookup) or not (block.weight.requires_grad and torch.is_grad_enabled()):
        return block
    batch, vectors, _ = block.shape
    threads = interaction_kernel.slices(batch)
    return block if threads == 1 or threads * block.weight.shape[0] <= 2 * batch * vectors else block.gather()


def interaction_size(num_sparse: int, dim: int) -> int:
    """The interaction's features: the bottom MLP's d outputs and one per pair of the 1 + num_sparse vectors."""
    num_features = num_sparse + 1
    return dim + num_features * (num_features - 1) // 2


def top_input_size(num_sparse: int, dim: int) -> int:
    """The top MLP's input width: the interaction's features and zero columns up to a multiple of 16.
    The top MLP's first layer has the model's largest GEMMs, and their kernels run whole 16-float
    (AVX-512) blocks: at 415 features (the small profile) training spent 15.2 ms per 1024 rows in
    that layer's three GEMMs on one core, at 416 13.4 ms. A zero input leaves its weight column's
    gradient zero, so the model computes the same function as without the padding."""
    return -(-interaction_size(num_sparse, dim) // 16) * 16


class DLRM(nn.Module):
    """``embeddings``: the module turning the batch's ids into [B, 26, d] (or blocks of it: see
    dot_interaction), in the order of the tables its ``tables`` lists; None = all tables here
    (EmbeddingTables). Training passes dlrm.sharding.ShardedEmbeddings. Both have ``start(ids)``, which
    begins the lookups and returns the function that finishes them. ``kernel``: the compiled
    interaction (dlrm.interaction_kernel); None: PyTorch's. ``mlp_kernel``: the MLPs' fused passes
    (dlrm.mlp); None: PyTorch's Linear and ReLU."""

    def __init__(self, vocab_sizes: list[int], cfg: ModelConfig, embeddings: nn.Module | None = None,
                 kernel: InteractionKernel | None = None, mlp_kernel: MLPKernel | None = None):
        super().__init__()
        self.kernel = kernel
        dim = cfg.embedding_dim
        self.vocab_sizes = list(vocab_sizes)
        # The bottom output is one of the interacting vectors, so it ends in ReLU like the reference.
        self.bottom = MLP(NUM_DENSE, cfg.bottom_mlp, relu_last=True, kernel=mlp_kernel)
        self.embeddings = embeddings if embeddings is not None else EmbeddingTables(
            list(range(len(vocab_sizes))), self.vocab_sizes, dim)
        # The last top layer stays linear: it outputs the logit, BCEWithLogits applies the sigmoid.
        self.top = MLP(top_input_size(len(self.vocab_sizes), dim), cfg.top_mlp, relu_last=False, kernel=mlp_kernel)
        self.reset_parameters()
        # After initialising: normal_ fills a tensor in memory order, so the same seed gives the same weights.
        column_major(self.bottom[0])

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise like the reference DLRM (dlrm_s_pytorch.py), from torch's global RNG."""
        seeds = torch.randint(0, 2**62, (len(self.vocab_sizes),)).tolist()  # one per table, on every rank
        for layer in [*self.bottom, *self.top]:
            if isinstance(layer, nn.Linear):
                fan_out, fan_in = layer.weight.shape
                layer.weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)))
                layer.bias.normal_(0.0, math.sqrt(1.0 / fan_out))
        self.embeddings.reset_parameters(seeds)

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The sparse-gradient parameters (the table weights)."""
        return list(self.embeddings.parameters())

    def dense_parameters(self) -> list[nn.Parameter]:
        return [*self.bottom.parameters(), *self.top.parameters()]

    def forward(self, dense: torch.Tensor, ids) -> torch.Tensor:
        """dense float32 [B, 13], ids int64 [B, 26] (or what ``embeddings`` takes) -> click logits [B]."""
        finish = self.embeddings.start(ids)  # sharded tables' vectors travel between the ranks meanwhile
        x = self.bottom(dense)
        embedded = finish()
        features = dot_interaction(x, embedded, self.embeddings.tables, self.top[0].in_features, self.kernel)
        return self.top(features).squeeze(1)
