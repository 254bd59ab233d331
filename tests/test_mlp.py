"""The MLPs' fused passes (dlrm.mlp): the same function and gradients as Linear + ReLU, gradients
accumulated like autograd's with the post-accumulate hooks run, and the fallbacks."""

import copy

import pytest
import torch
from torch import nn

from dlrm import mlp
from dlrm.model import column_major
from dlrm.roofline import torch_threads
from tests.test_interaction_kernel import COMPILER, needs_compiler


@pytest.fixture(scope="module")
def kernel() -> mlp.MLPKernel:
    loaded, reason = mlp.load()
    assert loaded is not None, reason
    assert reason.startswith(f"compiled with {COMPILER}")
    return loaded


def pair(kernel: mlp.MLPKernel, in_features: int, sizes: list[int], relu_last: bool) -> tuple[mlp.MLP, mlp.MLP]:
    """The same MLP twice: with PyTorch's modules, and with the fused passes."""
    torch.manual_seed(0)
    plain = mlp.MLP(in_features, sizes, relu_last)
    column_major(plain[0])  # as DLRM's first bottom layer: its gradient is accumulated in that layout
    fused = copy.deepcopy(plain)
    fused.kernel = kernel
    return plain, fused


@needs_compiler
@pytest.mark.parametrize("in_features, sizes, relu_last", [(13, [512, 256, 64], True), (416, [512, 256, 1], False),
                                                           (20, [7], True), (20, [7], False)])
def test_fused_mlp_matches_linear_and_relu(kernel, in_features, sizes, relu_last):
    plain, fused = pair(kernel, in_features, sizes, relu_last)
    x = torch.randn(300, in_features)
    x_plain, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch_threads(1):
        y_plain, y_fused = plain(x_plain), fused(x_fused)
        assert type(y_fused.grad_fn).__name__ == "FusedMLPBackward"  # the fused path ran
        assert y_plain.grad_fn is not None and type(y_plain.grad_fn).__name__ != "FusedMLPBackward"
        torch.testing.assert_close(y_fused, y_plain, rtol=1e-5, atol=1e-6)
        grad = torch.randn_like(y_plain)
        for _ in range(2):  # a second backward adds to the gradients, as autograd's does
            y_plain.backward(grad, retain_graph=True)
            y_fused.backward(grad, retain_graph=True)
    torch.testing.assert_close(x_fused.grad, x_plain.grad, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
        assert q.grad.stride() == p.grad.stride(), name  # in the parameter's own layout
    assert fused[0].weight.grad.stride() == (1, sizes[0])  # (column-major, like the weight)


@needs_compiler
def test_fused_mlp_accumulates_into_existing_gradients_and_runs_their_hooks(kernel):
    _, fused = pair(kernel, 13, [32, 8], relu_last=True)
    seen: list[str] = []
    names = {id(p): n for n, p in fused.named_parameters()}
    before = {}
    for p in fused.parameters():
        p.grad = torch.full_like(p, 0.5)  # e.g. a view of dlrm.dist.GradientBuffer's flat buffer
        before[id(p)] = p.grad

        def hook(param: nn.Parameter) -> None:
            assert not torch.equal(param.grad, torch.full_like(param, 0.5))  # (already accumulated)
            seen.append(names[id(param)])
        p.register_post_accumulate_grad_hook(hook)
    x = torch.randn(64, 13)  # no input gradient: the first layer's dx is not computed
    with torch_threads(1):
        fused(x).sum().backward()
    # Each parameter reported once, after its gradient was added, into the same tensor.
    assert sorted(seen) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    for p in fused.parameters():
        assert p.grad is before[id(p)]
    plain = copy.deepcopy(fused)
    plain.kernel = None
    for p in plain.parameters():
        p.grad = torch.full_like(p, 0.5)
    with torch_threads(1):
        plain(x).sum().backward()
    for p, q in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5)


@needs_compiler
def test_fused_mlp_under_autograd_grad_returns_the_gradients_and_leaves_grad_alone(kernel):
    """torch.autograd.grad returns gradients and accumulates nothing: nor does the fused node then."""
    plain, fused = pair(kernel, 13, [32, 8], relu_last=True)
    x = torch.randn(64, 13, requires_grad=True)
    with torch_threads(1):
        want = torch.autograd.grad(plain(x).sum(), [x, *plain.parameters()])
        got = torch.autograd.grad(fused(x).sum(), [x, *fused.parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in fused.parameters())


@needs_compiler
def test_fused_mlp_without_gradients_is_the_same_function(kernel):
    plain, fused = pair(kernel, 416, [512, 256, 1], relu_last=False)
    x = torch.randn(100, 416)
    with torch_threads(1), torch.inference_mode():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-6)


@needs_compiler
def test_fused_path_is_left_where_it_does_not_apply(kernel):
    _, fused = pair(kernel, 13, [32, 8], relu_last=True)
    x = torch.randn(64, 13, requires_grad=True)

    def fused_ran() -> bool:
        return type(fused(x).grad_fn).__name__ == "FusedMLPBackward"

    with torch_threads(1):
        assert fused_ran()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fused_ran()  # bf16: autocast's Linear
        bf16 = copy.deepcopy(fused).to(torch.bfloat16)
        assert bf16.fusable(x.to(torch.bfloat16)) is None
        quantised = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fused), {nn.Linear}, dtype=torch.qint8)
        assert quantised.fusable(x) is None  # int8 Linear layers
    with torch_threads(2):
        assert not fused_ran()  # the kernel's passes are single-threaded
    assert mlp.MLP(13, [32, 8], True).fusable(x) is None  # no kernel


def test_without_a_compiler_the_kernel_is_not_loaded_and_says_why():
    loaded, reason = mlp.load(compiler="no-such-compiler")
    assert loaded is None
    assert reason == "no C compiler (no-such-compiler) found: PyTorch's Linear and ReLU are used"
