"""The MPI launcher, run for real with the venv's mpiexec."""

import json
import os
import signal
import threading
import time

import psutil
import pytest

from bench import launch
from bench.cluster import Placement

ONE_NODE = Placement([{"node_id": "n0", "ip": "10.0.0.1", "cpus": 2, "ranks": 2}])


def test_command_for_one_node_forks_locally():
    cmd = launch.command(ONE_NODE, 2, "dlrm.train", ["--x"], {"A": "1"})
    assert cmd[1:5] == ["-n", "2", "-ppn", "2"]
    assert "-launcher" in cmd and cmd[cmd.index("-launcher") + 1] == "fork"
    assert cmd[cmd.index("-genv") + 1 : cmd.index("-genv") + 3] == ["A", "1"]
    assert cmd[-4:] == ["-u", "-m", "dlrm.train", "--x"]


def test_command_for_many_nodes_lists_the_placed_hosts():
    two = Placement(ONE_NODE.nodes + [{"node_id": "n1", "ip": "10.0.0.2", "cpus": 2, "ranks": 2}])
    cmd = launch.command(two, 2, "m", [], {})
    assert cmd[cmd.index("-hosts") + 1] == "10.0.0.1:2,10.0.0.2:2"
    assert cmd[2] == "4"


def test_ranks_get_rank_env_master_and_threads(tmp_path):
    seen = []
    launch.run(ONE_NODE, 2, "tests.mpi_echo", [str(tmp_path)], tmp_path / "log", 1, seen.append)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["PMI_RANK"] for r in ranks] == ["0", "1"]
    assert {r["PMI_SIZE"] for r in ranks} == {"2"}
    assert sorted(r["MPI_LOCALRANKID"] for r in ranks) == ["0", "1"]
    assert {r["MASTER_ADDR"] for r in ranks} == {"127.0.0.1"}
    assert {r["OMP_NUM_THREADS"] for r in ranks} == {"1"}
    assert seen == [{"step": 1, "steps": 2}]


def test_a_failing_rank_fails_the_launch_naming_the_log(tmp_path):
    with pytest.raises(launch.LaunchError, match=r"exited with code \d+: .*rank 1 was told to fail.*log: .*log"):
        launch.run(ONE_NODE, 2, "tests.mpi_echo", [str(tmp_path), "fail"], tmp_path / "log", 1)


def test_interrupting_the_launch_leaves_no_rank_behind(tmp_path):
    pids: list[int] = []

    def watch():
        while len(list(tmp_path.glob("rank*.json"))) < 2:
            time.sleep(0.1)
        pids.extend(json.loads(p.read_text())["pid"] for p in tmp_path.glob("rank*.json"))
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends

    threading.Thread(target=watch, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        launch.run(ONE_NODE, 2, "tests.mpi_echo", [str(tmp_path), "hang"], tmp_path / "log", 1)
    assert len(pids) == 2
    time.sleep(0.5)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
