"""The HTML run report: self-contained, its plots real PNGs of the run's numbers, and it renders in a browser."""

from __future__ import annotations

import base64
import io
import json
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from bench.progress import _figure
from bench.report import REPORT_NAME, main, write_report
from tests.test_schema import failed_in_preprocess, succeeded_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM = Path("/usr/bin/chromium")


class Page(HTMLParser):
    """What a test reads off the report: its images, its tables (caption -> rows of cell text), its notes."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self.images: dict[str, str] = {}  # alt -> src
        self.tables: list[tuple[str, list[list[str]]]] = []
        self.notes: list[str] = []
        self.outside_refs: list[str] = []
        self._text: list[str] | None = None
        self.feed(path.read_text())

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images[a["alt"] or ""] = a["src"] or ""
        # Self-contained: nothing is fetched from a file or server beside the page.
        self.outside_refs += [v for k, v in attrs if k in ("src", "href") and v and not v.startswith("data:")]
        if tag == "table":
            self.tables.append(("", []))
        if tag == "tr":
            self.tables[-1][1].append([])
        if tag in ("td", "th", "caption") or (tag == "p" and a.get("class") == "note"):
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if self._text is None:
            return
        text = "".join(self._text).strip()
        if tag in ("td", "th"):
            self.tables[-1][1][-1].append(text)
        elif tag == "caption":
            self.tables[-1] = (text, self.tables[-1][1])
        elif tag == "p":
            self.notes.append(text)
        else:
            return
        self._text = None

    def table(self, caption: str) -> list[list[str]]:
        return next(rows for cap, rows in self.tables if cap == caption)

    def rows(self) -> list[list[str]]:
        return [row for _, rows in self.tables for row in rows]


def with_curve_and_sweep() -> dict:
    run = succeeded_run()
    run["stages"]["train"]["auc_curve"] = [
        {"step": 20, "samples": 10240, "auc": 0.7012, "loss": 0.5123},
        {"step": 40, "samples": 20480, "auc": 0.7523, "loss": 0.4811},
        {"step": 60, "samples": 30720, "auc": 0.7734, "loss": 0.4622},
        {"step": 78, "samples": 39936, "auc": 0.7856, "loss": 0.4456},
    ]
    run["stages"]["inference"]["sweep"] = [
        {"batch_size": 128, "samples_per_s": 3210.0, "latency_ms": {"p50": 39.87, "p99": 61.25}},
        {"batch_size": 256, "samples_per_s": 5120.0, "latency_ms": {"p50": 50.01, "p99": 88.5}},
        {"batch_size": 1024, "samples_per_s": 7450.0, "latency_ms": {"p50": 137.4, "p99": 201.3}},
    ]
    return run


def png(src: str) -> np.ndarray:
    """The image of a data URI, checked to be a PNG, as an array."""
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    data = base64.b64decode(src[len(prefix):], validate=True)
    assert data[:8] == PNG_MAGIC
    return imread(io.BytesIO(data), format="png")


def assert_a_picture(pixels: np.ndarray) -> None:
    """At least 100x100 and not one flat colour."""
    height, width = pixels.shape[:2]
    assert height > 100 and width > 100
    assert not (pixels == pixels[0, 0]).all()


def report(run_dir: Path, results: dict) -> Page:
    path = write_report(results, run_dir)
    assert path == run_dir / REPORT_NAME
    assert [p.name for p in run_dir.iterdir()] == [REPORT_NAME]  # no temporary file left behind
    return Page(path)


# Rendering three plots takes a second or two: each report is made once and read by several tests.
@pytest.fixture(scope="module")
def full_page(tmp_path_factory) -> Page:
    return report(tmp_path_factory.mktemp("full"), with_curve_and_sweep())


@pytest.fixture(scope="module")
def plain_page(tmp_path_factory) -> Page:
    return report(tmp_path_factory.mktemp("plain"), succeeded_run())


def test_a_report_with_curve_and_sweep_plots_and_tabulates_them(full_page):
    page = full_page
    assert set(page.images) == {"stage timeline", "training loss and AUC",
                                "inference throughput and latency by batch size"}
    for src in page.images.values():
        assert_a_picture(png(src))
    assert page.outside_refs == []
    assert page.table("Training curve")[1:] == [
        ["20", "10,240", "0.7012", "0.5123"], ["40", "20,480", "0.7523", "0.4811"],
        ["60", "30,720", "0.7734", "0.4622"], ["78", "39,936", "0.7856", "0.4456"]]
    assert page.table("Inference by batch size")[1:] == [
        ["128", "3,210", "39.87", "61.25"], ["256", "5,120", "50.01", "88.50"], ["1,024", "7,450", "137.40", "201.30"]]
    assert page.table("Stage times")[1:] == [
        ["data", "0", "2.83", "2.83", "no"], ["preprocess", "2.83", "62.46", "65.29", "no"],
        ["train", "65.29", "12.39", "77.68", "–"], ["evaluate", "77.68", "0.08229", "77.76", "–"],
        ["inference", "77.76", "4.57", "82.33", "–"]]
    assert not any("recorded no" in n for n in page.notes)


def test_a_report_without_curve_or_sweep_says_so_and_plots_the_final_figures(plain_page):
    page = plain_page
    assert len(page.images) == 3
    for src in page.images.values():
        assert_a_picture(png(src))
    assert any("no training curve" in n for n in page.notes)
    assert any("no batch-size sweep" in n for n in page.notes)
    assert ["test AUC", "0.7892"] in page.table("Final figures")
    assert page.table("Inference by batch size")[1:] == [["512", "6,873", "17.59", "247.06"]]


def test_the_summary_environment_and_config_tables_carry_the_runs_numbers(plain_page):
    rows = plain_page.rows()
    for expected in (
        ["test AUC", "0.7892", ""], ["oracle AUC (synthetic data's true click model)", "0.8275", ""],
        ["training throughput", "15,966", "samples/s"], ["preprocessing (Spark job)", "1,199", "rows/s"],
        ["inference latency p50", "17.59", "ms"], ["inference latency p99", "247.06", "ms"],
        ["cpu_model", "AMD EPYC"], ["memory", "23.5 GiB"], ["torch", "2.13.0+cpu"], ["ipex.used", "no"],
        ["ray.address", "192.0.2.2:34601"], ["1", "77adc75e", "192.0.2.2", "[1]"],
        ["train.batch_size", "512"], ["model.bottom_mlp", "[64, 16]"], ["data.synthetic.zipf_exponent", "1.20"],
    ):
        assert expected in rows


def test_a_failed_run_still_gets_a_report(tmp_path):
    page = report(tmp_path, failed_in_preprocess())
    assert list(page.images) == ["stage timeline"]
    assert_a_picture(png(page.images["stage timeline"]))
    assert any(n.startswith("error: stage preprocess failed") for n in page.notes)
    assert "Training did not run in this run." in page.notes


def test_the_cli_writes_the_report_into_the_runs_folder(tmp_path, capsys):
    results = tmp_path / "latest.json"
    results.write_text(json.dumps(failed_in_preprocess()))  # one plot: quick
    assert main([str(results)]) == 0
    expected = tmp_path / "runs" / "tiny-20261204T202900Z" / REPORT_NAME
    assert capsys.readouterr().out.strip() == str(expected)
    assert expected.is_file()


def test_chromium_renders_the_report(tmp_path, full_page):
    if not CHROMIUM.exists():
        pytest.skip("chromium not installed")
    path = full_page.path
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
         path.as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert shot.is_file(), f"no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    pixels = imread(shot)
    assert pixels.shape[:2] == (2000, 1200)
    assert_a_picture(pixels)


def test_rank_rows_pair_each_ranks_tables_with_its_memory():
    from bench.report import rank_rows

    train = {"peak_rss_bytes": [1 << 30, 3 << 29], "sharding": {"ranks": [{"rank": 0, "tables": [9, 19], "rows": 120},
                                                                       {"rank": 1, "tables": [0], "rows": 70}]},
             "memory_estimate_bytes": [{"total": 1 << 29}, {"total": 1 << 29}]}
    assert rank_rows(train) == [(0, [9, 19], 120, "1,024 MiB", "512 MiB"), (1, [0], 70, "1,536 MiB", "512 MiB")]
    assert rank_rows({"peak_rss_bytes": [1 << 20]}) == [(0, None, None, "1 MiB", None)]


def test_the_terminal_summary_gives_each_stage_its_figure_and_roofline_fraction():
    train = {"samples_per_s": 68799.4, "roofline_fraction": 0.6412}
    assert _figure("train", train) == "68,799 samples/s, 0.64 of the roofline"
    inference = {"samples_per_s": 236316.0, "latency_ms": {"p50": 17.333, "p99": 19.0}, "roofline_fraction": 0.7}
    assert _figure("inference", inference) == "236,316 samples/s, p50 17.33 ms, p99 19.00 ms, 0.70 of the roofline"
    assert _figure("train", {"samples_per_s": 10.0}) == "10 samples/s"  # no fraction recorded: none shown
