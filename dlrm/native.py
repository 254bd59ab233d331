"""The project's C kernels (dlrm/*.c): compiled when a job starts, for the CPU it runs on, and loaded with ctypes.

Compiling takes ~0.3 s (cc or gcc, -O3 -march=native) into a temporary directory removed once the
library is loaded. Each caller keeps a PyTorch fallback for when this returns no library, and says why.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC"]
COMPILE_TIMEOUT = 120  # seconds; it takes ~0.3


def compile_library(source: Path, compiler: str | None = None, march: str = "native") -> tuple[ctypes.CDLL | None, str]:
    """``source`` compiled for this CPU (or the instruction set ``march`` names) and loaded, and how;
    or None and why not."""
    compiler = compiler or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or shutil.which(compiler) is None:
        return None, f"no C compiler ({compiler or 'cc or gcc'}) found"
    flags = [FLAGS[0], f"-march={march}", *FLAGS[1:]]
    with tempfile.TemporaryDirectory(prefix="dlrm-native-") as tmp:
        library = Path(tmp) / f"{source.stem}.so"
        try:
            done = subprocess.run([compiler, *flags, "-o", str(library), str(source)], capture_output=True,
                                  text=True, timeout=COMPILE_TIMEOUT)
            if done.returncode != 0:
                first = (done.stderr.strip().splitlines() or ["no output"])[0]
                return None, f"{compiler} could not compile {source.name} ({first})"
            loaded = ctypes.CDLL(str(library))  # mapped: the file can go
        except (OSError, subprocess.TimeoutExpired) as err:  # e.g. a temporary directory mounted noexec
            return None, f"{source.name} could not be built or loaded ({err})"
    return loaded, f"compiled with {compiler} {' '.join(flags[:3])}"
