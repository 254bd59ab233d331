"""Splitting Kaggle's train.txt into day files: exact line counts, byte-identical, reused."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bench.config import DataConfig, resolve
from preprocess import kaggle
from preprocess.errors import DataError
from preprocess.layout import DATASET_MANIFEST, day_file
from tests.conftest import criteo_line

LINES = 7003  # 7 * 1000 + 3: days 0..2 get one line more


def kaggle_config(data_dir: Path, days: int = 2) -> DataConfig:
    return resolve("tiny", ["data.source=kaggle", f"data.dir={data_dir}", f"data.days={days}"]).data


def write_train(data_dir: Path, lines: int = LINES, final_newline: bool = True) -> Path:
    rng = random.Random(0)
    rows = [
        criteo_line(rng.randint(0, 1), [str(rng.randint(-2, 9999)) if rng.random() > 0.2 else "" for _ in range(13)],
                    [f"{rng.getrandbits(32):08x}" if rng.random() > 0.1 else "" for _ in range(26)])
        for _ in range(lines)
    ]
    train = data_dir / "kaggle" / "train.txt"
    train.parent.mkdir(parents=True)
    train.write_text("".join(rows)[: None if final_newline else -1])
    return train


def day_bytes(folder: Path) -> list[bytes]:
    return [day_file(folder, d).read_bytes() for d in range(kaggle.DAYS)]


def test_day_lines_follow_the_reference_split():
    assert kaggle.day_lines(LINES) == [1001, 1001, 1001, 1000, 1000, 1000, 1000]
    assert kaggle.day_lines(45_840_617) == [6_548_660] * 4 + [6_548_659] * 3  # the real train.txt
    assert sum(kaggle.day_lines(45_840_617)) == 45_840_617


@pytest.mark.parametrize("chunk", [kaggle.CHUNK, 1000, 97])  # day boundaries inside and across read chunks
def test_split_is_exact_and_byte_identical(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(kaggle, "CHUNK", chunk)
    train = write_train(tmp_path)
    folder, manifest = kaggle.split_days(kaggle_config(tmp_path))
    days = day_bytes(folder)
    assert [d.count(b"\n") for d in days] == [1001, 1001, 1001, 1000, 1000, 1000, 1000]
    assert all(d.endswith(b"\n") for d in days)
    assert b"".join(days) == train.read_bytes()
    assert manifest["source"] == "kaggle" and manifest["format"] == "criteo-tsv"
    assert manifest["train_days"] == [0, 1] and manifest["eval_day"] == 6  # tiny profile: 2 training days
    assert manifest["rows_per_day"] == [1001, 1001, 1001, 1000, 1000, 1000, 1000]
    assert sorted(p.name for p in folder.iterdir()) == sorted([DATASET_MANIFEST, *(f"day_{d}" for d in range(7))])


def test_last_line_without_newline_is_kept(tmp_path):
    train = write_train(tmp_path, lines=15, final_newline=False)
    folder, manifest = kaggle.split_days(kaggle_config(tmp_path))
    assert manifest["rows_per_day"] == [3, 2, 2, 2, 2, 2, 2]
    assert b"".join(day_bytes(folder)) == train.read_bytes()


def test_training_days_are_at_most_six(tmp_path):
    write_train(tmp_path, lines=70)
    _, manifest = kaggle.split_days(kaggle_config(tmp_path, days=20))
    assert manifest["train_days"] == [0, 1, 2, 3, 4, 5]


def test_split_is_reused_until_train_txt_changes(tmp_path):
    train = write_train(tmp_path)
    folder, first = kaggle.split_days(kaggle_config(tmp_path))
    stamps = [day_file(folder, d).stat().st_mtime_ns for d in range(kaggle.DAYS)]
    _, again = kaggle.split_days(kaggle_config(tmp_path, days=4))
    assert [day_file(folder, d).stat().st_mtime_ns for d in range(kaggle.DAYS)] == stamps
    assert again == {**first, "train_days": [0, 1, 2, 3]}

    train.write_text(train.read_text().split("\n", 1)[1])  # a different file: one line fewer
    _, changed = kaggle.split_days(kaggle_config(tmp_path))
    assert sum(changed["rows_per_day"]) == sum(first["rows_per_day"]) - 1
    assert b"".join(day_bytes(folder)) == train.read_bytes()


def test_missing_train_txt_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError) as excinfo:
        kaggle.split_days(kaggle_config(tmp_path))
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(tmp_path / "kaggle" / "train.txt") in message and "Kaggle account" in message


def test_too_short_train_txt_is_refused(tmp_path):
    write_train(tmp_path, lines=5)
    with pytest.raises(DataError, match="5 lines, too few"):
        kaggle.split_days(kaggle_config(tmp_path))
