"""Vocabularies (preprocess/vocab.py) without Spark: partial counts, kept files, ranking, lookup tables."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from preprocess import vocab
from preprocess.layout import id_dtype


def _ranked_by_hand(values: np.ndarray, counts: np.ndarray) -> list[int]:
    return [int(v) for v, _ in sorted(zip(values.tolist(), counts.tolist()), key=lambda vc: (-vc[1], vc[0]))]


@pytest.mark.parametrize("buckets", [1, 7, 70_000])  # 70k: past the 16-bit radix sort
def test_count_blobs_hold_each_buckets_keys_and_counts(buckets):
    rng = np.random.default_rng(0)
    keys = np.unique((rng.integers(0, 26, 5000) << 32) | rng.integers(0, 1 << 32, 5000))
    counts = rng.integers(1, 100, len(keys))
    batch = vocab.count_blobs(keys, counts, buckets)
    expected = vocab.bucket_of(keys, buckets)
    present = batch.column(0).to_pylist()
    assert present == sorted(set(expected.tolist()))
    for b, k, c in zip(present, batch.column(1).to_pylist(), batch.column(2).to_pylist()):
        mine = expected == b
        assert np.frombuffer(k, np.int64).tolist() == keys[mine].tolist()
        assert np.frombuffer(c, np.int64).tolist() == counts[mine].tolist()
    assert vocab.count_blobs(keys[:0], counts[:0], buckets).num_rows == 0


def test_kept_pairs_are_read_back_per_column(tmp_path):
    keys = np.array([(0 << 32) | 5, (0 << 32) | 9, (3 << 32) | 0xFFFFFFFF, (25 << 32) | 1], np.int64)
    counts = np.array([4, 2, 7, 1], np.int64)
    a = vocab.save_kept(str(tmp_path / "a.bin"), keys, counts)
    b = vocab.save_kept(str(tmp_path / "b.bin"), keys[1:2] + 1, counts[1:2])
    assert [j for j, _ in a] == [0, 3, 25] and [j for j, _ in b] == [0]
    pairs = vocab.read_kept([a[0][1], b[0][1]])
    assert pairs.tolist() == [[5, 4], [9, 2], [10, 2]]
    assert vocab.read_kept([a[1][1]]).tolist() == [[(3 << 32) | 0xFFFFFFFF, 7]]
    assert vocab.read_kept([]).shape == (0, 2)


def test_ranking_is_by_descending_count_then_value_on_both_sort_paths():
    rng = np.random.default_rng(1)
    values = rng.choice(1 << 32, 3000, replace=False).astype(np.int64)
    counts = rng.integers(1, 5, 3000)  # many ties
    pairs = np.stack([(7 << 32) | values, counts], axis=1)
    assert vocab.rank_values(pairs).tolist() == _ranked_by_hand(values, counts)
    # a count of 2^31 or more beside 32-bit values does not fit one packed int64 key: the two-key sort gives the
    # same order
    counts[0] = 3 << 30
    pairs = np.stack([(7 << 32) | values, counts], axis=1)
    ranked = vocab.rank_values(pairs)
    assert ranked.tolist() == _ranked_by_hand(values, counts) and ranked[0] == values[0]
    assert ranked.dtype == np.int64 and vocab.rank_values(pairs[:0]).shape == (0,)


def _queries(values: np.ndarray, rng) -> tuple[pa.ChunkedArray, list[int | None]]:
    """Known and unknown values, some missing, in two chunks; and each one's value (None: missing)."""
    picks = np.concatenate([values[rng.integers(0, len(values), 4000)], rng.integers(0, 1 << 32, 1000)])
    picks = np.concatenate([picks, [0, 0xFFFFFFFF]]).astype(np.uint32)
    missing = rng.random(len(picks)) < 0.1
    array = pa.array(picks, mask=missing)
    return pa.chunked_array([array[:1234], array[1234:]]), [None if m else int(v) for v, m in zip(picks, missing)]


@pytest.mark.parametrize("n", [1, 300, 5000])
def test_hashed_and_direct_lookups_give_each_value_its_id(tmp_path, n):
    rng = np.random.default_rng(n)
    values = np.concatenate([[0, 0xFFFFFFFF], rng.choice(1 << 32, n, replace=False)])[:n].astype(np.int64)
    ids = {int(v): i + 1 for i, v in enumerate(values)}
    queries, plain = _queries(values, rng)
    expected = [0 if v is None else ids.get(v, 0) for v in plain]
    dtype = id_dtype(n + 1)

    vocab.write_lookup(values, str(tmp_path / "hashed.npy"), max_ind_range=0)
    table = np.load(tmp_path / "hashed.npy")
    assert np.count_nonzero(table) == n and len(table) >= 2 * n  # at most half full
    found, valid = vocab.lookup_ids(table, queries, direct=False, dtype=dtype)
    assert found.dtype == dtype and found.tolist() == expected
    assert valid.tolist() == [v is not None for v in plain]

    # direct: the same ids for the values below max_ind_range
    bound = 1 << 20
    small = values % bound
    _, first = np.unique(small, return_index=True)
    small = small[np.sort(first)]  # distinct, in id order
    ids = {int(v): i + 1 for i, v in enumerate(small)}
    vocab.write_lookup(small, str(tmp_path / "direct.npy"), max_ind_range=bound)
    direct = np.load(tmp_path / "direct.npy", mmap_mode="r")
    assert len(direct) == bound and direct.dtype == id_dtype(len(small) + 1)
    bounded = pa.chunked_array([pa.array(np.array([0 if v is None else v % bound for v in plain], np.uint32),
                                         mask=np.array([v is None for v in plain]))])
    found, _ = vocab.lookup_ids(direct, bounded, direct=True, dtype=direct.dtype)
    assert found.tolist() == [0 if v is None else ids.get(v % bound, 0) for v in plain]


def test_lookup_of_a_column_without_missing_values_has_no_mask(tmp_path):
    vocab.write_lookup(np.array([42, 7], np.int64), str(tmp_path / "t.npy"), max_ind_range=0)
    found, valid = vocab.lookup_ids(np.load(tmp_path / "t.npy"), pa.chunked_array([pa.array([7, 8, 42], pa.uint32())]),
                                    direct=False, dtype=np.dtype(np.uint8))
    assert found.tolist() == [2, 0, 1] and valid is None


def test_hash_table_probes_past_values_that_share_a_slot():
    # values whose home slots coincide in a 4096-slot table: found one slot after another
    home = vocab._home_slots(np.arange(1 << 16, dtype=np.uint32), 12)
    same = np.flatnonzero(home == home[0])[:5].astype(np.int64)
    table = vocab.hash_table(same)
    assert len(table) == 1 << 12
    assert vocab.hashed_ids(table, same.astype(np.uint32)).tolist() == [1, 2, 3, 4, 5]
    unknown = np.flatnonzero(home == home[0])[5:8].astype(np.uint32)
    assert vocab.hashed_ids(table, unknown).tolist() == [0, 0, 0]
