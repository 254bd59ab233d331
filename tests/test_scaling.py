"""Scaling summary arithmetic and the NODES list (unit)."""

import pytest

from bench.config import ConfigError
from bench.scaling import node_counts, summarise


def test_node_counts_are_sorted_distinct_positive():
    assert node_counts("4,1,2") == [1, 2, 4]
    for bad in ("", "1,1", "0,2", "two"):
        with pytest.raises(ConfigError, match="NODES="):
            node_counts(bad)


def test_efficiency_is_speedup_over_node_ratio_from_the_smallest_successful_point():
    points = summarise([{"nodes": 1, "samples_per_s": None}, {"nodes": 2, "samples_per_s": 1000.0},
                        {"nodes": 4, "samples_per_s": 1500.0}])
    assert points[0]["efficiency"] is None
    assert (points[1]["speedup"], points[1]["efficiency"]) == (1.0, 1.0)
    assert (points[2]["speedup"], points[2]["efficiency"]) == (1.5, 0.75)
