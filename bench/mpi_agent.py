"""MPI's remote shell, through Ray: how mpiexec starts its proxies on the placed nodes without SSH.

Hydra (MPICH's mpiexec) starts one proxy per host by running ``<launcher-exec> [-x] <host> <proxy
command>``, as it would run ``ssh``. Here the hosts are Ray node ids and the launcher-exec is this
module: it joins the run's Ray cluster and hands the proxy command to the ``MpiAgent`` actor that
the pipeline placed in that node's bundle of the training placement group, which runs it on its
node and returns its exit status. The same idea as the MPI Operator's ``kubectl exec`` agent.

    python -m bench.mpi_agent --address <gcs> --namespace <ns> [-x] <node id> <proxy command ...>
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.cluster import Placement

NAMESPACE_PREFIX = "dlrm-mpi-"
OUTPUT_TAIL = 50  # lines of a proxy's own output handed back (rank output travels through Hydra)
PR_SET_PDEATHSIG = 1


def actor_name(node_id: str) -> str:
    return f"mpi-agent-{node_id}"


def _die_with_parent() -> None:
    """In the proxy before exec: the kernel kills it when the actor's worker process dies."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class MpiAgent:
    """Runs proxy commands on its node, pinned to the node's cores; stops them on request."""

    def __init__(self, cores: list[int] | None):
        self.cores = cores
        self.procs: list[subprocess.Popen] = []
        self.lock = threading.Lock()

    def node(self) -> tuple[str, int]:
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()

    def sees(self, path: str) -> bool:
        """Is the (shared-storage) path visible from this node?"""
        return Path(path).exists()

    def run(self, command: str) -> tuple[int, str]:
        def prepare() -> None:
            _die_with_parent()
            if self.cores is not None:
                os.sched_setaffinity(0, self.cores)

        proc = subprocess.Popen(["/bin/sh", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True, preexec_fn=prepare)
        with self.lock:
            self.procs.append(proc)
        out, _ = proc.communicate()
        return proc.returncode, "\n".join(out.splitlines()[-OUTPUT_TAIL:])

    def stop(self) -> int:
        """Kill every proxy this agent started, with its ranks (their process group); how many were running."""
        with self.lock:
            running = [p for p in self.procs if p.poll() is None]
        for proc in running:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(running)


@contextmanager
def agents(place: Placement, run_dir: Path) -> Iterator[Path]:
    """One MpiAgent per placement bundle; yields the launcher-exec script mpiexec calls. Stopped on exit."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    namespace = ray.get_runtime_context().namespace
    remote = ray.remote(MpiAgent)
    handles = [
        remote.options(
            name=actor_name(node["node_id"]), namespace=namespace, num_cpus=node["cpus"], max_concurrency=4,
            scheduling_strategy=PlacementGroupSchedulingStrategy(place.group, placement_group_bundle_index=i),
        ).remote(node["cores"])
        for i, node in enumerate(place.nodes)
    ]
    try:
        placed = ray.get([h.node.remote() for h in handles], timeout=120)
        for node, (node_id, _) in zip(place.nodes, placed):
            if node_id != node["node_id"]:
                raise RuntimeError(f"the MPI agent for node {node['node_id']} started on {node_id}")
        script = run_dir / "mpi-agent"
        script.write_text(
            "#!/bin/sh\n# Hydra's launcher-exec for this run: starts each MPI proxy through Ray (bench/mpi_agent.py).\n"
            f"exec {sys.executable} -m bench.mpi_agent --address {ray.get_runtime_context().gcs_address} "
            f"--namespace {namespace} \"$@\"\n")
        script.chmod(0o755)
        yield script
    finally:
        try:
            ray.get([h.stop.remote() for h in handles], timeout=30)
        except Exception:  # noqa: BLE001 - an agent already gone has nothing left to stop
            pass
        for h in handles:
            ray.kill(h)


def check_shared_path(place: Placement, path: Path) -> None:
    """The data must be on storage every node sees (the same path): check it from each node's agent."""
    import ray

    handles = [ray.get_actor(actor_name(n["node_id"]), namespace=ray.get_runtime_context().namespace)
               for n in place.nodes]
    missing = [n["node_id"] for n, ok in zip(place.nodes, ray.get([h.sees.remote(str(path)) for h in handles]))
               if not ok]
    if missing:
        raise RuntimeError(f"{path} is not visible on node(s) {', '.join(missing)}: put DATA_DIR on storage "
                           "shared by every node, mounted at the same path")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mpi_agent", description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("-x", action="store_true", help="(ssh's no-X11 flag, which Hydra passes; ignored)")
    parser.add_argument("host", help="the Ray node id of the target node")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    import ray

    ray.init(address=args.address, namespace=args.namespace, log_to_driver=False, logging_level="ERROR")
    try:
        agent = ray.get_actor(actor_name(args.host), namespace=args.namespace)
    except ValueError:
        print(f"mpi_agent: no MPI agent on Ray node {args.host}", file=sys.stderr)
        return 255
    code, output = ray.get(agent.run.remote(" ".join(args.command)))
    if output:
        print(output, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
