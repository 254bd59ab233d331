"""DLRM's MLPs: Linear layers with ReLU between, and in fp32 a fused forward and backward.

nn.Linear + nn.ReLU make three passes over each layer's output forward (addmm copies the bias
into it, the GEMM adds to it, ReLU rewrites it) and three backward (ReLU's gradient into a new
tensor, the bias gradient's sum, the weight gradient's addition into its .grad). ``MLP`` keeps
those modules (the same parameters and state dict) and, given the compiled kernel
(dlrm/mlp.c), runs the stack as one autograd node (``FusedMLP``):

    forward   y = x Wᵀ                     one GEMM, then one pass: y = relu(y + b)
    backward  g = g ⊙ [y > 0];  db += Σ g   one pass
              dW += gᵀ x                   GEMM accumulating straight into W.grad
              dx = g W                     GEMM (none for an input without gradient)

On one core of the development machine that is 1-2 ms less per small-profile training step
(1024 rows per rank). It computes the same function: the gradients differ only in rounding
(the bias sums are added row by row).

In backward() the node adds the layers' gradients to their .grad tensors itself (dlrm.accumulate);
under torch.autograd.grad it returns them.

The fused path runs in fp32 without autocast, on one thread (the kernel's passes are single-
threaded; with more threads PyTorch's parallel ops are faster), with plain nn.Linear layers (not
IPEX's, quantised or TorchInductor-compiled ones); otherwise the modules run as usual.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from dlrm import native
from dlrm.accumulate import grad_to_accumulate

SOURCE = Path(__file__).with_name("mlp.c")
FALLBACK = "PyTorch's Linear and ReLU are used"

_i64, _i32, _ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p


class MLPKernel:
    """The compiled passes of dlrm/mlp.c on tensors (row-major float32 [rows, cols])."""

    def __init__(self, library: ctypes.CDLL):
        self._bias_act, self._act_backward = library.bias_act, library.act_backward
        self._bias_act.argtypes = [_ptr, _ptr, _i64, _i64, _i32]
        self._act_backward.argtypes = [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i32]

    def __deepcopy__(self, memo: dict) -> MLPKernel:
        return self  # stateless code: a copied model shares it

    def bias_act_(self, y: torch.Tensor, bias: torch.Tensor, relu: bool) -> torch.Tensor:
        """y = relu(y + bias) (or y + bias), in place."""
        rows, cols = y.shape
        self._bias_act(y.data_ptr(), bias.data_ptr(), rows, cols, int(relu))
        return y

    def act_backward(self, grad: torch.Tensor, y: torch.Tensor, out: torch.Tensor, bias_grad: torch.Tensor,
                     relu: bool) -> torch.Tensor:
        """out = grad masked by ReLU's output y (or grad); bias_grad += out's column sums. out may be grad."""
        rows, cols = grad.shape
        self._act_backward(grad.data_ptr(), y.data_ptr(), out.data_ptr(), bias_grad.data_ptr(), rows, cols, int(relu))
        return out


def load(compiler: str | None = None, march: str = "native") -> tuple[MLPKernel | None, str]:
    """The kernel compiled for this CPU, or None; and why (for the results)."""
    library, status = native.compile_library(SOURCE, compiler, march)
    if library is None:
        return None, f"{status}: {FALLBACK}"
    return MLPKernel(library), status


class MLP(nn.Sequential):
    """Linear layers of the given output sizes with ReLU between (and after the last if ``relu_last``);
    ``kernel``: the fused path where it applies (see the module docstring)."""

    def __init__(self, in_features: int, sizes: list[int], relu_last: bool, kernel: MLPKernel | None = None):
        layers: list[nn.Module] = []
        for i, out_features in enumerate(sizes):
            layers.append(nn.Linear(in_features, out_features))
            if i < len(sizes) - 1 or relu_last:
                layers.append(nn.ReLU(inplace=True))  # on the Linear's fresh output: no extra tensor
            in_features = out_features
        super().__init__(*layers)
        self.relu_last = relu_last
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = self.fusable(x)
        if layers is None:
            return super().forward(x)
        relus = [i < len(layers) - 1 or self.relu_last for i in range(len(layers))]
        if not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))):
            return fused_forward(self.kernel, layers, relus, x)[-1]
        return FusedMLP.apply(self.kernel, layers, relus, x, *self.parameters())

    def fusable(self, x: torch.Tensor) -> list[nn.Linear] | None:
        """The Linear layers, when FusedMLP can run them on ``x``; else None."""
        if (self.kernel is None or x.dtype != torch.float32 or x.dim() != 2 or torch.get_num_threads() != 1
                or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()):
            return None
        layers = [m for m in self if type(m) is nn.Linear]
        relus = [m for m in self if type(m) is nn.ReLU]
        if len(layers) + len(relus) != len(self) or len(relus) != len(layers) - (not self.relu_last):
            return None
        if any(p.dtype != torch.float32 for p in self.parameters()) or any(m.bias is None for m in layers):
            return None
        return layers


def fused_forward(kernel: MLPKernel, layers: list[nn.Linear], relus: list[bool], x: torch.Tensor
                  ) -> list[torch.Tensor]:
    """The input and every layer's output (after its ReLU)."""
    outputs = [x]
    for layer, relu in zip(layers, relus):
        x = kernel.bias_act_(torch.mm(x, layer.weight.t()), layer.bias, relu)
        outputs.append(x)
    return outputs


class FusedMLP(torch.autograd.Function):
    """The MLP as one autograd node; backward accumulates the parameters' gradients itself (see the
    module docstring) and returns only the input's."""

    @staticmethod
    def forward(ctx, kernel: MLPKernel, layers: list[nn.Linear], relus: list[bool], x: torch.Tensor,
                *parameters: torch.Tensor) -> torch.Tensor:
        outputs = fused_forward(kernel, layers, relus, x.contiguous())
        ctx.save_for_backward(*outputs)
        ctx.kernel, ctx.layers, ctx.relus = kernel, layers, relus
        ctx.input_grad = x.requires_grad
        return outputs[-1]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        outputs = ctx.saved_tensors
        kernel: MLPKernel = ctx.kernel
        grad = grad.contiguous()
        returned: list[torch.Tensor | None] = []  # each layer's (weight, bias) gradients, last layer first
        # The incoming gradient belongs to the caller: the first mask goes to a new tensor, later ones in place.
        masked = torch.empty_like(grad)
        for i in reversed(range(len(ctx.layers))):
            layer: nn.Linear = ctx.layers[i]
            weight, bias = layer.weight, layer.bias
            weight_grad, bias_grad = grad_to_accumulate(weight), grad_to_accumulate(bias)
            bias_sum = bias_grad if bias_grad is not None else torch.zeros_like(bias)
            kernel.act_backward(grad, outputs[i + 1], masked, bias_sum, ctx.relus[i])
            bias_returned = bias_sum if bias_grad is None and bias.requires_grad else None
            grad = masked
            weight_returned = None
            if weight_grad is not None:
                weight_grad.addmm_(grad.t(), outputs[i])
            elif weight.requires_grad:
                weight_returned = torch.mm(grad.t(), outputs[i])
            returned[:0] = [weight_returned, bias_returned]
            if i > 0 or ctx.input_grad:
                masked = grad = torch.mm(grad, weight)
        return None, None, None, grad if ctx.input_grad else None, *returned
