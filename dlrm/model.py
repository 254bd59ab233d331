"""DLRM (Naumov et al., 2019): the click model being benchmarked.

    dense [B, 13] ──> bottom MLP ──> x [B, d] ─┐
    ids   [B, 26] ──> 26 embedding tables ──> e_1..e_26 [B, d] ─┤
                                                               ├─> dot interaction ─> top MLP ─> logit [B]
    T = stack(x, e_1..e_26)            [B, 27, d]
    Z = T Tᵀ                           [B, 27, 27]   every pairwise dot product
    features = cat(x, tril(Z, -1))     [B, d + 351]  each pair once, no self-products

Embedding tables produce *sparse* gradients (only the rows a batch touched),
so the optimizer and the all-reduce only move those rows, as in the reference.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bench.config import NUM_DENSE, ModelConfig


def mlp(in_features: int, sizes: list[int], relu_last: bool) -> nn.Sequential:
    """Linear layers of the given output sizes with ReLU between (and after the last if asked)."""
    layers: list[nn.Module] = []
    for i, out_features in enumerate(sizes):
        layers.append(nn.Linear(in_features, out_features))
        if i < len(sizes) - 1 or relu_last:
            layers.append(nn.ReLU())
        in_features = out_features
    return nn.Sequential(*layers)


def dot_interaction(bottom: torch.Tensor, embeddings: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate the bottom output with the pairwise dot products of all 27 feature vectors.

    bottom [B, d], embeddings 26 x [B, d] -> [B, d + 27*26/2].
    """
    t = torch.stack([bottom, *embeddings], dim=1)  # [B, F, d]
    z = torch.bmm(t, t.transpose(1, 2))  # [B, F, F], symmetric
    num_features = t.shape[1]
    # Strictly lower triangle: each unordered pair once; the diagonal (|v|²) is left out.
    rows, cols = torch.tril_indices(num_features, num_features, offset=-1, device=t.device)
    return torch.cat([bottom, z[:, rows, cols]], dim=1)


def interaction_size(num_sparse: int, dim: int) -> int:
    num_features = num_sparse + 1
    return dim + num_features * (num_features - 1) // 2


class DLRM(nn.Module):
    def __init__(self, vocab_sizes: list[int], cfg: ModelConfig):
        super().__init__()
        dim = cfg.embedding_dim
        self.vocab_sizes = list(vocab_sizes)
        # The bottom output is one of the interacting vectors, so it ends in ReLU like the reference.
        self.bottom = mlp(NUM_DENSE, cfg.bottom_mlp, relu_last=True)
        # One id per row per table: an EmbeddingBag over bags of size 1 is a lookup,
        # and mode="sum" with sparse=True is the reference's fast sparse-gradient path.
        self.embeddings = nn.ModuleList(
            nn.EmbeddingBag(size, dim, mode="sum", sparse=True) for size in self.vocab_sizes
        )
        # The last top layer stays linear: it outputs the logit, BCEWithLogits applies the sigmoid.
        self.top = mlp(interaction_size(len(self.vocab_sizes), dim), cfg.top_mlp, relu_last=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise like the reference DLRM (dlrm_s_pytorch.py)."""
        for emb in self.embeddings:
            bound = math.sqrt(1.0 / emb.num_embeddings)
            emb.weight.uniform_(-bound, bound)
        for layer in [*self.bottom, *self.top]:
            if isinstance(layer, nn.Linear):
                fan_out, fan_in = layer.weight.shape
                layer.weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)))
                layer.bias.normal_(0.0, math.sqrt(1.0 / fan_out))

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The sparse-gradient parameters (one table each)."""
        return [emb.weight for emb in self.embeddings]

    def dense_parameters(self) -> list[nn.Parameter]:
        return [*self.bottom.parameters(), *self.top.parameters()]

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """dense float32 [B, 13], ids int64 [B, 26] -> click logits [B]."""
        x = self.bottom(dense)
        # Every bag holds exactly one id, so bag b starts at offset b.
        offsets = torch.arange(ids.shape[0], dtype=ids.dtype, device=ids.device)
        embedded = [emb(ids[:, c], offsets) for c, emb in enumerate(self.embeddings)]
        return self.top(dot_interaction(x, embedded)).squeeze(1)
