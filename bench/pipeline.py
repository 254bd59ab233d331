"""The whole benchmark, one command: data -> preprocess -> train -> evaluate -> inference -> results.

    python -m bench.pipeline --profile small [--set section.key=value ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench import cluster, launch, mllog, mpi_agent, repeats, report, results
from bench.config import Config, ConfigError, resolve
from bench.fsutil import atomic_write_json, read_json
from bench.progress import Reporter
from dlrm import roofline
from preprocess import criteo, kaggle, layout, spark_job, synthetic

STAGES = ("data", "preprocess", "train", "evaluate", "inference")


class StageError(RuntimeError):
    def __init__(self, stage: str, message: str, log: Path | None):
        where = f" (log: {log})" if log and f"(log: {log})" not in message else ""
        super().__init__(f"stage {stage} failed: {message}{where}")
        self.stage = stage


def _key(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Run:
    """State of one pipeline run: its configuration, folders and the results being filled in."""

    def __init__(self, cfg: Config, reporter: Reporter):
        self.cfg = cfg
        self.reporter = reporter
        started = results.utc_now()
        self.results: dict = {
            "schema_version": results.SCHEMA_VERSION,
            "run_id": results.run_id(cfg.profile, started),
            "profile": cfg.profile,
            "status": "running",
            "error": None,
            "started_at": started,
            "finished_at": None,
            "git": results.git_info(),
            "machine": results.machine_info(),
            "software": results.software_info(),
            "cluster": {"nodes": cfg.cluster.nodes, "ranks": cfg.world_size, "ranks_per_node": cfg.train.ranks_per_node},
            "config": cfg.to_json(),
            "dataset": {},
            "stages": {},
            "total_seconds": None,
        }
        self.mpi: launch.Mpi | None = None  # found once the run starts
        self.preprocess_samples: list[dict] = []  # per repeat of the Spark job (see bench.repeats)
        self.dir = Path(cfg.results_dir) / "runs" / self.results["run_id"]
        self.logs = self.dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / "config.json", cfg.to_json())

    @contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        """Time a stage; turn any failure into a one-line StageError naming its log."""
        record: dict = {}
        self.results["stages"][name] = record
        self.reporter.stage(name)
        start = time.perf_counter()
        try:
            yield record
        except (StageError, KeyboardInterrupt):
            raise
        except Exception as err:  # noqa: BLE001 - every failure becomes the stage's error
            log = self.logs / f"{name}.log"
            with open(log, "a") as f:
                traceback.print_exc(file=f)
            first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise StageError(name, first, log) from err
        finally:
            record.setdefault("seconds", round(time.perf_counter() - start, 3))


def data_stage(run: Run) -> tuple[Path, dict]:
    """Make or find the raw day files; return their folder and dataset manifest."""
    cfg = run.cfg.data
    with run.stage("data") as rec:
        if cfg.source == "criteo":
            with run.reporter.task("download bytes", total=None) as task:
                raw, manifest = criteo.dataset(cfg, progress=task.advance)
        elif cfg.source == "kaggle":
            raw, manifest = kaggle.split_days(cfg)
        else:
            raw = Path(cfg.dir) / "raw" / f"synthetic-{_key(cfg.model_dump(mode='json', exclude={'dir'}))}"
            rec["reused"] = (raw / layout.DATASET_MANIFEST).is_file()
            if rec["reused"]:
                manifest = read_json(raw / layout.DATASET_MANIFEST)
            else:
                total = (cfg.days + 1) * cfg.rows_per_day
                start = time.perf_counter()
                with run.reporter.task("generate rows", total=total) as task:
                    manifest = synthetic.generate(cfg, raw, workers=os.cpu_count() or 1, progress=task.advance)
                rec["rows_per_s"] = round(total / (time.perf_counter() - start), 1)
        run.results["dataset"] = {
            "source": cfg.source,
            "path": str(raw),
            "train_days": manifest["train_days"],
            "eval_day": manifest["eval_day"],
            "oracle_auc": manifest.get("oracle_auc"),
        }
    return raw, manifest


def preprocess_stage(run: Run, raw: Path, dataset: dict) -> Path:
    cfg = run.cfg
    train_files = [layout.day_file(raw, d) for d in dataset["train_days"]]
    eval_files = [layout.day_file(raw, dataset["eval_day"])]
    with run.stage("preprocess") as rec:
        missing = [str(f) for f in train_files + eval_files if not f.is_file()]
        if missing:
            raise RuntimeError(f"missing day files: {', '.join(missing)}")
        # Reuse only output made from these very files with the same settings.
        inputs = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in train_files + eval_files]
        key = _key({"inputs": inputs, "freq_threshold": cfg.preprocess.freq_threshold,
                    "max_ind_range": cfg.preprocess.max_ind_range, "job": spark_job.JOB_VERSION,
                    "format": layout.FORMAT_VERSION})
        out = Path(cfg.data.dir) / "processed" / key
        if (out / layout.MANIFEST).is_file():
            manifest = read_json(out / layout.MANIFEST)
            rec.update(reused=True, **manifest["timing"])
        else:
            manifest = spark_preprocess(run, train_files, eval_files, out)
            rec.update(reused=False, **manifest["timing"])
        rec["oov_rows"] = manifest["oov_rows"]
        rec["rows_read"] = manifest["rows_read"]
        rec["rows_rejected"] = sum(manifest["rows_rejected"].values())
        rec["vocab_sizes"] = manifest["vocab_sizes"]
        run.results["dataset"]["rows"] = manifest["rows"]
        run.results["dataset"]["processed_path"] = str(out)
    return out


def spark_preprocess(run: Run, train_files: list[Path], eval_files: list[Path], out: Path) -> dict:
    """Start Spark, warm it up, run the job (``repeat`` times: the extra runs write to scratch and are
    deleted); return the manifest with its timing: the job's rows/s (the median), Spark start-up and
    warm-up apart, and the parse floor of the same files."""
    cfg = run.cfg
    spark_cfg = cluster.spark_executors(cfg)
    start = time.perf_counter()
    job_seconds = []
    with run.reporter.task("spark job steps", total=spark_job.STEPS * cfg.repeat) as task:
        with cluster.spark_session(spark_cfg, run.dir / "spark-scratch", spread=cfg.cluster.nodes > 1) as spark:
            startup = time.perf_counter() - start
            # A tiny job first, so the figure measures the job, not JIT and worker start-up.
            warmup = spark_job.warm_up(spark, spark_cfg, run.dir / "spark-warmup")
            for attempt in range(cfg.repeat):
                target = out if attempt == 0 else run.dir / "preprocess-repeat"
                job_start = time.perf_counter()
                made = spark_job.run(spark, spark_cfg, train_files, eval_files, target, progress=task.note)
                job_seconds.append(time.perf_counter() - job_start)
                if attempt == 0:
                    manifest = made
                    if cfg.preprocess.engine == "raydp":  # executors start with the first job
                        run.results["cluster"]["spark_executors"] = cluster.spark_executor_nodes()
                else:
                    shutil.rmtree(target)
            task.update(spark_job.STEPS * cfg.repeat, total=spark_job.STEPS * cfg.repeat, info="done")
    floor = spark_job.parse_floor_rows_per_s(train_files + eval_files)  # after Spark has let go of the cores
    rates = [spark_job.rows_per_s(manifest, s) for s in job_seconds]
    run.preprocess_samples = [{"stages.preprocess.rows_per_s": r} for r in rates]
    manifest["timing"] = {
        **manifest["timing"],
        "spark_startup_seconds": round(startup, 3),
        "spark_warmup_seconds": round(warmup, 3),
        "job_seconds": round(statistics.median(job_seconds), 3),
        "rows_per_s": round(statistics.median(rates), 1),
        "rows_per_s_per_core": round(statistics.median(rates) / manifest["timing"]["cores"], 1),
        "parse_floor_rows_per_s": round(floor, 1),
    }
    atomic_write_json(out / layout.MANIFEST, manifest)
    return manifest


def probe_machine(run: Run, threads_per_rank: int) -> dict:
    """Measure the GEMM rate and memory bandwidth the ranks get: the ceiling of the roofline fractions."""
    start = time.perf_counter()
    with run.reporter.task("measure GEMM and memory bandwidth", total=None):
        measured = roofline.measure_machine(threads_per_rank, run.cfg.train.ranks_per_node)
    measured["seconds"] = round(time.perf_counter() - start, 3)
    run.results["machine"]["measured"] = measured
    return measured


def probe_gemm_again(run: Run, precision: str) -> None:
    """Once training is done: the GEMM rate of fp32 (inference's ceiling) and of the training precision
    measured again; the figures become the best readings (roofline.add_gemm_readings)."""
    measured = run.results["machine"]["measured"]
    start = time.perf_counter()
    with run.reporter.task("measure GEMM again", total=None):
        again = {dtype: roofline.measure_gemm(measured["threads_per_rank"], roofline.DTYPES[dtype])
                 for dtype in sorted({"fp32", precision})}
    roofline.add_gemm_readings(measured, again)
    measured["seconds"] = round(measured["seconds"] + time.perf_counter() - start, 3)


def roofline_fractions(run: Run, samples_per_s: float, training: bool, in_run_gflops: float, precision: str) -> dict:
    """Achieved samples/s over the compute-bound samples/s at the GEMM rate of the precision used: as the
    ranks sampled it during the stage (roofline_fraction), and at the best of the probes before and after
    training (roofline_fraction_best_probe, a stricter ceiling: the host's fastest moment)."""
    flops = roofline.flops_per_sample(run.cfg.model, training=training)
    best = run.results["machine"]["measured"]["machine_gemm_gflops"][precision]
    return {"roofline_fraction": round(roofline.roofline_fraction(samples_per_s, flops, in_run_gflops), 4),
            "roofline_fraction_best_probe": round(roofline.roofline_fraction(samples_per_s, flops, best), 4)}


def train_stage(run: Run, data: Path, place: cluster.Placement, agent: Path | None, log: str = "train") -> None:
    cfg = run.cfg
    threads = max(1, place.nodes[0]["cpus"] // cfg.train.ranks_per_node)
    probe_machine(run, threads)
    with run.stage("train") as rec:
        with run.reporter.task("train steps", total=None) as task:

            def on_progress(p: dict) -> None:
                if p.get("stage") != "train":
                    return
                task.update(p["step"], total=p["steps"], info=f"{p['samples_per_s']:,.0f} samples/s  loss {p['loss']:.4f}")

            launch.run(
                place, cfg.train.ranks_per_node, "dlrm.train",
                ["--config", str(run.dir / "config.json"), "--data", str(data), "--out", str(run.dir)],
                run.logs / f"{log}.log", threads, on_progress, agent, run.mpi, extra_env=launch.TRAINING_MALLOC,
            )
        out = read_json(run.dir / "train.json")
        rec.update(
            samples_per_s=out["samples_per_s"], steps=out["steps"], samples=out["samples"], final_loss=out["final_loss"],
            backend=out["backend"], ipex=out["ipex"], interaction_kernel=out["interaction_kernel"],
            sparse_update_kernel=out["sparse_update_kernel"], mlp_kernel=out["mlp_kernel"],
            shared_memory=out["shared_memory"],
            dense_optimizer=out["dense_optimizer"],
            threads_per_rank=out.get("threads_per_rank"),
            precision=out["precision"], lr_schedule=out["lr_schedule"], early_stopped=out["early_stopped"],
            resumed_from_step=out["resumed_from_step"], peak_rss_bytes=out["peak_rss_bytes"],
            auc_curve=out["auc_curve"], sharding=out["sharding"], loader=out["loader"],
            memory_estimate_bytes=out["memory_estimate_bytes"], phase_seconds=out["phase_seconds"],
            ccl_environment=out["ccl_environment"], malloc_environment=launch.TRAINING_MALLOC,
        )
        probe_gemm_again(run, rec["precision"])
        rec["gemm_in_run"] = out["gemm_in_run"]
        rec.update(roofline_fractions(run, out["samples_per_s"], True, out["gemm_in_run"]["machine_gflops"],
                                      rec["precision"]))
        for entry, pinned in zip(run.results["cluster"].get("placement", []), out["pinning"]):
            entry["cores"] = pinned["cores"]  # what each rank actually pinned to
        run.results["software"]["backend"] = out["backend"]
        run.results["software"]["ipex"] = out["ipex"]
    # Evaluation ran inside the training job; report it as its own stage.
    run.results["stages"]["train"]["seconds"] = round(rec["seconds"] - out["eval_seconds"], 3)
    run.results["stages"]["evaluate"] = {
        "seconds": out["eval_seconds"], "auc": out["auc"], "logloss": out["logloss"], "accuracy": out["accuracy"],
        "rows": out["test_rows"],
    }
    oracle = (run.results["dataset"].get("oracle_auc") or {}).get("test")
    if oracle is not None:
        run.results["stages"]["evaluate"]["oracle_auc"] = oracle
        run.results["stages"]["evaluate"]["auc_gap"] = round(oracle - out["auc"], 5)


def inference_stage(run: Run, data: Path, place: cluster.Placement, agent: Path | None, log: str = "inference") -> None:
    cfg = run.cfg
    ranks = cfg.inference.ranks
    single = cluster.Placement(place.nodes[:1])
    with run.stage("inference") as rec:
        with run.reporter.task("inference sweep and variants", total=None):
            launch.run(
                single, ranks, "dlrm.inference",
                ["--config", str(run.dir / "config.json"), "--data", str(data), "--checkpoint", str(run.dir / "model.pt"),
                 "--out", str(run.dir)],
                run.logs / f"{log}.log", max(1, single.nodes[0]["cpus"] // ranks), agent=agent, mpi=run.mpi,
                extra_env=launch.SERVING_MALLOC,
            )
        out = read_json(run.dir / "inference.json")
        keys = ("samples_per_s", "latency_ms", "batch_size", "batches", "ranks", "sweep", "best", "variants",
                "flops_per_sample", "compile", "interaction_kernel", "mlp_kernel", "gemm_gflops")
        rec.update({k: out[k] for k in keys})
        rec["malloc_environment"] = launch.SERVING_MALLOC
        # The fractions at the batch size that maximises throughput.
        rec.update(roofline_fractions(run, out["best"]["samples_per_s"], False, out["gemm_gflops"], "fp32"))


def execute(run: Run) -> None:
    cfg = run.cfg
    java = cluster.engine_environment(dict(os.environ))
    os.environ.update(java)  # Ray- and Spark-started JVMs inherit it
    run.results["software"]["java"] = f"{cluster.java_version(java['JAVA_HOME'] + '/bin/java')} ({java['BENCH_JAVA_ORIGIN']})"
    run.mpi = launch.find_mpi(cfg.cluster.mpiexec)
    run.results["software"]["mpi"] = run.mpi.version
    # Ray first: a cluster short of nodes is reported before any data is made or fetched.
    with cluster.ray_cluster(cfg) as ray_info:
        run.results["cluster"]["ray"] = {k: ray_info[k] for k in ("address", "nodes", "simulated")}
        raw, dataset = data_stage(run)
        processed = preprocess_stage(run, raw, dataset)
        with cluster.placement(cfg, cfg.train.ranks_per_node, ray_info["simulated"]) as place, \
                launcher(cfg, place, run.dir) as agent:
            run.results["cluster"]["launcher"] = "ray" if agent else ("ssh" if len(place.nodes) > 1 else "fork")
            run.results["cluster"]["nodes_placed"] = place.nodes
            run.results["cluster"]["placement"] = [
                {"rank": r["rank"], "node_id": r["node_id"], "ip": r["ip"], "cores": r["node_cores"] or []}
                for r in place.ranks()]
            if agent is not None:
                mpi_agent.check_shared_path(place, processed)
            samples = []
            for attempt in range(1, cfg.repeat + 1):
                suffix = f"-{attempt}" if cfg.repeat > 1 else ""
                train_stage(run, processed, place, agent, f"train{suffix}")
                inference_stage(run, processed, place, agent, f"inference{suffix}")
                samples.append(repeats.sample(run.results, ("train", "evaluate", "inference")))
                if attempt <= len(run.preprocess_samples):  # the job's own repeats (none when reused)
                    samples[-1].update(run.preprocess_samples[attempt - 1])
            if cfg.repeat > 1:
                run.results["repeats"] = repeats.summarise(samples)
                repeats.apply_medians(run.results, run.results["repeats"])


@contextmanager
def launcher(cfg: Config, place: cluster.Placement, run_dir: Path) -> Iterator[Path | None]:
    """The MPI agents on the placed nodes (their launcher-exec script), unless mpiexec forks or uses ssh."""
    use_ray = cfg.cluster.launcher == "ray" or (
        cfg.cluster.launcher == "auto" and (cfg.cluster.nodes > 1 or cfg.cluster.ray_address is not None))
    if not use_ray:
        yield None
        return
    with mpi_agent.agents(place, run_dir) as script:
        yield script


def write_views(run: Run) -> Path | None:
    """The HTML report and the MLPerf-style log of the run; a failure here never hides the results."""
    try:
        mllog.write_mllog(run.results, run.dir / "mllog.log")
        return report.write_report(run.results, run.dir)
    except Exception as err:  # noqa: BLE001 - the results file is what counts
        print(f"warning: could not write the report: {err}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="small")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = resolve(args.profile, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    # SIGTERM (CI cancelling, a scheduler) cleans up like Ctrl-C does; and SIGINT does so also when the
    # run was started as a background job, which shells start with SIGINT ignored.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    reporter = Reporter()
    run = Run(cfg, reporter)
    start = time.perf_counter()
    code = 0
    try:
        with reporter.redirect_output(run.logs / "engines.log"):
            execute(run)
        run.results["status"] = "succeeded"
    except StageError as err:
        run.results.update(status="failed", error=str(err))
        code = 1
    except KeyboardInterrupt:
        run.results.update(status="interrupted", error="interrupted by the user")
        code = 130
    except Exception as err:  # noqa: BLE001 - outside any stage: still recorded
        run.results.update(status="failed", error=f"{type(err).__name__}: {err}")
        code = 1
    finally:
        run.results["finished_at"] = results.utc_now()
        run.results["total_seconds"] = round(time.perf_counter() - start, 3)
        path = results.write(Path(cfg.results_dir), run.results)
        report_path = write_views(run)
    reporter.summary(run.results, path, report_path)
    if run.results["error"]:
        print(f"error: {run.results['error']}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
