"""Distributed plumbing: launcher environments, backend and IPEX detection, thread pinning."""

import types

import pytest
import torch

from dlrm import dist
from dlrm.dist import RankInfo

LAUNCHER_VARS = [
    "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS",
    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE",
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
]


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_mpich_and_intel_mpi(clean_env):
    for name, value in {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}.items():
        clean_env.setenv(name, value)
    assert dist.launcher_env() == RankInfo(3, 4, 1, 2, "mpich")


def test_open_mpi(clean_env):
    for name, value in {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8",
                        "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}.items():
        clean_env.setenv(name, value)
    assert dist.launcher_env() == RankInfo(5, 8, 1, 4, "openmpi")


def test_torchrun(clean_env):
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        clean_env.setenv(name, value)
    assert dist.launcher_env() == RankInfo(1, 2, 1, 2, "torchrun")


def test_no_launcher_is_a_single_process(clean_env):
    info = dist.launcher_env()
    assert (info.rank, info.world_size, info.local_rank, info.local_size) == (0, 1, 0, 1)
    assert info.is_main


def test_mpich_wins_over_leftover_torchrun_variables():
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
           "RANK": "0", "WORLD_SIZE": "1"}
    assert dist.launcher_env(env).launcher == "mpich"


def test_missing_local_variables_assume_one_node():
    assert dist.launcher_env({"PMI_RANK": "2", "PMI_SIZE": "3"}) == RankInfo(2, 3, 2, 3, "mpich")


@pytest.mark.parametrize("env, message", [
    ({"PMI_RANK": "0"}, "not PMI_SIZE"),
    ({"PMI_RANK": "x", "PMI_SIZE": "2"}, "not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}, "inconsistent"),
])
def test_broken_launcher_environments_are_reported(env, message):
    with pytest.raises(ValueError, match=message):
        dist.launcher_env(env)


def importer_of(modules: dict[str, object]):
    def importer(name: str) -> object:
        if name not in modules:
            raise ModuleNotFoundError(f"No module named {name!r}")
        module = modules[name]
        if isinstance(module, Exception):
            raise module
        return module
    return importer


def test_backend_is_ccl_only_when_the_bindings_import():
    assert dist.choose_backend(importer_of({"oneccl_bindings_for_pytorch": types.ModuleType("x")})) == "ccl"
    assert dist.choose_backend(importer_of({})) == "gloo"
    # A present but broken native library is as good as absent.
    assert dist.choose_backend(importer_of({"oneccl_bindings_for_pytorch": OSError("libccl.so")})) == "gloo"


def fake_ipex(version: str) -> types.ModuleType:
    module = types.ModuleType("intel_extension_for_pytorch")
    module.__version__ = version
    return module


def test_ipex_usable_only_when_its_minor_matches_torch(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    usable, reason = dist.ipex_status(importer_of({"intel_extension_for_pytorch": fake_ipex("2.13.10+cpu")}))
    assert usable and "matches" in reason
    usable, reason = dist.ipex_status(importer_of({"intel_extension_for_pytorch": fake_ipex("2.8.0+cpu")}))
    assert not usable and "2.8.0+cpu" in reason and "2.13.0" in reason
    usable, reason = dist.ipex_status(importer_of({}))
    assert not usable and "not importable" in reason
    usable, reason = dist.ipex_status(importer_of({"intel_extension_for_pytorch": ImportError("undefined symbol")}))
    assert not usable and "undefined symbol" in reason


@pytest.fixture
def no_pinning(monkeypatch):
    """Record what pin_threads asks for instead of changing this test process."""
    calls = {}
    monkeypatch.setattr(dist.os, "sched_setaffinity", lambda pid, cores: calls.setdefault("cores", list(cores)),
                        raising=False)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.setdefault("threads", n))
    return calls


@pytest.mark.parametrize("local_rank, expected", [(0, [0, 1, 2]), (1, [3, 4, 5]), (2, [6, 7, 8])])
def test_each_local_rank_gets_its_own_equal_share(no_pinning, local_rank, expected):
    record = dist.pin_threads(RankInfo(local_rank, 3, local_rank, 3), cores=list(range(10)))
    assert record["cores"] == expected == no_pinning["cores"]
    assert record["threads"] == 3 == no_pinning["threads"]
    assert not record["oversubscribed"]


def test_shares_never_overlap(no_pinning):
    shares = [dist.pin_threads(RankInfo(r, 4, r, 4), cores=[8, 9, 10, 11, 12, 13, 14, 15])["cores"] for r in range(4)]
    assert sorted(c for share in shares for c in share) == list(range(8, 16))


def test_more_ranks_than_cores_get_one_thread_each(no_pinning):
    record = dist.pin_threads(RankInfo(3, 4, 3, 4), cores=[0, 1])
    assert record["cores"] == [1] and record["threads"] == 1 and record["oversubscribed"]


def test_thread_budget_caps_the_share(no_pinning):
    record = dist.pin_threads(RankInfo(1, 2, 1, 2), cores=list(range(8)), max_threads=2)
    assert record["cores"] == [4, 5] and no_pinning["threads"] == 2


def test_init_needs_the_rendezvous_address_with_several_ranks(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("MASTER_PORT", "1234")
    with pytest.raises(RuntimeError, match="MASTER_ADDR not set"):
        dist.init(RankInfo(0, 2, 0, 2), "gloo")


# --- oneCCL's worker thread -------------------------------------------------------------------------

@pytest.mark.parametrize("cores, local_rank, compute, worker", [
    (list(range(8)), 1, [4, 5, 6], [7]),  # 4 cores each: 3 compute threads, the last core for the worker
    ([0, 1], 1, [1], [1]),  # one core each: nothing to spare, the worker shares it
])
def test_ccl_worker_gets_a_core_of_its_own_when_there_is_one(no_pinning, cores, local_rank, compute, worker):
    record = dist.pin_threads(RankInfo(local_rank, 2, local_rank, 2), cores=cores, ccl_worker=True)
    assert record["cores"] == compute == no_pinning["cores"] and no_pinning["threads"] == len(compute)
    assert record["ccl_worker_cores"] == worker
    assert dist.ccl_environment(record) == {"CCL_WORKER_COUNT": "1",
                                            "CCL_WORKER_AFFINITY": ",".join(map(str, worker))}


def test_ccl_worker_takes_a_core_the_thread_budget_leaves_over(no_pinning):
    record = dist.pin_threads(RankInfo(0, 2, 0, 2), cores=list(range(8)), max_threads=2, ccl_worker=True)
    assert record["cores"] == [0, 1] and record["ccl_worker_cores"] == [2]


def test_no_ccl_worker_with_gloo(no_pinning):
    assert "ccl_worker_cores" not in dist.pin_threads(RankInfo(0, 1, 0, 1), cores=[0, 1])


def test_ccl_settings_are_in_the_environment_before_the_group_starts(monkeypatch, no_pinning):
    """With the oneCCL bindings importing (faked), runner.start sets CCL_WORKER_* before joining the
    group, and records them with the rank's pinning."""
    from bench.config import resolve
    from dlrm import runner

    for name in LAUNCHER_VARS + ["CCL_WORKER_COUNT", "CCL_WORKER_AFFINITY", "OMP_NUM_THREADS"]:
        monkeypatch.setenv(name, "")  # so that what runner.start sets is undone after the test
        monkeypatch.delenv(name)
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setattr(runner, "node_cores", lambda cfg: [0, 1, 2, 3])
    seen = {}
    monkeypatch.setattr(dist, "init", lambda info, backend: seen.update(
        backend=backend, env={k: dist.os.environ.get(k) for k in ("CCL_WORKER_COUNT", "CCL_WORKER_AFFINITY")}))
    backend = dist.choose_backend(importer_of({"oneccl_bindings_for_pytorch": types.ModuleType("x")}))
    rank = runner.start(resolve("tiny"), backend, expected_ranks=2, prog="test")
    assert seen == {"backend": "ccl", "env": {"CCL_WORKER_COUNT": "1", "CCL_WORKER_AFFINITY": "3"}}
    assert rank.pinning["cores"] == [2] and rank.pinning["ccl_environment"]["CCL_WORKER_AFFINITY"] == "3"


@pytest.mark.parametrize("shape,permutation", [((2, 3), (0, 1)), ((2, 3), (1, 0)), ((2, 3, 4), (2, 0, 1))])
def test_gradient_views_take_the_parameters_layout(shape, permutation):
    """Fused Adam walks a parameter and its gradient as flat arrays: their strides must agree."""
    stored = torch.zeros([shape[d] for d in permutation])
    param = stored.permute(*[permutation.index(d) for d in range(len(shape))])  # the shape asked for, laid out in memory in another order
    assert param.shape == shape
    flat = torch.arange(param.numel(), dtype=torch.float32)
    view = dist._view_like(flat, param)
    assert view.shape == param.shape and view.stride() == param.stride() and view.data_ptr() == flat.data_ptr()


def test_a_gradient_view_ignores_the_strides_of_size_one_dimensions():
    param = torch.zeros(13, 1).T  # [1, 13], strides (1, 1): dense, a first layer of one output
    view = dist._view_like(torch.arange(13.0), param)
    assert view.shape == (1, 13) and view.stride()[1] == 1 and view[0, 12] == 12


def test_a_gradient_view_of_a_strided_parameter_is_refused():
    with pytest.raises(ValueError, match="not dense"):
        dist._view_like(torch.zeros(3), torch.zeros(6)[::2])
