"""Hybrid parallelism: the sharding plan, the sharded tables in one process, the fused Adagrad, and
the real thing - 2 ranks with sharded tables follow the same loss trajectory as 1 rank."""

import json

import numpy as np
import pytest
import torch

from bench.config import NUM_SPARSE, ModelConfig
from dlrm import dist, train
from dlrm.model import DLRM
from dlrm.optim import SparseOptimizer
from dlrm.sharding import ShardedEmbeddings, ShardedIds, plan_tables
from tests.test_dlrm_data import VOCAB, write_processed

CFG = ModelConfig(embedding_dim=4, bottom_mlp=[8, 4], top_mlp=[8, 1])


# --- the plan ---------------------------------------------------------------------------------------

def test_large_tables_are_spread_over_the_ranks_by_rows():
    sizes = [1000, 5, 800, 700, 9, 100, 650]
    plan = plan_tables(sizes, world_size=2, shard_min_rows=100, local_batch=64)
    # Largest first onto the rank with fewest rows: 1000 -> 0, 800 -> 1, 700 -> 1 (800 < 1000),
    # 650 -> 0 (1000 < 1500), 100 -> 1 (1500 < 1650).
    assert plan.owned(0) == [0, 6] and plan.owned(1) == [2, 3, 5]
    assert plan.replicated == [1, 4] and plan.any_sharded
    assert plan.concatenated() == [1, 4, 0, 6, 2, 3, 5]
    described = plan.describe()
    assert described["ranks"] == [{"rank": 0, "tables": [0, 6], "rows": 1650},
                                  {"rank": 1, "tables": [2, 3, 5], "rows": 1600}]
    assert described["replicated_tables"] == [1, 4] and described["replicated_rows"] == 14


def test_threshold_zero_replicates_everything():
    plan = plan_tables(VOCAB, world_size=4, shard_min_rows=0, local_batch=8)
    assert plan.replicated == list(range(NUM_SPARSE)) and not plan.any_sharded
    assert all(plan.owned(r) == [] for r in range(4))


def test_more_ranks_than_large_tables_leaves_some_ranks_without():
    plan = plan_tables([500, 400, 3], world_size=4, shard_min_rows=100, local_batch=8)
    assert [plan.owned(r) for r in range(4)] == [[0], [1], [], []]


def test_replicated_gradients_are_dense_only_for_tables_a_batch_mostly_touches():
    # 20 replicated rows: dense when one rank's batch looks up at least as many (rows <= b * tables).
    assert plan_tables([10, 10, 1000], 2, 100, local_batch=10).replicated_dense
    assert not plan_tables([10, 10, 1000], 2, 100, local_batch=9).replicated_dense
    assert plan_tables([10, 10, 1000], 2, 100, local_batch=9).describe()["replicated_gradients"] == "sparse"


# --- the fused Adagrad ------------------------------------------------------------------------------

def adagrad_pair(rows: int = 12, dim: int = 3) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(rows, dim))
    return a, torch.nn.Parameter(a.detach().clone())


@pytest.mark.parametrize("coalesced", [False, True])
def test_sparse_adagrad_is_torch_adagrad(coalesced):
    torch.sparse.check_sparse_tensor_invariants.disable()  # the default, made explicit (as dlrm.train does)
    ours, theirs = adagrad_pair()
    mine, reference = SparseOptimizer([ours], lr=0.1), torch.optim.Adagrad([theirs], lr=0.1)
    for step in range(3):
        ids = torch.tensor([[1, 5, 1, 11, 5, 1][step:]])  # repeated ids, as a batch has them
        grad = torch.sparse_coo_tensor(ids, torch.randn(ids.shape[1], 3), (12, 3))
        ours.grad = grad.coalesce() if coalesced else grad
        theirs.grad = grad
        mine.step()
        reference.step()
        torch.testing.assert_close(ours.detach(), theirs.detach())
    torch.testing.assert_close(mine.state_sum(ours), reference.state[theirs]["sum"])
    assert torch.equal(ours[[0, 2, 3]], theirs[[0, 2, 3]])  # never touched: never moved


@pytest.mark.parametrize("grad_layout", ["same", "transposed"])
def test_dense_gradients_leave_untouched_rows_alone(grad_layout):
    """Dense gradients go through torch's fused Adagrad, which walks the tensors' memory in order:
    a gradient laid out unlike its weight takes the unfused path, with the same result."""
    ours, theirs = adagrad_pair()
    mine, reference = SparseOptimizer([ours], lr=0.1), torch.optim.Adagrad([theirs], lr=0.1)
    for step in range(3):
        grad = torch.zeros(12, 3)
        grad[[2, 7]] = torch.randn(2, 3)
        ours.grad, theirs.grad = grad, grad.clone()
        if grad_layout == "transposed":
            ours.grad = grad.t().contiguous().t()
        mine.step()
        reference.step()
    torch.testing.assert_close(ours.detach(), theirs.detach())
    untouched = [r for r in range(12) if r not in (2, 7)]
    assert torch.equal(ours.detach()[untouched], theirs.detach()[untouched])


# --- sharded tables in one process ------------------------------------------------------------------

@pytest.fixture
def one_rank_group():
    dist.init(dist.RankInfo(0, 1, 0, 1), "gloo")
    yield
    dist.finish()


def sharded_ids(plan, ids: torch.Tensor) -> ShardedIds:
    return ShardedIds(ids[:, plan.replicated], ids[:, plan.owned(0)], (len(ids),))


def test_one_rank_with_sharded_tables_is_the_whole_model(one_rank_group):
    plan = plan_tables(VOCAB, world_size=1, shard_min_rows=25, local_batch=6)
    torch.manual_seed(0)
    whole = DLRM(VOCAB, CFG)
    torch.manual_seed(0)
    sharded = DLRM(VOCAB, CFG, ShardedEmbeddings(plan, 0, CFG.embedding_dim))
    torch.manual_seed(1)
    dense = torch.rand(6, 13)
    ids = torch.stack([torch.randint(0, size, (6,)) for size in VOCAB], dim=1)
    torch.testing.assert_close(sharded(dense, sharded_ids(plan, ids)), whole(dense, ids))
    # Gathered, the sharded model's tables are the whole model's; split, they go back.
    state = train.full_state_dict(sharded)
    assert state.keys() == whole.state_dict().keys()
    torch.testing.assert_close(state["embeddings.weight"], whole.embeddings.weight.detach())
    tables = sharded.embeddings
    replicated, local = tables.split(state["embeddings.weight"])
    assert torch.equal(replicated, tables.replicated.weight) and torch.equal(local, tables.local.weight)


# --- 2 ranks against 1 ------------------------------------------------------------------------------

ROWS = {"train": 16384, "test": 2001, "val": 10}  # 32 steps of the tiny profile's 512 rows
SHARDED = ["train.shard_min_rows=25", "train.checkpoint_every_steps=32"]  # 8 tables sharded; the losses saved


@pytest.mark.integration
def test_two_ranks_with_sharded_tables_follow_one_rank(tmp_path):
    """Same global batches, same initial model: the per-step loss (2 ranks: the mean of their halves),
    the final model and its AUC must agree up to float rounding."""
    from tests.test_dlrm_end_to_end import train_run

    processed = write_processed(tmp_path / "processed", ROWS)
    one = train_run(tmp_path / "one", processed, SHARDED, ranks=1)
    two = train_run(tmp_path / "two", processed, SHARDED, ranks=2)
    plan = two["result"]["sharding"]
    # Balanced by rows: the 300-row table on rank 0, the seven of 25-50 rows (215 together) on rank 1.
    assert [r["tables"] for r in plan["ranks"]] == [[1], [0, 20, 21, 22, 23, 24, 25]]
    assert len(plan["replicated_tables"]) == 18
    assert plan["replicated_gradients"] == "dense"
    losses = [torch.load(run["dir"] / "checkpoint.pt", weights_only=True)["per_rank"] for run in (one, two)]
    single = losses[0][0]["losses"].numpy()
    mean_of_two = (losses[1][0]["losses"].numpy() + losses[1][1]["losses"].numpy()) / 2
    assert len(single) == len(mean_of_two) == 32 and single[-1] < single[0]  # it learns
    np.testing.assert_allclose(mean_of_two, single, rtol=0, atol=2e-5)
    a, b = (torch.load(run["dir"] / "model.pt", weights_only=True)["state_dict"] for run in (one, two))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-4, msg=name)
    assert two["result"]["auc"] == pytest.approx(one["result"]["auc"], abs=1e-4)
    assert two["result"]["test_rows"] == one["result"]["test_rows"] == ROWS["test"]


@pytest.mark.integration
def test_sparse_replicated_tables_follow_one_rank_too(tmp_path):
    """A global batch of 16 makes the replicated tables' gradients sparse (8 rows per rank look up
    fewer than their rows): the sparse all-reduce path, against 1 rank, over 64 steps."""
    from tests.test_dlrm_end_to_end import train_run

    processed = write_processed(tmp_path / "processed", {"train": 1024, "test": 500, "val": 10})
    overrides = ["train.batch_size=16", "train.shard_min_rows=100", "train.checkpoint_every_steps=64"]
    one = train_run(tmp_path / "one", processed, overrides, ranks=1)
    two = train_run(tmp_path / "two", processed, overrides, ranks=2)
    assert two["result"]["sharding"]["replicated_gradients"] == "sparse"
    losses = [torch.load(run["dir"] / "checkpoint.pt", weights_only=True)["per_rank"] for run in (one, two)]
    mean_of_two = (losses[1][0]["losses"].numpy() + losses[1][1]["losses"].numpy()) / 2
    np.testing.assert_allclose(mean_of_two, losses[0][0]["losses"].numpy(), rtol=0, atol=2e-5)
    assert json.loads((two["dir"] / "train.json").read_text())["auc"] == pytest.approx(one["result"]["auc"], abs=1e-4)


def test_an_exchange_of_the_wrong_number_of_ids_says_so():
    """Ids for 2 rows where the batch sizes make 3: an error before anything is sent (an exchange
    writing into its send buffer in place would otherwise send the buffer's stale third row)."""
    from dlrm.sharding import Exchange

    exchange = Exchange(batch_sizes=(3,), tables_per_rank=(1,), rank=0)
    with pytest.raises(ValueError, match=r"\(2, 1\) ids to look up, where the batch sizes \(3,\) and this "
                                         r"rank's 1 tables make 3"):
        exchange.start(torch.randn(10, 4), torch.tensor([[1], [2]]))
