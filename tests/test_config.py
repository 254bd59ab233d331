from pathlib import Path

import pytest

from bench.config import ConfigError, available_profiles, load, resolve


def test_profiles_resolve_with_reference_sizes():
    assert {"small", "tiny"} <= set(available_profiles())
    small = resolve("small")
    assert small.model.embedding_dim == 64
    assert small.model.bottom_mlp == [512, 256, 64]
    assert small.model.top_mlp == [512, 256, 1]
    assert small.train.batch_size == 2048 and small.train.ranks_per_node == 2 and small.world_size == 2
    assert small.data.days == 4 and small.data.source == "synthetic"


def test_overrides_are_typed():
    cfg = resolve("tiny", ["data.days=3", "data.dir=/tmp/x", "model.bottom_mlp=[32,16]", "preprocess.engine=local"])
    assert cfg.data.days == 3 and cfg.data.dir == Path("/tmp/x")
    assert cfg.model.bottom_mlp == [32, 16] and cfg.preprocess.engine == "local"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.days=zero"], "invalid setting data.days='zero'"),
        (["data.days=0"], "data.days=0"),
        (["data.source=imagenet"], "data.source='imagenet'"),
        (["preprocess.engine=yarn"], "preprocess.engine"),
        (["model.embedding_dim=32"], "bottom_mlp must end in embedding_dim"),
        (["model.top_mlp=[8,2]"], "must end in 1 output"),
        (["data.nope=1"], "unknown setting 'data.nope'"),
        (["nope.days=1"], "no section 'nope'"),
        (["days"], "not of the form"),
    ],
)
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")) as err:
        resolve("tiny", overrides)
    assert "\n" not in str(err.value)


def test_unknown_profile_names_the_choices():
    with pytest.raises(ConfigError, match="unknown profile 'huge'; choose one of .*small"):
        resolve("huge")


def test_round_trip_through_json(tmp_path):
    cfg = resolve("small", ["train.seed=7"])
    (tmp_path / "c.json").write_text(__import__("json").dumps(cfg.to_json()))
    assert load(tmp_path / "c.json") == cfg
