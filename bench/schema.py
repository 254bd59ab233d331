"""The results file's contract: its JSON Schema (``results/schema.json``) and the table of its metrics.

``validate`` checks one results dict against the schema. ``METRICS`` says, for every figure a
regression check compares, its unit, which direction is better, how far it may move by default and
which measured machine figure it scales with; the schema carries the same unit and direction as
``x-unit``/``x-better`` annotations.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.exceptions import best_match

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "results" / "schema.json"


@dataclass(frozen=True)
class MachineFigure:
    """A figure of the run's own measured machine (``machine.measured``) that a metric scales with.

    Comparing a metric per unit of this figure takes the machine out of the comparison: a throughput
    is divided by it (samples/s per GFLOP/s, proportional to the roofline fraction), a time or a
    latency is multiplied by it (lower stays better). A run on a 30% slower machine then compares
    equal to the same code on the faster one.
    """

    path: str  # dotted, under machine.measured; "{precision}" stands for the precision read at ``precision_at``
    precision_at: str | None = None  # dotted path in the results file; fp32 when absent there


# The machine's fp32 GEMM rate (all ranks): the compute ceiling of inference and evaluation (always fp32),
# and the proxy of core speed for the CPU-bound stages that do no GEMM at all (data generation, Spark's
# parsing and vocabulary building, and the wall times made of them). memory_gb_per_s would be the
# alternative for those, but they are bound by the interpreter and the JVM, not by memory bandwidth.
GEMM_FP32 = MachineFigure("machine_gemm_gflops.fp32")
# Training runs in stages.train.precision (fp32 or bf16; fp32 in files written before it was recorded).
GEMM_TRAIN = MachineFigure("machine_gemm_gflops.{precision}", precision_at="stages.train.precision")


@dataclass(frozen=True)
class Metric:
    """How to read and compare one figure of a results file."""

    unit: str
    better: Literal["higher", "lower"]
    # absolute: compare candidate - baseline (figures on a fixed scale, e.g. AUC);
    # relative: compare (candidate - baseline) / baseline (speeds and times, which scale with the machine).
    kind: Literal["absolute", "relative"]
    threshold: float  # the largest change in the worse direction that still passes
    # The measured machine figure it scales with, for comparing runs on different machines; None for
    # figures the machine does not move (AUC, logloss).
    scales_with: MachineFigure | None = None


def _stage_seconds(threshold: float, scales_with: MachineFigure = GEMM_FP32) -> Metric:
    return Metric("s", "lower", "relative", threshold, scales_with)


# Dotted path in the results file -> Metric. Defaults are for runs on the same machine and profile:
# throughput gates are tight, wall times (which include engine start-up) are looser. Speeds and times
# scale with the machine: train with the GEMM rate of its precision, the rest with the fp32 GEMM rate
# (see GEMM_FP32 for why the CPU-bound data and preprocess figures use it too).
METRICS: dict[str, Metric] = {
    "stages.data.rows_per_s": Metric("rows/s", "higher", "relative", 0.15, GEMM_FP32),
    "stages.preprocess.rows_per_s": Metric("rows/s", "higher", "relative", 0.15, GEMM_FP32),
    "stages.train.samples_per_s": Metric("samples/s", "higher", "relative", 0.10, GEMM_TRAIN),
    "stages.evaluate.auc": Metric("1", "higher", "absolute", 0.002),
    "stages.evaluate.logloss": Metric("1", "lower", "absolute", 0.002),
    "stages.inference.samples_per_s": Metric("samples/s", "higher", "relative", 0.10, GEMM_FP32),
    "stages.inference.latency_ms.p50": Metric("ms", "lower", "relative", 0.20, GEMM_FP32),
    "stages.inference.latency_ms.p99": Metric("ms", "lower", "relative", 0.20, GEMM_FP32),
    "stages.data.seconds": _stage_seconds(0.25),
    "stages.preprocess.seconds": _stage_seconds(0.25),
    "stages.train.seconds": _stage_seconds(0.25, GEMM_TRAIN),
    # Evaluation takes well under a second on the small profiles, where scheduling jitter dominates.
    "stages.evaluate.seconds": _stage_seconds(0.50),
    "stages.inference.seconds": _stage_seconds(0.25),
    "total_seconds": Metric("s", "lower", "relative", 0.20, GEMM_FP32),
}


def value_at(results: dict, dotted: str) -> object:
    """``value_at(results, "stages.evaluate.auc")``: the value at a dotted path, None where any part is missing."""
    node: object = results
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def number_at(results: dict, dotted: str) -> float | None:
    """The number at a dotted path, or None when the path is absent or null (e.g. a stage never ran)."""
    node = value_at(results, dotted)
    return node if isinstance(node, (int, float)) and not isinstance(node, bool) else None


class ResultsInvalid(ValueError):
    """A results dict that does not match the schema; the message is one line naming the JSON path."""


def _is_finite_number(checker: object, instance: object) -> bool:
    # Only floats can be NaN or infinite; math.isfinite would overflow on a huge int.
    is_number = Draft202012Validator.TYPE_CHECKER.is_type(instance, "number")
    return is_number and (not isinstance(instance, float) or math.isfinite(instance))


# Python's json writes NaN and Infinity, which are not JSON numbers; a NaN metric would also pass every
# minimum/maximum check and every comparison, so the schema's "number" excludes them.
_Validator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("number", _is_finite_number),
)


@functools.cache
def schema() -> dict:
    """The results JSON Schema, read once from ``results/schema.json``."""
    return json.loads(SCHEMA_PATH.read_text())


@functools.cache
def _validator() -> Draft202012Validator:
    return _Validator(schema())


def _dotted(path: Iterable[str | int]) -> str:
    """``["stages", "evaluate", "auc"]`` -> ``stages.evaluate.auc``; list indices as ``[i]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _describe(error: ValidationError) -> str:
    path = list(error.absolute_path)
    if error.validator == "required":
        # jsonschema reports each missing key separately, all with the same list: name the first missing one.
        path.append(next(key for key in error.validator_value if key not in error.instance))
        # The schema's only conditional "required" lists are in the succeeded-run branch.
        why = " for a succeeded run" if "then" in error.schema_path else ""
        return f"{_dotted(path)}: required{why} but missing"
    if error.validator == "type" and isinstance(error.instance, float) and not math.isfinite(error.instance):
        return f"{_dotted(path)}: {error.instance} is not a finite number"
    return f"{_dotted(path) or '(top level)'}: {error.message}"


def validate(results: dict) -> None:
    """Raise ResultsInvalid, one line naming the path and problem, unless ``results`` matches the schema."""
    error = best_match(_validator().iter_errors(results))
    if error is not None:
        raise ResultsInvalid(_describe(error))
