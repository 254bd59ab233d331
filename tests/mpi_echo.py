"""A rank program for the launcher tests: reports what the launcher gave it, or fails on request."""

import json
import os
import sys
import time

from dlrm.dist import launcher_env

info = launcher_env()
if info.rank == 0:
    print("PROGRESS " + json.dumps({"step": 1, "steps": 2}), flush=True)
print(f"rank {info.rank} of {info.world_size} started", flush=True)
out = sys.argv[1]
keys = ("MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "GLIBC_TUNABLES")
# Written whole, then renamed: a test watching for the file must never read half of it.
with open(f"{out}/.rank{info.rank}.json.tmp", "w") as f:
    json.dump({k: os.environ.get(k) for k in keys} | {"pid": os.getpid(), "rank": info.rank, "size": info.world_size,
                                                       "local_rank": info.local_rank, "launcher": info.launcher}, f)
os.replace(f"{out}/.rank{info.rank}.json.tmp", f"{out}/rank{info.rank}.json")
if len(sys.argv) > 2 and sys.argv[2] == "fail" and info.rank == 1:
    print("ValueError: rank 1 was told to fail", flush=True)
    sys.exit(3)
if len(sys.argv) > 2 and sys.argv[2] == "hang":
    time.sleep(600)
