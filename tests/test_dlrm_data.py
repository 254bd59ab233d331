"""Batches for one rank: exact row arithmetic for training and evaluation, dtypes and shapes.

``write_processed`` builds a small training-ready dataset (the layout's files,
written directly) for these tests and the end-to-end test.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.config import NUM_DENSE, NUM_SPARSE
from dlrm import data
from preprocess.layout import MANIFEST, ProcessedData, cat_name, id_dtype

# Column 0 is the learnable one; 300 needs uint16 ids, the others fit uint8.
VOCAB = [50, 300] + [7 + c for c in range(NUM_SPARSE - 2)]


def write_processed(root: Path, rows: dict[str, int], seed: int = 0, tag_rows: bool = False) -> Path:
    """A learnable dataset: the click probability depends on the parity of the column-0 id.

    ``tag_rows``: dense column 0 holds the row's index, so tests can see which rows they got
    (not for training: a feature that large swamps the others).
    """
    rng = np.random.default_rng(seed)
    for split, n in rows.items():
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        cats = [rng.integers(0, size, n).astype(id_dtype(size)) for size in VOCAB]
        dense = np.log1p(rng.exponential(3.0, (n, NUM_DENSE))).astype(np.float32)
        if tag_rows:
            dense[:, 0] = np.arange(n)
        p_click = np.where(cats[0] % 2 == 0, 0.85, 0.15)
        np.save(folder / "label.npy", (rng.random(n) < p_click).astype(np.uint8))
        np.save(folder / "dense.npy", dense)
        for c in range(NUM_SPARSE):
            np.save(folder / f"{cat_name(c)}.npy", cats[c])
    (root / MANIFEST).write_text(json.dumps({"vocab_sizes": VOCAB, "rows": rows}))
    return root


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> Path:
    return write_processed(tmp_path_factory.mktemp("processed"), {"train": 1000, "test": 103, "val": 50},
                           tag_rows=True)


def row_ids(batch: data.Batch) -> list[int]:
    return batch.dense[:, 0].long().tolist()


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_every_test_row_is_read_exactly_once_across_ranks(processed, world_size):
    split = ProcessedData(processed, "test")
    seen = []
    for rank in range(world_size):
        shard = [r for b in data.eval_batches(split, 10, rank, world_size) for r in row_ids(b)]
        assert shard == list(range(shard[0], shard[0] + len(shard)))  # contiguous, in order
        seen += shard
    assert seen == list(range(103))


def test_shards_differ_by_at_most_one_row():
    sizes = [stop - start for start, stop in (data.shard_range(103, r, 4) for r in range(4))]
    assert sizes == [26, 26, 26, 25]
    assert data.shard_range(2, 3, 4) == (2, 2)  # more ranks than rows: empty shards, no overlap


def test_training_rows_of_rank_r_at_step_i(processed):
    split = ProcessedData(processed, "train")
    global_batch, world_size = 96, 3  # 1000 rows -> 10 full global batches, 40 rows dropped
    per_rank = [list(data.train_batches(split, global_batch, rank, world_size, epochs=2)) for rank in range(3)]
    assert all(len(batches) == 2 * 10 for batches in per_rank)
    for rank, batches in enumerate(per_rank):
        for index, batch in enumerate(batches):
            step = index % 10
            start = step * global_batch + rank * 32
            assert row_ids(batch) == list(range(start, start + 32))
    # Each epoch covers the first 960 rows exactly once across ranks.
    epoch = sorted(r for batches in per_rank for batch in batches[:10] for r in row_ids(batch))
    assert epoch == list(range(960))


def test_a_resumed_stream_continues_where_it_stopped(processed):
    split = ProcessedData(processed, "train")
    full = [row_ids(b) for b in data.train_batches(split, 96, 1, 3, epochs=2)]
    for start in (0, 7, 10, 13, 20):  # within the first epoch, at its end, within the second, at the end
        assert [row_ids(b) for b in data.train_batches(split, 96, 1, 3, epochs=2, start=start)] == full[start:]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_evaluation_on_a_prefix_of_the_split(processed, world_size):
    split = ProcessedData(processed, "test")
    for rows, expected in ((40, 40), (103, 103), (500, 103)):  # more rows than the split: the whole split
        seen = [r for rank in range(world_size) for b in data.eval_batches(split, 10, rank, world_size, rows)
                for r in row_ids(b)]
        assert seen == list(range(expected))


def test_global_batch_must_split_evenly():
    with pytest.raises(ValueError, match="does not split evenly"):
        data.local_batch_size(100, 3)


def test_batch_tensors_match_the_files(processed):
    split = ProcessedData(processed, "val")
    batch = data.read_batch(split, (5, 17))
    assert batch.dense.dtype == torch.float32 and batch.dense.shape == (12, NUM_DENSE)
    assert batch.ids.dtype == torch.int64 and batch.ids.shape == (12, NUM_SPARSE)
    assert batch.labels.dtype == torch.float32 and batch.labels.shape == (12,)
    np.testing.assert_array_equal(batch.dense.numpy(), np.load(processed / "val" / "dense.npy")[5:17])
    np.testing.assert_array_equal(batch.labels.numpy(), np.load(processed / "val" / "label.npy")[5:17])
    for c in (0, 1, 25):
        np.testing.assert_array_equal(batch.ids[:, c].numpy(), np.load(processed / "val" / f"{cat_name(c)}.npy")[5:17])
        assert batch.ids[:, c].is_contiguous()  # what each embedding table reads


def test_batches_do_not_share_memory(processed):
    split = ProcessedData(processed, "val")
    first, second = list(data.eval_batches(split, 25, 0, 1))
    assert not torch.equal(first.ids, second.ids)
    assert row_ids(first) == list(range(25))  # still intact after the second batch was read


# --- sharded tables: what each rank reads -----------------------------------------------------------

def three_rank_plan():
    from dlrm.sharding import plan_tables

    # The 8 tables of >= 25 rows are sharded (300 rows -> rank 0, 50 -> rank 1, ...), the rest replicated.
    return plan_tables(VOCAB, world_size=3, shard_min_rows=25, local_batch=32)


def test_sharded_training_batches_read_owned_tables_for_the_whole_global_batch(processed):
    split = ProcessedData(processed, "train")
    plan = three_rank_plan()
    cats = [np.load(processed / "train" / f"{cat_name(c)}.npy") for c in range(NUM_SPARSE)]
    for rank in range(3):
        batches = list(data.train_batches(split, 96, rank, 3, plan=plan))
        assert len(batches) == 10
        step = 4
        dense, ids, _ = batches[step]
        own = (step * 96 + rank * 32, step * 96 + (rank + 1) * 32)
        assert row_ids(batches[step]) == list(range(*own))  # dense and labels: this rank's rows only
        assert ids.batch_sizes == (32, 32, 32)
        assert ids.replicated.shape == (32, len(plan.replicated)) and ids.owned.shape == (96, len(plan.owned(rank)))
        for i, table in enumerate(plan.replicated):
            np.testing.assert_array_equal(ids.replicated[:, i].numpy(), cats[table][own[0]:own[1]])
        for i, table in enumerate(plan.owned(rank)):  # every rank's rows of the global batch, in rank order
            np.testing.assert_array_equal(ids.owned[:, i].numpy(), cats[table][step * 96:(step + 1) * 96])


def test_sharded_evaluation_steps_all_ranks_together(processed):
    """103 test rows on 3 ranks in batches of 10: shards of 35, 34, 34 rows, 4 batches each; each
    rank's owned ids cover every rank's batch of the same step."""
    split = ProcessedData(processed, "test")
    plan = three_rank_plan()
    per_rank = [list(data.eval_batches(split, 10, rank, 3, plan=plan)) for rank in range(3)]
    assert [len(b) for b in per_rank] == [4, 4, 4]
    assert [r for batches in per_rank for b in batches for r in row_ids(b)] == list(range(103))
    last = [batches[-1].ids.batch_sizes for batches in per_rank]
    assert last == [(5, 4, 4)] * 3  # everyone knows everyone's batch size
    owned = per_rank[0][-1].ids.owned  # rank 0's tables, for rows 30-34, 65-68 and 99-102
    table = plan.owned(0)[0]
    expected = np.load(processed / "test" / f"{cat_name(table)}.npy")[[*range(30, 35), *range(65, 69), *range(99, 103)]]
    np.testing.assert_array_equal(owned[:, 0].numpy(), expected)


def test_a_rank_past_the_end_of_its_shard_reads_empty_batches(processed):
    split = ProcessedData(processed, "test")
    plan = three_rank_plan()
    # 22 rows on 3 ranks in batches of 7: shards of 8, 7, 7 rows, so rank 0 has 2 batches, the others 1.
    per_rank = [list(data.eval_batches(split, 7, rank, 3, rows=22, plan=plan)) for rank in range(3)]
    assert [len(b) for b in per_rank] == [2, 2, 2]
    assert [len(b.labels) for b in per_rank[1]] == [7, 0]  # an empty batch keeps it in step
    assert per_rank[1][1].ids.batch_sizes == (1, 0, 0)
