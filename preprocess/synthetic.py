"""Synthetic Criteo click logs with a known ground-truth click model and oracle AUC.

Output: ``day_0 .. day_{days-1}`` (training) and ``day_{days}`` (evaluation) in
Criteo's TSV format (see ``preprocess.layout``), plus ``dataset.json``.

Features
    Categorical column c has K_c distinct values: K_c is proportional to the
    real Criteo Terabyte cardinality, scaled so the largest column has
    ``max_cardinality`` values, but at least min(real, 10). Each value is a
    distinct random 32-bit token printed as 8 lowercase hex digits. Values are
    drawn by frequency rank r = 0 .. K_c-1 from a discretised power law:
    r = floor(X) - 1 with X of density ~ x^-s on [1, K_c+1), s =
    ``zipf_exponent`` (Zipf's law with a slightly flattened head; it samples in
    closed form, which matters at millions of draws per second). Since tokens
    are random, the order of tokens by rank is a random permutation of the
    column's values. Missing rates per column follow the real data (0 .. 76%).
    The 13 integer columns are log-normal counts (zeros common, heavy tails),
    column I2 also takes -1/-2/-3, with Criteo-like missing rates.

Click model
    logit = bias + sum_c w_c[v_c] + sum_(a,b) <u_a[v_a], u_b[v_b]> + sum_j b_j d_j
    with d_j = log1p(max(x_j, 0)), 0 when missing (what preprocessing feeds the
    model), and missing categorical values contributing 0. The ``interaction_pairs``
    column pairs (a, b) are drawn at random; u are rank-4 factors, the low-rank
    pairwise structure DLRM's dot interaction can represent. The three parts are
    scaled so that, on a fixed calibration sample, their variances are 70% /
    15% / 15% of ``signal_scale``^2 (most signal sits in the categorical
    columns, so the embeddings must learn it); then ``bias`` is set by bisection
    on the same sample so the mean click probability is ``click_rate``.
    label ~ Bernoulli(sigmoid(logit)).

Learnability
    A model trained on the training days can only learn a value's effect from
    the rows that contain it; the effect of a value seen a handful of times is
    noise to the learner but signal to the oracle, which would open a gap
    between oracle AUC and any achievable AUC. So every value's effect (w and
    u) is drawn as N(0, 1) times n / (n + ``effect_half_count``), where n is
    the value's expected number of occurrences in the training days: effects
    fade out for values too rare to learn, and the signal sits in values seen
    often enough. The click model therefore depends on the amount of training
    data as well as on the seed.

Determinism
    The model and its calibration sample come from SeedSequence(seed) streams
    of their own; each ``CHUNK_ROWS`` chunk of a day from a stream keyed by
    (day, chunk). The chunking does not depend on ``workers``, so the bytes do
    not either.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import multiprocessing.queues
import queue
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
from threadpoolctl import threadpool_limits

from bench.config import NUM_DENSE, NUM_SPARSE, DataConfig
from bench.fsutil import atomic_open, atomic_write_json
from preprocess.layout import DATASET_MANIFEST, day_file

GENERATOR_VERSION = "1"
CHUNK_ROWS = 250_000
CALIBRATION_ROWS = 200_000
FACTOR_DIM = 4
VARIANCE_SHARES = {"values": 0.70, "interactions": 0.15, "dense": 0.15}

# Criteo Terabyte cardinalities of C1..C26 (values capped at 40M).
CRITEO_CARDINALITIES = (
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10,
    2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36,
)  # fmt: skip
# Share of rows where C1..C26 is missing, as in the Criteo click logs.
CAT_MISSING = (
    0.0, 0.0, 0.034, 0.034, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.034, 0.0,
    0.0, 0.0, 0.034, 0.0, 0.0, 0.44, 0.44, 0.034, 0.76, 0.0, 0.034, 0.44, 0.44,
)  # fmt: skip
# I1..I13: (missing share, median of x + 1, log-normal sigma): Criteo-like counts.
DENSE_SHAPE = (
    (0.45, 2.0, 1.2), (0.0, 4.0, 2.0), (0.21, 7.0, 1.5), (0.22, 5.0, 0.9), (0.026, 3000.0, 1.8),
    (0.22, 30.0, 1.6), (0.043, 4.0, 1.4), (0.0005, 8.0, 0.9), (0.043, 40.0, 1.3), (0.45, 1.2, 0.6),
    (0.043, 2.0, 0.9), (0.77, 1.1, 1.0), (0.22, 6.0, 1.0),
)  # fmt: skip
# Column I2 (index 1) also holds small negatives: cumulative shares of -3, -2, -1.
NEGATIVE_COLUMN = 1
NEGATIVE_CUMULATIVE = ((0.002, -3), (0.012, -2), (0.10, -1))

# Independent SeedSequence streams: the model's parameters, its calibration sample, the rows.
_MODEL_STREAM, _CALIBRATION_STREAM, _ROWS_STREAM = 0, 1, 2
# Byte b as its two hex digits: the uint16 whose little-endian bytes are the digits in order.
_HEX_PAIRS = np.frombuffer(b"".join(f"{b:02x}".encode() for b in range(256)), dtype=np.uint16)
# Writing lines: fields per line, and rows formatted at a time (their working set fits the CPU cache).
_FIELDS = 1 + NUM_DENSE + NUM_SPARSE
_BLOCK_ROWS = 8192
_TAB, _NEWLINE = ord("\t"), ord("\n")
_TABS = np.frombuffer(b"\t" * 8, dtype=np.uint64)[0]
_LABEL_WORDS = np.frombuffer(b"0\t\t\t\t\t\t\t1\t\t\t\t\t\t\t", dtype=np.uint64)
# Integers formatted by table lookup: all but the largest counts. The rest are formatted one by one.
_INT_TABLE_RANGE = (-999, 100_000)


def cardinalities(max_cardinality: int) -> list[int]:
    """Criteo's per-column cardinalities scaled to ``max_cardinality``, at least min(real, 10)."""
    top = max(CRITEO_CARDINALITIES)
    return [
        min(max_cardinality, max(round(real * max_cardinality / top), min(real, 10)))
        for real in CRITEO_CARDINALITIES
    ]


def rank_probabilities(cardinality: int, exponent: float) -> np.ndarray:
    """P(rank = r) for r = 0 .. cardinality-1 under the discretised power law used for sampling."""
    edges = np.arange(1, cardinality + 2, dtype=np.float64) ** (1.0 - exponent)
    return (edges[:-1] - edges[1:]) / (edges[0] - edges[-1])


@dataclass(frozen=True)
class ClickModel:
    """The ground truth: value tokens, effects, and how a row's features give its click logit.

    Categorical features are ranks, -1 where missing. Per-value arrays have one
    extra zero entry at the end, so rank -1 indexes "no effect" without a mask.
    """

    cardinalities: tuple[int, ...]
    exponent: float
    tokens: tuple[np.ndarray, ...]  # per column, uint64 holding the 8 ASCII hex digits of each rank
    effects: tuple[np.ndarray, ...]  # per column, float32 [K + 1]
    pairs: tuple[tuple[int, int], ...]
    factors: dict[int, np.ndarray]  # column -> float32 [K + 1, FACTOR_DIM], for columns in a pair
    dense_weight: np.ndarray  # float32 [NUM_DENSE], applied to d = log1p(max(x, 0))
    bias: float

    def parts(self, ranks: np.ndarray, dense: np.ndarray) -> dict[str, np.ndarray]:
        """The logit's three parts (without the bias), each float32 [n].

        ranks: int [NUM_SPARSE, n], -1 where missing; dense: float32 [NUM_DENSE, n] of d.
        """
        # np.take rather than fancy indexing: several times faster for these gathers.
        values = np.zeros(ranks.shape[1], dtype=np.float32)
        for column, effect in enumerate(self.effects):
            values += np.take(effect, ranks[column])
        gathered = {c: np.take(f, ranks[c], axis=0) for c, f in self.factors.items()}
        products = np.zeros((ranks.shape[1], FACTOR_DIM), dtype=np.float32)
        for a, b in self.pairs:
            products += gathered[a] * gathered[b]
        # The FACTOR_DIM (4) columns summed in pairs, (0 + 1) + (2 + 3): bit for bit the sums of the
        # OpenBLAS matrix-vector product the data were first made with; numpy's short-axis sum is slow.
        halves = products[:, 0::2] + products[:, 1::2]
        interactions = halves[:, 0] + halves[:, 1]
        # One BLAS thread: OpenBLAS splits the product's rows between its threads and rounds those at
        # the seams differently, so more threads would make the data depend on the core count (and
        # waking them costs more than they save here).
        with threadpool_limits(1, user_api="blas"):
            dense_part = self.dense_weight @ dense
        return {"values": values, "interactions": interactions, "dense": dense_part}

    def logit(self, ranks: np.ndarray, dense: np.ndarray) -> np.ndarray:
        parts = self.parts(ranks, dense)
        return np.float32(self.bias) + parts["values"] + parts["interactions"] + parts["dense"]

    def probability(self, ranks: np.ndarray, dense: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logit(ranks, dense)))

    def token_strings(self, column: int) -> np.ndarray:
        """The column's values as 8-byte strings (b'68fd1e64'), indexed by rank."""
        return self.tokens[column].view("S8")


# --- sampling features ----------------------------------------------------------------------------


def _sample_ranks(rng: np.random.Generator, rows: int, cards: tuple[int, ...], exponent: float) -> np.ndarray:
    """intp [NUM_SPARSE, rows]: each value's frequency rank, -1 where missing."""
    ranks = np.empty((NUM_SPARSE, rows), dtype=np.intp)  # intp: gathers need no index conversion
    power = 1.0 - exponent
    # Computed in place, in the same float32 operations as the plain expressions in the comments.
    u, x = np.empty(rows, dtype=np.float32), np.empty(rows, dtype=np.float32)
    for column, (card, missing) in enumerate(zip(cards, CAT_MISSING)):
        # One uniform per cell decides both: below `missing` the value is
        # missing, the rest of [0, 1) is stretched back to [0, 1) for the rank.
        rng.random(dtype=np.float32, out=u)
        # v = (u - missing) / (1 - missing), which is u itself when nothing is missing.
        np.subtract(u, np.float32(missing), out=x)
        x *= np.float32(1.0 / (1.0 - missing))
        # Inverse CDF of the density ~ x^-s on [1, card + 1): x = (1 + ((card + 1)^(1-s) - 1) v)^(1/(1-s)).
        x *= np.float32((card + 1) ** power - 1.0)
        x += np.float32(1.0)
        np.power(x, np.float32(1.0 / power), out=x)
        rank = ranks[column]
        np.copyto(rank, x, casting="unsafe")  # x.astype(intp): truncation
        rank -= 1
        np.clip(rank, 0, card - 1, out=rank)
        if missing:
            np.putmask(rank, u < missing, -1)
    return ranks


def _sample_dense(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(int64 [NUM_DENSE, rows] counts, bool [NUM_DENSE, rows] missing)."""
    values = np.empty((NUM_DENSE, rows), dtype=np.int64)
    missing = np.empty((NUM_DENSE, rows), dtype=bool)
    z, u = np.empty(rows, dtype=np.float32), np.empty(rows, dtype=np.float32)
    for j, (miss, median, sigma) in enumerate(DENSE_SHAPE):
        # X = exp(log(median) + sigma z), in place.
        rng.standard_normal(dtype=np.float32, out=z)
        z *= np.float32(sigma)
        z += np.float32(np.log(median))
        np.exp(z, out=z)
        # floor(X) - 1 of a log-normal X: every X < 2 becomes 0, so zeros are common.
        np.copyto(values[j], z, casting="unsafe")
        values[j] -= 1
        np.maximum(values[j], 0, out=values[j])
        rng.random(dtype=np.float32, out=u)
        np.less(u, miss, out=missing[j])
    rng.random(dtype=np.float32, out=u)
    for upper, negative in reversed(NEGATIVE_CUMULATIVE):
        np.putmask(values[NEGATIVE_COLUMN], u < upper, negative)
    return values, missing


def _dense_log(values: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """float32 d = log1p(max(x, 0)), 0 when missing: the dense input preprocessing produces."""
    d = values.astype(np.float32)
    np.maximum(d, 0, out=d)  # the same as converting max(x, 0): conversion keeps the order, and 0 is exact
    np.log1p(d, out=d)
    np.putmask(d, missing, 0.0)
    return d


# --- building the model ---------------------------------------------------------------------------


def _hex_tokens(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` distinct random 32-bit values as uint64 words of 8 ASCII hex digits."""
    values = rng.choice(2**32, size=count, replace=False).astype(np.uint32)
    # Big-endian bytes, each to its two digits.
    return np.take(_HEX_PAIRS, values.astype(">u4").view(np.uint8)).view(np.uint64).ravel()


def _with_missing_slot(values: np.ndarray) -> np.ndarray:
    """float32 copy with a zero row appended: the entry rank -1 (missing) picks."""
    return np.concatenate([values, np.zeros((1, *values.shape[1:]))]).astype(np.float32)


def _bisect_bias(logits: np.ndarray, click_rate: float) -> float:
    """The bias b with mean(sigmoid(b + logits)) == click_rate (the mean is increasing in b)."""
    low, high = -40.0, 40.0
    p = np.empty_like(logits)
    for _ in range(60):
        mid = (low + high) / 2
        # p = 1 / (1 + exp(-(mid + logits))), in place
        np.add(logits, mid, out=p)
        np.negative(p, out=p)
        np.exp(p, out=p)
        p += 1.0
        np.divide(1.0, p, out=p)
        if np.mean(p) < click_rate:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def _unscaled_model(cfg: DataConfig) -> ClickModel:
    """The click model with N(0, 1)-sized parts and no bias; ``build_model`` scales it."""
    syn = cfg.synthetic
    cards = tuple(cardinalities(syn.max_cardinality))
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(_MODEL_STREAM,)))
    tokens = tuple(_hex_tokens(rng, card) for card in cards)
    learnable = []
    for card, missing in zip(cards, CAT_MISSING):
        seen = rank_probabilities(card, syn.zipf_exponent) * (1.0 - missing) * cfg.days * cfg.rows_per_day
        learnable.append(seen / (seen + syn.effect_half_count))
    # Columns differ in importance, as real features do.
    importance = rng.lognormal(0.0, 0.5, NUM_SPARSE)
    effects = tuple(_with_missing_slot(i * rng.standard_normal(len(f)) * f) for i, f in zip(importance, learnable))
    all_pairs = list(itertools.combinations(range(NUM_SPARSE), 2))
    pairs = tuple(all_pairs[i] for i in np.sort(rng.choice(len(all_pairs), syn.interaction_pairs, replace=False)))
    factors = {
        c: _with_missing_slot(rng.standard_normal((cards[c], FACTOR_DIM)) * learnable[c][:, None])
        for c in sorted({c for pair in pairs for c in pair})
    }
    dense_weight = rng.standard_normal(NUM_DENSE).astype(np.float32)
    return ClickModel(cards, syn.zipf_exponent, tokens, effects, pairs, factors, dense_weight, bias=0.0)


def build_model(cfg: DataConfig) -> ClickModel:
    """The click model for this configuration; deterministic in ``cfg``."""
    syn = cfg.synthetic
    model = _unscaled_model(cfg)
    # Measure the three parts on a fixed sample and scale them to their variance shares.
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(_CALIBRATION_STREAM,)))
    ranks = _sample_ranks(rng, CALIBRATION_ROWS, model.cardinalities, model.exponent)
    dense = _dense_log(*_sample_dense(rng, CALIBRATION_ROWS))
    # Standardise each d_j first, so its random weight alone sets its importance.
    model = replace(model, dense_weight=model.dense_weight / dense.std(axis=1))
    parts = {k: v.astype(np.float64) for k, v in model.parts(ranks, dense).items()}
    # Without interaction pairs the other parts share the whole variance.
    shares = {k: s for k, s in VARIANCE_SHARES.items() if k != "interactions" or model.pairs}
    scale = {k: syn.signal_scale * np.sqrt(s / sum(shares.values())) / parts[k].std() for k, s in shares.items()}
    return replace(
        model,
        effects=tuple(e * np.float32(scale["values"]) for e in model.effects),
        # Both factors of a pair carry the square root, so each dot product scales by the factor.
        factors={c: f * np.float32(np.sqrt(scale["interactions"])) for c, f in model.factors.items()},
        dense_weight=model.dense_weight * np.float32(scale["dense"]),
        bias=_bisect_bias(sum(scale[k] * parts[k] for k in shares), syn.click_rate),
    )


# --- generating and writing rows ------------------------------------------------------------------


class DayFile(NamedTuple):
    size: int  # bytes
    clicks: int
    labels: np.ndarray | None  # int8 [rows], kept for the evaluation day only
    probabilities: np.ndarray | None  # float32 [rows], the true click probabilities, likewise


def _padded_words(text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Byte strings (dtype S<w>, w >= 8, zero-padded) -> (uint64 of each one's first 8 bytes with
    tabs in place of the padding, int64 lengths)."""
    chars = text.view(np.uint8).reshape(len(text), text.dtype.itemsize)
    head = np.where(chars[:, :8] == 0, np.uint8(_TAB), chars[:, :8])
    return np.ascontiguousarray(head).view(np.uint64).ravel(), np.count_nonzero(chars, axis=1)


@functools.cache
def _int_table() -> tuple[np.ndarray, np.ndarray]:
    """Words and widths (length + 1 for the separator) of the integers in ``_INT_TABLE_RANGE``, then
    a last entry for a missing field."""
    words, lengths = _padded_words(np.arange(*_INT_TABLE_RANGE).astype("S8"))
    return np.append(words, _TABS), np.append(lengths + 1, 1).astype(np.uint8)


class _RowFormat(NamedTuple):
    """Lookup tables for formatting rows, made once per day."""

    tokens: tuple[np.ndarray, ...]  # per column, the model's tokens then 8 tabs: rank -1 (missing) picks these
    int_words: np.ndarray  # uint64, by value - _INT_TABLE_RANGE[0]; the last entry for missing
    int_widths: np.ndarray  # uint8, likewise

    @classmethod
    def of(cls, model: ClickModel) -> _RowFormat:
        return cls(tuple(np.append(t, _TABS) for t in model.tokens), *_int_table())


def _tsv_lines(fmt: _RowFormat, labels: np.ndarray, values: np.ndarray, missing: np.ndarray,
               ranks: np.ndarray) -> np.ndarray:
    """uint8: the rows as Criteo TSV lines: label, integers in decimal, tokens, missing fields empty.

    labels: int8 [rows]; values, missing: [NUM_DENSE, rows]; ranks: [NUM_SPARSE, rows], -1 where missing.
    Formatting is most of the generator's work, so it is table lookups and 8-byte stores: integers
    come from a table of their text, tokens from the model's. Each field is one little-endian uint64
    word, its first 8 bytes padded with tabs, stored with an unaligned 8-byte store at the field's
    offset in a buffer of tabs, one field at a time for all rows. A word's padding spills only into
    the later fields of its row, stored after it, or onto separators, which are tabs anyway. Missing
    hex fields are not stored (their 8 tabs could reach into the next row); the bytes past the 8th
    of integers longer than that go in one by one.
    """
    rows = len(labels)
    widths = np.empty((_FIELDS, rows), dtype=np.uint8)  # bytes per field, with its separator
    widths[0] = 2
    # Integers: table entries, the missing ones the last; those outside the table formatted apart.
    missing_entry = len(fmt.int_words) - 1
    index = values - _INT_TABLE_RANGE[0]
    outside = np.nonzero((index.view(np.uint64) >= missing_entry) & ~missing)  # negative ones wrap to huge
    np.putmask(index, missing, missing_entry)
    index[outside] = missing_entry
    int_words = np.take(fmt.int_words, index)
    widths[1 : 1 + NUM_DENSE] = np.take(fmt.int_widths, index)
    text = values[outside].astype("S20")
    int_words[outside], lengths = _padded_words(text)
    widths[1 : 1 + NUM_DENSE][outside] = lengths + 1
    present = ranks >= 0
    np.multiply(present, np.uint8(8), out=widths[1 + NUM_DENSE :])
    widths[1 + NUM_DENSE :] += 1

    row_widths = widths.sum(axis=0, dtype=np.int64)
    ends = np.cumsum(row_widths)
    size = int(ends[-1])
    out = np.full(size + 8, _TAB, dtype=np.uint8)
    # The words at every byte offset; offset `size` (past the lines) takes the missing hex fields.
    at = np.ndarray((size + 1,), dtype=np.uint64, buffer=out, strides=(1,))
    offsets = ends - row_widths
    at[offsets] = _LABEL_WORDS[labels]
    for j in range(NUM_DENSE):
        offsets += widths[j]
        at[offsets] = int_words[j]
    for c, tokens in enumerate(fmt.tokens):
        offsets += widths[NUM_DENSE + c]
        at[np.where(present[c], offsets, size)] = np.take(tokens, ranks[c])
    out[ends - 1] = _NEWLINE
    longer = lengths > 8
    if longer.any():
        columns, rows_at = outside[0][longer], outside[1][longer]
        # Offset of integer column j in a row: the widths of the fields before it, 0 .. j.
        before = np.cumsum(widths[: 1 + NUM_DENSE, rows_at], axis=0, dtype=np.int64)
        starts = ends[rows_at] - row_widths[rows_at] + before[columns, np.arange(len(columns))]
        tails = text[longer].view(np.uint8).reshape(len(columns), text.dtype.itemsize)[:, 8:]
        field, byte = np.nonzero(tails)
        out[starts[field] + 8 + byte] = tails[field, byte]
    return out[:size]


def _write_chunk(
    f: BinaryIO, model: ClickModel, fmt: _RowFormat, seed: int, day: int, chunk: int, rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Append chunk ``chunk`` of ``day`` to ``f``; return its labels and true click probabilities.

    The rows are a pure function of the arguments: their own random stream.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_ROWS_STREAM, day, chunk)))
    ranks = _sample_ranks(rng, rows, model.cardinalities, model.exponent)
    values, missing = _sample_dense(rng, rows)
    probabilities = model.probability(ranks, _dense_log(values, missing))
    labels = (rng.random(rows, dtype=np.float32) < probabilities).astype(np.int8)
    # Formatted a block at a time: the block's words, offsets and text stay in the CPU cache.
    for start in range(0, rows, _BLOCK_ROWS):
        block = slice(start, start + _BLOCK_ROWS)
        f.write(_tsv_lines(fmt, labels[block], values[:, block], missing[:, block], ranks[:, block]))
    return labels, probabilities


def _write_day(
    model: ClickModel, cfg: DataConfig, raw_dir: Path, day: int, report: Callable[[int], None]
) -> DayFile:
    """Write ``day_<day>`` chunk by chunk, calling ``report(rows)`` after each chunk."""
    path = day_file(raw_dir, day)
    clicks = 0
    # The oracle AUC needs the evaluation day's labels and probabilities; no other day's are kept.
    evaluation = day == cfg.days
    kept_labels: list[np.ndarray] = []
    kept_probabilities: list[np.ndarray] = []
    fmt = _RowFormat.of(model)
    with atomic_open(path, "wb") as f:
        for chunk, start in enumerate(range(0, cfg.rows_per_day, CHUNK_ROWS)):
            rows = min(CHUNK_ROWS, cfg.rows_per_day - start)
            labels, probabilities = _write_chunk(f, model, fmt, cfg.seed, day, chunk, rows)
            clicks += int(labels.sum())
            if evaluation:
                kept_labels.append(labels)
                kept_probabilities.append(probabilities)
            report(rows)
    if not evaluation:
        return DayFile(path.stat().st_size, clicks, None, None)
    return DayFile(path.stat().st_size, clicks, np.concatenate(kept_labels), np.concatenate(kept_probabilities))


_worker_state: tuple[ClickModel, multiprocessing.queues.Queue] | None = None


def _init_worker(model: ClickModel, progress: multiprocessing.queues.Queue) -> None:
    # The model is sent once per worker process, not once per day.
    global _worker_state
    _worker_state = (model, progress)


def _worker_day(cfg: DataConfig, raw_dir: Path, day: int) -> DayFile:
    assert _worker_state is not None
    model, progress = _worker_state
    return _write_day(model, cfg, raw_dir, day, progress.put)


def _write_days(
    model: ClickModel, cfg: DataConfig, raw_dir: Path, workers: int, progress: Callable[[int], None]
) -> list[DayFile]:
    """All day files, one day per task on ``workers`` processes; progress is reported per chunk."""
    days = range(cfg.days + 1)
    if workers == 1:
        return [_write_day(model, cfg, raw_dir, day, progress) for day in days]
    # spawn, not fork: the caller may run threads (a progress display) that fork would copy mid-lock.
    context = multiprocessing.get_context("spawn")
    rows_reported = context.Queue()
    total, reported = len(days) * cfg.rows_per_day, 0
    with ProcessPoolExecutor(workers, context, initializer=_init_worker, initargs=(model, rows_reported)) as pool:
        futures = [pool.submit(_worker_day, cfg, raw_dir, day) for day in days]
        try:
            # Every chunk is reported before its day's task returns, so this ends when all are done.
            while reported < total:
                try:
                    rows = rows_reported.get(timeout=0.5)
                except queue.Empty:
                    # A failed day never reports its remaining rows: raise its error instead.
                    for future in futures:
                        if future.done() and future.exception() is not None:
                            raise future.exception()
                    continue
                reported += rows
                progress(rows)
            return [future.result() for future in futures]
        except BaseException:
            # Start no further days; let the running ones finish, so no temporary file stays behind.
            pool.shutdown(cancel_futures=True)
            raise


def _auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC, or None where it is undefined (one class only)."""
    from sklearn.metrics import roc_auc_score  # slow to import, and the workers never need it

    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else None


def generate(
    cfg: DataConfig, raw_dir: Path, workers: int, progress: Callable[[int], None] | None = None
) -> dict:
    """Write the day files and ``dataset.json`` into ``raw_dir``; return the manifest.

    ``workers`` processes write one day file each at a time (capped at the
    number of files). ``progress(n)`` is called with the number of rows just
    written.
    """
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    # A manifest left from an earlier run would vouch for day files about to be replaced.
    (raw_dir / DATASET_MANIFEST).unlink(missing_ok=True)
    model = build_model(cfg)
    workers = max(1, min(workers, cfg.days + 1))
    days = _write_days(model, cfg, raw_dir, workers, progress or (lambda rows: None))

    evaluation = days[cfg.days]
    assert evaluation.labels is not None and evaluation.probabilities is not None
    labels, probabilities = evaluation.labels, evaluation.probabilities
    half = len(labels) // 2
    manifest = {
        "source": "synthetic",
        "format": "criteo-tsv",
        "train_days": list(range(cfg.days)),
        "eval_day": cfg.days,
        "rows_per_day": cfg.rows_per_day,
        "seed": cfg.seed,
        "cardinalities": list(model.cardinalities),
        "click_rate": sum(d.clicks for d in days[: cfg.days]) / (cfg.days * cfg.rows_per_day),
        "oracle_auc": {
            "test": _auc(labels[:half], probabilities[:half]),
            "val": _auc(labels[half:], probabilities[half:]),
            "eval_day": _auc(labels, probabilities),
        },
        "generator": {**cfg.synthetic.model_dump(mode="json"), "version": GENERATOR_VERSION},
        "files": {day_file(raw_dir, day).name: d.size for day, d in enumerate(days)},
    }
    atomic_write_json(raw_dir / DATASET_MANIFEST, manifest)
    return manifest
