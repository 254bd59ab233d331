"""A rank program for the launcher tests: reports what the launcher gave it, or fails on request."""

import json
import os
import sys
import time

rank = int(os.environ["PMI_RANK"])
if rank == 0:
    print("PROGRESS " + json.dumps({"step": 1, "steps": 2}), flush=True)
print(f"rank {rank} of {os.environ['PMI_SIZE']} started", flush=True)
out = sys.argv[1]
keys = ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({k: os.environ.get(k) for k in keys} | {"pid": os.getpid()}, f)
if len(sys.argv) > 2 and sys.argv[2] == "fail" and rank == 1:
    print("ValueError: rank 1 was told to fail", flush=True)
    sys.exit(3)
if len(sys.argv) > 2 and sys.argv[2] == "hang":
    time.sleep(600)
