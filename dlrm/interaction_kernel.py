"""DLRM's dot interaction as one compiled C kernel (dlrm/interaction.c), forward and backward.

The PyTorch interaction (dlrm.model.DotInteraction) concatenates the vectors into T, runs
two batched matmuls of tiny [28, d] matrices, and gathers and concatenates columns: in a
training step of the small profile on one core that is 8-9 ms of the ~52, the batched
matmuls at a third of the GEMM rate because each pass streams T from memory. The kernel
takes one sample at a time while its vectors are in L1: the pairs' dot products straight
into the top MLP's input, and backward dT = S T with S gathered per sample, writing each
block's gradient contiguous (no copies before the lookups' backward or the all-to-all).

It computes in fp32 also in bf16 training (the bottom MLP's bf16 output is widened; the
products of bf16 values are exact in fp32), where it replaces a bf16 batched matmul.
It is compiled when a training or inference job starts (~0.3 s; cc or gcc, -O3 -march=native for the
CPU it runs on) into a temporary directory removed once loaded. Without a compiler the
model uses the PyTorch interaction; train.json says which ("interaction_kernel").
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("interaction.c")
FLAGS = ["-O3", "-fopenmp-simd", "-shared", "-fPIC"]
COMPILE_TIMEOUT = 120  # seconds; it takes ~0.3

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class InteractionKernel:
    """The compiled kernel's two functions on tensors. Batches are split over torch's thread
    count, one slice per thread (ctypes releases the GIL during a call)."""

    def __init__(self, library: ctypes.CDLL):
        self._forward, self._backward = library.interaction_forward, library.interaction_backward
        self._forward.argtypes = [_i64, _i64, _i64, _i64, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _i64]
        self._backward.argtypes = [_i64, _i64, _i64, _i64, _ptr, _ptr, _i64, _ptr, _ptr, _i64, _ptr, _ptr]
        self._forward.restype = self._backward.restype = None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_threads = 0

    def __deepcopy__(self, memo: dict) -> InteractionKernel:
        return self  # stateless code: a copied model (e.g. by IPEX's optimize) shares it

    def forward(self, first: torch.Tensor, second: torch.Tensor, width: int, bottom: torch.Tensor,
                blocks: list[torch.Tensor]) -> torch.Tensor:
        """[B, width]: bottom, then <T_first[p], T_second[p]> for each pair p (int32 positions in
        T = cat(bottom, *blocks)), then zeros. The inputs must be ``readable``."""
        batch, dim = bottom.shape
        out = bottom.new_empty(batch, width)
        base, stride = _vectors([bottom, *blocks])
        self._run(batch, lambda start, stop: self._forward(
            start, stop, dim, len(base), base, stride, len(first), first.data_ptr(), second.data_ptr(),
            out.data_ptr(), width))
        return out

    def backward(self, symmetric: torch.Tensor, pairs: int, grad: torch.Tensor, bottom: torch.Tensor,
                 blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        """The gradients of bottom and of each block (new contiguous tensors) from the output's
        gradient ``grad`` [B, width]; ``symmetric`` [F * F] int32: the column among the pairs of
        pair (f, o)'s gradient, ``pairs`` on the diagonal (see dlrm.model._Layout)."""
        batch, dim = bottom.shape
        grad = grad.contiguous()
        grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in [bottom, *blocks]]
        base, stride = _vectors([bottom, *blocks])
        grad_base, grad_stride = _vectors(grads)
        self._run(batch, lambda start, stop: self._backward(
            start, stop, dim, len(base), base, stride, pairs, symmetric.data_ptr(), grad.data_ptr(),
            grad.shape[1], grad_base, grad_stride))
        return grads

    def _run(self, batch: int, call) -> None:
        threads = min(torch.get_num_threads(), batch)
        if threads <= 1:
            call(0, batch)
            return
        if self._pool_threads != threads:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="interaction")
            self._pool_threads = threads
        bounds = [batch * i // threads for i in range(threads + 1)]
        for future in [self._pool.submit(call, a, b) for a, b in zip(bounds, bounds[1:])]:
            future.result()


def readable(bottom: torch.Tensor, blocks: list[torch.Tensor]) -> bool:
    """Whether the kernel can read these inputs in place: bottom [B, d] and blocks [B, n_i, d],
    float32 on the CPU, each vector's d floats contiguous (the C code trusts the shapes)."""
    if bottom.dim() != 2:
        return False
    batch, dim = bottom.shape
    return all(t.device.type == "cpu" and t.layout == torch.strided and t.dtype == torch.float32
               and t.stride(-1) == 1 for t in [bottom, *blocks]) \
        and all(b.dim() == 3 and b.shape[0] == batch and b.shape[2] == dim and b.stride(1) == dim for b in blocks)


def _vectors(tensors: list[torch.Tensor]) -> tuple[ctypes.Array, ctypes.Array]:
    """Where vector f of sample b starts (base[f] + b * stride[f], in floats) for the vectors of
    ``tensors`` ([B, d], or [B, n, d] for n vectors) in order."""
    base, stride = [], []
    for t in tensors:
        for j in range(1 if t.dim() == 2 else t.shape[1]):
            base.append(t.data_ptr() + 4 * j * (t.stride(1) if t.dim() == 3 else 0))
            stride.append(t.stride(0))
    return (ctypes.c_void_p * len(base))(*base), (ctypes.c_int64 * len(stride))(*stride)


def load(compiler: str | None = None, march: str = "native") -> tuple[InteractionKernel | None, str]:
    """The kernel compiled for this CPU (or the instruction set ``march`` names), or None; and why
    (for the results). Its vector width follows the instruction set: AVX-512, AVX or SSE."""
    compiler = compiler or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or shutil.which(compiler) is None:
        return None, f"no C compiler ({compiler or 'cc or gcc'}) found: the PyTorch interaction is used"
    flags = [FLAGS[0], f"-march={march}", *FLAGS[1:]]
    with tempfile.TemporaryDirectory(prefix="dlrm-interaction-") as tmp:
        library = Path(tmp) / "interaction.so"
        try:
            done = subprocess.run([compiler, *flags, "-o", str(library), str(SOURCE)], capture_output=True,
                                  text=True, timeout=COMPILE_TIMEOUT)
            if done.returncode != 0:
                first = (done.stderr.strip().splitlines() or ["no output"])[0]
                return None, f"{compiler} could not compile {SOURCE.name} ({first}): the PyTorch interaction is used"
            loaded = ctypes.CDLL(str(library))  # mapped: the file can go
        except (OSError, subprocess.TimeoutExpired) as err:  # e.g. a temporary directory mounted noexec
            return None, f"the compiled interaction could not be built or loaded ({err}): the PyTorch interaction is used"
    return InteractionKernel(loaded), f"compiled with {compiler} {' '.join(flags[:3])}"
