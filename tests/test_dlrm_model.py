"""The DLRM model: interaction math and its hand-written gradient, shapes, sparse gradients, initialisation."""

import math

import pytest
import torch

from bench.config import NUM_DENSE, NUM_SPARSE, ModelConfig
from dlrm.model import DLRM, EmbeddingTables, dot_interaction, interaction_size, top_input_size

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
    fast = dot_interaction(bottom, torch.stack(embeddings, dim=1))
    assert fast.shape == (3, 4 + 27 * 26 // 2) == (3, interaction_size(NUM_SPARSE, 4))
    torch.testing.assert_close(fast, naive_interaction(bottom, embeddings))


def test_interaction_gradient_is_the_derivative():
    """The one-bmm backward (dT = (dZ + dZᵀ) T) against numerical differentiation."""
    torch.manual_seed(0)
    bottom = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    embedded = torch.randn(2, NUM_SPARSE, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dot_interaction, (bottom, embedded))


def test_interaction_padded_to_a_width_ends_in_zeros_with_the_same_gradient():
    """The top MLP's input is padded to a multiple of 16 (415 -> 416 in the small profile): the
    extra columns are zero and their upstream gradient reaches no input."""
    torch.manual_seed(0)
    bottom = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    embedded = torch.randn(3, NUM_SPARSE, 4, dtype=torch.float64, requires_grad=True)
    size = interaction_size(NUM_SPARSE, 4)
    assert (size, top_input_size(NUM_SPARSE, 4), top_input_size(NUM_SPARSE, 64)) == (355, 368, 416)
    plain, padded = dot_interaction(bottom, embedded), dot_interaction(bottom, embedded, width=size + 13)
    assert padded.shape == (3, size + 13)
    torch.testing.assert_close(padded[:, :size], plain)
    assert torch.count_nonzero(padded[:, size:]) == 0
    grad = torch.randn(3, size + 13, dtype=torch.float64)
    want = torch.autograd.grad(plain, (bottom, embedded), grad[:, :size])
    for got, expected in zip(torch.autograd.grad(padded, (bottom, embedded), grad), want):
        torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="more than the width"):
        dot_interaction(bottom, embedded, width=size - 1)


def test_interaction_of_blocks_in_any_table_order():
    """Vectors handed over in blocks and out of table order (as sharded tables deliver them) give
    the same features, and the same gradients, as all 26 in table order."""
    torch.manual_seed(0)
    bottom = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    embedded = torch.randn(5, NUM_SPARSE, 4, dtype=torch.float64, requires_grad=True)
    order = torch.randperm(NUM_SPARSE).tolist()
    shuffled = embedded[:, order]
    blocks = [shuffled[:, :10], shuffled[:, 10:]]
    grad = torch.randn(5, interaction_size(NUM_SPARSE, 4), dtype=torch.float64)
    reference = dot_interaction(bottom, embedded)
    expected = torch.autograd.grad(reference, (bottom, embedded), grad)
    result = dot_interaction(bottom, blocks, tables=order)
    torch.testing.assert_close(result, reference)
    for got, want in zip(torch.autograd.grad(result, (bottom, embedded), grad), expected):
        torch.testing.assert_close(got, want)


def test_interaction_under_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(0)
    bottom, embedded = torch.randn(8, 16), torch.randn(8, NUM_SPARSE, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = dot_interaction(bottom.bfloat16(), embedded)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), dot_interaction(bottom, embedded), atol=0.3, rtol=0.03)


def batch(rows: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    dense = torch.rand(rows, NUM_DENSE)
    ids = torch.stack([torch.randint(0, size, (rows,)) for size in VOCAB], dim=1)
    return dense, ids


def test_model_outputs_one_logit_per_row():
    model = DLRM(VOCAB, CFG)
    dense, ids = batch()
    assert model(dense, ids).shape == (6,)
    assert model.embeddings.rows == VOCAB and model.embeddings.weight.shape == (sum(VOCAB), 4)
    # The top MLP reads the bottom output plus 351 pairwise products, padded to a multiple of 16.
    assert model.top[0].in_features == 368 == -(-(4 + 351) // 16) * 16


def test_model_accepts_column_major_ids():
    """The loader hands ids as a transposed [26, b] array; the result must not depend on layout."""
    model = DLRM(VOCAB, CFG)
    dense, ids = batch()
    transposed = ids.T.contiguous().T
    assert not transposed.is_contiguous()
    torch.testing.assert_close(model(dense, ids), model(dense, transposed))


def test_first_bottom_layer_is_stored_column_major_and_computes_the_same():
    model = DLRM(VOCAB, CFG)
    layer = model.bottom[0]
    assert layer.weight.shape == (8, NUM_DENSE) and layer.weight.stride() == (1, 8)
    dense = torch.randn(6, NUM_DENSE)
    grad = torch.randn(6, 8)
    layer(dense).backward(grad)
    torch.testing.assert_close(layer(dense), dense @ layer.weight.detach().contiguous().T + layer.bias.detach())
    torch.testing.assert_close(layer.weight.grad, grad.T @ dense)
    # Saved and loaded through a state dict, it stays the same function.
    copy = DLRM(VOCAB, CFG)
    copy.load_state_dict(model.state_dict())
    torch.testing.assert_close(copy.bottom[0](dense), layer(dense))


def test_only_touched_embedding_rows_get_gradients():
    model = DLRM(VOCAB, CFG)
    dense, ids = batch()
    model(dense, ids).sum().backward()
    (weight,) = model.embedding_parameters()
    assert weight.grad.is_sparse
    starts = [sum(VOCAB[:c]) for c in range(NUM_SPARSE)]  # table c's row j is row starts[c] + j
    touched = weight.grad.coalesce().indices()[0].tolist()
    assert touched == sorted({starts[c] + i for c in range(NUM_SPARSE) for i in ids[:, c].tolist()})
    assert all(not p.grad.is_sparse for p in model.dense_parameters())


def test_dense_gradient_tables_match_sparse_ones():
    torch.manual_seed(0)
    sparse, dense = EmbeddingTables([0, 1], [5, 7], 3), EmbeddingTables([0, 1], [5, 7], 3, sparse=False)
    sparse.reset_parameters([1, 2])  # (a new table's weight is uninitialised memory, possibly NaN)
    dense.weight.data.copy_(sparse.weight.data)
    ids = torch.tensor([[0, 6], [4, 6], [0, 1]])
    grad = torch.randn(3, 2, 3)
    torch.testing.assert_close(dense(ids), sparse(ids))
    dense(ids).backward(grad)
    sparse(ids).backward(grad)
    assert not dense.weight.grad.is_sparse
    torch.testing.assert_close(dense.weight.grad, sparse.weight.grad.to_dense())


def test_a_table_starts_the_same_whichever_group_holds_it():
    """Each table is initialised from its own generator: a rank holding tables 3 and 7 has
    exactly the full model's tables 3 and 7 (the sharded model and the whole one agree)."""
    torch.manual_seed(0)
    full = DLRM(VOCAB, CFG)
    torch.manual_seed(0)
    part = DLRM(VOCAB, CFG, embeddings=EmbeddingTables([3, 7], [VOCAB[3], VOCAB[7]], 4))
    torch.testing.assert_close(part.embeddings.table(0), full.embeddings.table(3))
    torch.testing.assert_close(part.embeddings.table(1), full.embeddings.table(7))
    torch.testing.assert_close(part.top[0].weight, full.top[0].weight)  # the MLPs too


def test_parameter_groups_cover_the_model_once():
    model = DLRM(VOCAB, CFG)
    grouped = [*model.embedding_parameters(), *model.dense_parameters()]
    assert len({id(p) for p in grouped}) == len(grouped) == len(list(model.parameters()))


def test_initialisation_follows_the_reference():
    torch.manual_seed(0)
    model = DLRM([10_000] * NUM_SPARSE, ModelConfig(embedding_dim=64, bottom_mlp=[512, 64], top_mlp=[512, 1]))
    table = model.embeddings.table(0)
    assert table.abs().max() <= math.sqrt(1 / 10_000)
    assert table.abs().max() > 0.9 * math.sqrt(1 / 10_000)  # uniform over the whole range
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
