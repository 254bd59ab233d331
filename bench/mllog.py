"""An MLPerf-style log of one run: ``:::MLLOG {json}`` lines written with the mlperf-logging package.

The log is written once, from the results file at the end of a run, not live: the run's figures
come from other processes (Spark, the mpiexec ranks), and the results file is where they all meet.
So every event carries an explicit ``time_ms``:

* run_start and run_stop are the run's recorded ``started_at`` and ``finished_at``;
* a stage's figures are stamped at the stage's end, reconstructed as ``started_at`` plus the seconds
  of the stages up to it. Gaps between stages (engine start-up) are not recorded, so these times are
  early by up to those gaps, and never later than ``finished_at``;
* points of the training AUC curve sit inside the training stage in proportion to samples seen.

Keys are the package's constants for the MLPerf DLRM benchmark where one exists; the model's shape
and the run's speeds, which MLPerf has no key for, are logged under plain names of our own.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
from pathlib import Path

from mlperf_logging.mllog import constants as C
from mlperf_logging.mllog.mllog import MLLogger

from bench.fsutil import atomic_write_text

REPO = Path(__file__).resolve().parent.parent
# MLPerf training rounds up to 2.1 named this benchmark "dlrm"; the package keeps constants only for
# the later DCNv2 variants, which are a different model.
BENCHMARK = "dlrm"


def _at(obj: dict, dotted: str) -> object:
    """The value at a dotted path of the results, None where any part is missing."""
    for part in dotted.split("."):
        if not isinstance(obj, dict) or obj.get(part) is None:
            return None
        obj = obj[part]
    return obj


def epoch_ms(timestamp: str) -> int:
    """``2026-12-04T20:54:35Z`` (the results file's UTC format) as milliseconds since the epoch."""
    when = dt.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    return int(when.timestamp() * 1000)


def stage_ends(results: dict, start_ms: int, stop_ms: int | None) -> dict[str, int]:
    """Each recorded stage's end time in ms, stages running one after another from the run's start."""
    ends = {}
    elapsed = 0.0
    for name, record in (results.get("stages") or {}).items():
        elapsed += float(record.get("seconds") or 0.0)
        ends[name] = start_ms + round(elapsed * 1000)
        if stop_ms is not None:
            ends[name] = min(ends[name], stop_ms)
    return ends


def hyperparameters(results: dict) -> list[tuple[str, object]]:
    """(key, value) of the settings an MLPerf DLRM log states before run_start, those this run has."""
    candidates = [
        (C.SEED, "config.train.seed"),
        (C.GLOBAL_BATCH_SIZE, "config.train.batch_size"),
        # Adam on the MLPs is the base optimiser; Adagrad on the embedding tables is the sparse one.
        (C.OPT_BASE_LR, "config.train.dense_lr"),
        (C.OPT_SPARSE_BASE_LR, "config.train.sparse_lr"),
        (C.TRAIN_SAMPLES, "dataset.rows.train"),
        (C.EVAL_SAMPLES, "stages.evaluate.rows"),
        ("train_epochs", "config.train.epochs"),
        ("embedding_dim", "config.model.embedding_dim"),
        ("bottom_mlp_sizes", "config.model.bottom_mlp"),
        ("top_mlp_sizes", "config.model.top_mlp"),
        ("embedding_table_sizes", "stages.preprocess.vocab_sizes"),
        ("num_nodes", "cluster.nodes"),
        ("num_ranks", "cluster.ranks"),
    ]
    found = [(key, _at(results, path)) for key, path in candidates]
    return [(C.SUBMISSION_BENCHMARK, BENCHMARK)] + [(key, value) for key, value in found if value is not None]


def accuracy_points(results: dict, ends: dict[str, int]) -> list[tuple[float, dict, int]]:
    """(AUC, metadata, time_ms) for each eval_accuracy event: the training curve, then the final test AUC.

    epoch_num is fractional, samples seen over training rows, as MLPerf DLRM logs it; the final AUC
    is always the last event, so a reader taking the last eval_accuracy gets the run's result.
    """
    train = _at(results, "stages.train") or {}
    evaluate = _at(results, "stages.evaluate") or {}
    train_rows = _at(results, "dataset.rows.train")
    train_end = ends.get("train")
    train_start = train_end - round(float(train.get("seconds") or 0.0) * 1000) if train_end is not None else None

    def metadata(samples: int | None) -> dict:
        meta: dict = {C.SAMPLES_COUNT: samples}
        if samples is not None and train_rows:
            meta[C.EPOCH_NUM] = round(samples / train_rows, 6)
        return meta

    points = []
    total = train.get("samples")
    for point in train.get("auc_curve") or []:
        if point.get("auc") is None or train_start is None:
            continue
        share = point["samples"] / total if total else 1.0
        at = train_start + round(min(share, 1.0) * (train_end - train_start))
        points.append((point["auc"], metadata(point["samples"]), at))
    if evaluate.get("auc") is not None:
        final = (evaluate["auc"], metadata(total), ends["evaluate"])
        if not points or points[-1][:2] != final[:2]:
            points.append(final)
    return points


def measurements(results: dict, ends: dict[str, int]) -> list[tuple[str, object, int]]:
    """(key, value, time_ms) of the run's speeds and test figures, each at its stage's end."""
    candidates = [
        ("train_samples_per_s", "train", "samples_per_s"),
        ("train_final_loss", "train", "final_loss"),
        ("eval_logloss", "evaluate", "logloss"),
        ("inference_samples_per_s", "inference", "samples_per_s"),
        ("inference_latency_ms", "inference", "latency_ms"),
        ("inference_batch_size", "inference", "batch_size"),
    ]
    found = [(key, _at(results, f"stages.{stage}.{field}"), ends.get(stage)) for key, stage, field in candidates]
    return [(key, value, at) for key, value, at in found if value is not None and at is not None]


def write_mllog(results: dict, path: Path) -> None:
    """Write the run's MLPerf-style log to ``path`` (atomically: a partial log is never left)."""
    out = io.StringIO()
    # A logger of our own, outside logging's registry: the package's shared one prints to stdout,
    # and configuring it would change logging for the whole process.
    logger = logging.Logger("bench.mllog", logging.INFO)
    logger.addHandler(logging.StreamHandler(out))
    ml = MLLogger(logger=logger, root_dir=str(REPO))

    start_ms = epoch_ms(results["started_at"])
    stop_ms = epoch_ms(results["finished_at"]) if results.get("finished_at") else None
    ends = stage_ends(results, start_ms, stop_ms)

    for key, value in hyperparameters(results):
        ml.event(key, value, time_ms=start_ms)
    ml.start(C.RUN_START, time_ms=start_ms)
    events = [(C.EVAL_ACCURACY, auc, meta, at) for auc, meta, at in accuracy_points(results, ends)]
    events += [(key, value, None, at) for key, value, at in measurements(results, ends)]
    for key, value, meta, at in sorted(events, key=lambda e: e[3]):  # stable: ties keep their order
        ml.event(key, value, metadata=meta, time_ms=at)
    if stop_ms is not None:  # a run still going has no stop yet
        status = C.SUCCESS if results.get("status") == "succeeded" else C.ABORTED
        ml.end(C.RUN_STOP, metadata={C.STATUS: status}, time_ms=stop_ms)
    atomic_write_text(Path(path), out.getvalue())
