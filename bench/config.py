"""The run configuration: one typed, validated object, resolved once.

A profile file (``bench/profiles/<name>.yaml``) gives every value; overrides
(``section.key=value`` strings, e.g. from Makefile variables) replace some of
them. The resolved object is passed down to every stage, written to
``<run dir>/config.json`` for the training ranks, and recorded whole in the
results file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROFILES_DIR = Path(__file__).parent / "profiles"

# Criteo click-log layout: label, 13 integer features, 26 categorical features.
NUM_DENSE = 13
NUM_SPARSE = 26


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticConfig(_Section):
    """Shape of the synthetic Criteo-format data and its ground-truth click model."""

    max_cardinality: int = Field(gt=1, description="cap on distinct values of the largest column")
    zipf_exponent: float = Field(gt=1.0, description="power-law exponent of value frequencies")
    click_rate: float = Field(gt=0.0, lt=1.0, description="target mean click probability")
    interaction_pairs: int = Field(
        ge=0, le=NUM_SPARSE * (NUM_SPARSE - 1) // 2, description="categorical column pairs with a pairwise effect"
    )
    signal_scale: float = Field(gt=0.0, description="std of the ground-truth logit before calibration")
    effect_half_count: float = Field(
        gt=0.0, description="expected training occurrences at which a value's effect is half its full size"
    )


class DataConfig(_Section):
    source: Literal["synthetic", "criteo", "kaggle"]
    dir: Path
    days: int = Field(ge=1, le=23, description="training days; one more day is the evaluation day")
    rows_per_day: int = Field(ge=100)
    seed: int = 0
    synthetic: SyntheticConfig


class PreprocessConfig(_Section):
    engine: Literal["raydp", "local", "master"] = Field(
        description="raydp: Spark executors as Ray actors; local: local[executors x cores]; master: an existing "
                    "Spark cluster, named by master")
    master: str | None = Field(default=None, description="spark://host:port[,host:port...]; only with engine master")
    executors: int = Field(ge=0, description="Spark executors; 0: as many as the cluster's nodes hold "
                                             "(cores per node // executor_cores, on every node)")
    executor_cores: int = Field(ge=1)
    executor_memory: str = Field(pattern=r"^\d+[mg]$")
    local_dir: Path | None = Field(
        default=None, description="Spark's shuffle and scratch folder on every node (the same path on each); "
                                  "None: the run folder's spark-scratch")
    freq_threshold: int = Field(ge=0, description="values seen fewer times in training map to id 0")
    max_ind_range: int = Field(default=0, ge=0, description="cap on each table's ids (hashed into range); 0 = off")

    @field_validator("master")
    @classmethod
    def _spark_url(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"spark://[^\s/:,]+:\d+(,[^\s/:,]+:\d+)*", v):
            raise ValueError("must be a Spark master URL, spark://host:port (several host:port for standby masters)")
        return v

    @model_validator(mode="after")
    def _master_only_with_its_engine(self) -> "PreprocessConfig":
        if self.engine == "master" and self.master is None:
            raise ValueError("engine master needs preprocess.master=spark://host:port, the URL of the Spark master")
        if self.engine != "master" and self.master is not None:
            raise ValueError(f"preprocess.master is only used with engine master (engine is {self.engine}); "
                             "set preprocess.master=null, or preprocess.engine=master")
        return self


class ModelConfig(_Section):
    embedding_dim: int = Field(ge=1)
    bottom_mlp: list[int] = Field(min_length=1, description="hidden and output sizes; input is 13")
    top_mlp: list[int] = Field(min_length=1, description="hidden and output sizes; last must be 1")

    @model_validator(mode="after")
    def _bottom_matches_embeddings(self) -> "ModelConfig":
        # The dot interaction needs the bottom MLP output in the embedding space.
        if self.bottom_mlp[-1] != self.embedding_dim:
            raise ValueError(f"bottom_mlp must end in embedding_dim ({self.embedding_dim})")
        return self

    @field_validator("top_mlp")
    @classmethod
    def _one_logit(cls, v: list[int]) -> list[int]:
        if v[-1] != 1:
            raise ValueError("the top MLP must end in 1 output (the click logit)")
        return v


class TrainConfig(_Section):
    ranks_per_node: int = Field(ge=1)
    batch_size: int = Field(ge=1, description="global batch, split evenly across ranks")
    epochs: int = Field(ge=1)
    dense_lr: float = Field(gt=0)
    sparse_lr: float = Field(gt=0)
    sparse_optimizer: Literal["adagrad", "rowwise_adagrad", "sgd"] = Field(
        default="adagrad", description="the embedding tables' update, on the rows a batch touched (dlrm.optim): "
                                       "Adagrad (a sum of squares per coordinate), row-wise Adagrad (one per row, "
                                       "as FBGEMM and torchrec) or SGD")
    seed: int = 0
    eval_batch_size: int = Field(ge=1)
    precision: Literal["fp32", "bf16", "auto"] = Field(
        default="fp32", description="auto: bf16 when the CPU has native bf16 (dlrm.roofline.bf16_native)")
    # The MLPerf DLRM learning-rate schedule, applied to both optimizers (see dlrm.train.lr_scale).
    warmup_steps: int = Field(default=0, ge=0, description="linear warm-up steps; 0 = none")
    decay_start_step: int = Field(default=0, ge=0, description="step at which the polynomial decay starts")
    decay_steps: int = Field(default=0, ge=0, description="steps of the decay down to 0; 0 = no decay")
    eval_every_steps: int = Field(default=0, ge=0, description="evaluate every N steps; 0 = at the end only")
    eval_rows: int | None = Field(
        default=None, ge=1, description="test rows (a prefix) evaluated during training; None = all. "
                                        "The final evaluation always uses the whole split")
    target_auc: float | None = Field(default=None, gt=0.0, le=1.0, description="stop once reached; None = never")
    checkpoint_every_steps: int = Field(default=0, ge=0, description="RUN_DIR/checkpoint.pt every N steps; 0 = never")
    resume: bool = Field(default=False, description="continue from RUN_DIR/checkpoint.pt when it exists")
    shard_min_rows: int = Field(
        default=0, ge=0, description="tables of at least this many rows are sharded across the ranks (each on one "
                                     "rank, exchanged by all-to-all); smaller ones are replicated. 0 = replicate all")
    shared_memory: bool = Field(
        default=True, description="sum the dense gradients and exchange the sharded tables' vectors through /dev/shm "
                                  "when all ranks share one node and the backend is gloo (dlrm.shm: 3-7x faster than "
                                  "gloo's sockets); false: always gloo")

    @model_validator(mode="after")
    def _warmup_before_decay(self) -> "TrainConfig":
        if self.decay_steps and self.decay_start_step < self.warmup_steps:
            raise ValueError(f"decay_start_step ({self.decay_start_step}) must not come before the end of the "
                             f"warm-up ({self.warmup_steps})")
        return self


InferenceVariant = Literal["fp32", "bf16", "int8"]


class InferenceConfig(_Section):
    ranks: int = Field(ge=1)
    batch_size: int = Field(ge=1, description="the deployed batch size: variants are scored and timed at it")
    warmup_batches: int = Field(ge=0, description="untimed batches per rank before each timed point")
    max_batches: int = Field(ge=1, description="timed batches per rank per point at most")
    seconds_per_point: float = Field(
        gt=0, description="timed seconds per rank per point at most (the batch that crosses it still counts)"
    )
    sweep_batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        description="batch sizes timed in fp32; batch_size is always one of the points"
    )
    variants: list[InferenceVariant] = Field(
        min_length=1, description="precisions scored on the val split and timed at batch_size; must include fp32"
    )
    compile: bool = Field(
        default=True, description="run the variants compiled by TorchInductor when it works here (it needs a C++ "
                                  "compiler; a cold compile takes ~10-30 s per variant); false: eagerly")

    @field_validator("variants")
    @classmethod
    def _fp32_reference(cls, v: list[str]) -> list[str]:
        # fp32 is the checkpoint as trained: the accuracy the other variants are compared with.
        if "fp32" not in v:
            raise ValueError("variants must include fp32, the reference the others are compared with")
        if len(set(v)) != len(v):
            raise ValueError("variants must not repeat")
        return v


class ClusterConfig(_Section):
    nodes: int = Field(ge=1, description="Ray nodes the training ranks spread over (one placement bundle each)")
    cpus_per_node: int | None = Field(
        default=None, ge=1, description="cores per node; None: this machine's cores (split evenly when simulated)")
    ray_address: str | None = Field(
        default=None, description="head of a running Ray cluster (host:port); None: start Ray here, "
                                  "simulating `nodes` nodes on this machine when nodes > 1")
    mpiexec: str | None = Field(
        default=None, description="an MPI's mpiexec (MPICH, Intel MPI or Open MPI); None: the venv's MPICH")
    launcher: Literal["auto", "ray", "ssh"] = Field(
        default="auto", description="how mpiexec starts its proxies on the nodes: ray = through a Ray actor "
                                    "on each placed node; ssh = Hydra's ssh; auto = fork on one local node, else ray")


class Config(_Section):
    profile: str
    data: DataConfig
    preprocess: PreprocessConfig
    model: ModelConfig
    train: TrainConfig
    inference: InferenceConfig
    cluster: ClusterConfig
    results_dir: Path
    repeat: int = Field(default=1, ge=1, description="runs of the timed stages; the results keep medians and spread")

    @property
    def world_size(self) -> int:
        return self.cluster.nodes * self.train.ranks_per_node

    def to_json(self) -> dict:
        return self.model_dump(mode="json")


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def _parse_value(text: str) -> object:
    # YAML gives ints, floats, bools and lists ("[512,256]") their natural types.
    return yaml.safe_load(text) if text != "" else ""


def _apply_override(tree: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form section.key=value")
    dotted, value = override.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            raise ConfigError(f"unknown setting {dotted!r}: no section {key!r}")
        node = node[key]
    if keys[-1] not in node:
        raise ConfigError(f"unknown setting {dotted!r}; see bench/profiles/*.yaml for the names")
    node[keys[-1]] = _parse_value(value)


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f"={value!r}"
    return f"invalid setting {where}{shown}: {first['msg']}"


def resolve(profile: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a profile and apply ``section.key=value`` overrides; raise ConfigError on any problem."""
    path = PROFILES_DIR / f"{profile}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(available_profiles())}")
    tree = yaml.safe_load(path.read_text())
    tree["profile"] = profile
    for override in overrides:
        _apply_override(tree, override)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


def load(path: Path) -> Config:
    """Read a resolved configuration back (training and inference ranks do this)."""
    return Config.model_validate(json.loads(Path(path).read_text()))
