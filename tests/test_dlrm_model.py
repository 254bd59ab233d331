"""The DLRM model: interaction math, shapes, sparse gradients, initialisation."""

import math

import pytest
import torch

from bench.config import NUM_DENSE, NUM_SPARSE, ModelConfig
from dlrm.model import DLRM, dot_interaction, interaction_size

CFG = ModelConfig(embedding_dim=4, bottom_mlp=[8, 4], top_mlp=[8, 1])
VOCAB = [5 + c for c in range(NUM_SPARSE)]


def naive_interaction(bottom: torch.Tensor, embeddings: list[torch.Tensor]) -> torch.Tensor:
    """The definition, one dot product at a time: pairs (i, j) with j < i, row by row."""
    vectors = [bottom, *embeddings]
    rows = []
    for b in range(bottom.shape[0]):
        dots = [torch.dot(vectors[i][b], vectors[j][b]) for i in range(len(vectors)) for j in range(i)]
        rows.append(torch.cat([bottom[b], torch.stack(dots)]))
    return torch.stack(rows)


def test_interaction_matches_the_double_loop():
    torch.manual_seed(0)
    bottom = torch.randn(3, 4, dtype=torch.float64)
    embeddings = [torch.randn(3, 4, dtype=torch.float64) for _ in range(NUM_SPARSE)]
    fast = dot_interaction(bottom, embeddings)
    assert fast.shape == (3, 4 + 27 * 26 // 2) == (3, interaction_size(NUM_SPARSE, 4))
    torch.testing.assert_close(fast, naive_interaction(bottom, embeddings))


def batch(rows: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    dense = torch.rand(rows, NUM_DENSE)
    ids = torch.stack([torch.randint(0, size, (rows,)) for size in VOCAB], dim=1)
    return dense, ids


def test_model_outputs_one_logit_per_row():
    model = DLRM(VOCAB, CFG)
    dense, ids = batch()
    assert model(dense, ids).shape == (6,)
    assert len(model.embeddings) == NUM_SPARSE
    assert [e.num_embeddings for e in model.embeddings] == VOCAB
    # The top MLP reads the bottom output plus 351 pairwise products.
    assert model.top[0].in_features == 4 + 351


def test_model_accepts_column_major_ids():
    """The loader hands ids as a transposed [26, b] array; the result must not depend on layout."""
    model = DLRM(VOCAB, CFG)
    dense, ids = batch()
    transposed = ids.T.contiguous().T
    assert not transposed.is_contiguous()
    torch.testing.assert_close(model(dense, ids), model(dense, transposed))


def test_only_touched_embedding_rows_get_gradients():
    model = DLRM(VOCAB, CFG)
    dense, ids = batch()
    model(dense, ids).sum().backward()
    for c, weight in enumerate(model.embedding_parameters()):
        assert weight.grad.is_sparse
        touched = weight.grad.coalesce().indices()[0]
        assert touched.tolist() == sorted(set(ids[:, c].tolist()))
    assert all(not p.grad.is_sparse for p in model.dense_parameters())


def test_parameter_groups_cover_the_model_once():
    model = DLRM(VOCAB, CFG)
    grouped = [*model.embedding_parameters(), *model.dense_parameters()]
    assert len({id(p) for p in grouped}) == len(grouped) == len(list(model.parameters()))


def test_initialisation_follows_the_reference():
    torch.manual_seed(0)
    model = DLRM([10_000] * NUM_SPARSE, ModelConfig(embedding_dim=64, bottom_mlp=[512, 64], top_mlp=[512, 1]))
    table = model.embeddings[0].weight
    assert table.abs().max() <= math.sqrt(1 / 10_000)
    first = model.bottom[0].weight  # [512, 13]
    assert first.std().item() == pytest.approx(math.sqrt(2 / (13 + 512)), rel=0.1)
    assert isinstance(model.bottom[-1], torch.nn.ReLU)  # bottom output is ReLU'd like the reference
    assert isinstance(model.top[-1], torch.nn.Linear)  # top ends in the raw logit


def test_same_seed_same_model():
    torch.manual_seed(3)
    a = DLRM(VOCAB, CFG)
    torch.manual_seed(3)
    b = DLRM(VOCAB, CFG)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
