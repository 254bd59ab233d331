"""The tables' optimizer (dlrm.optim): each rule against a plain reference, the compiled update
(dlrm/sparse_update.c) against the PyTorch one, its checks and its detection."""

import shutil

import pytest
import torch

from dlrm import optim
from dlrm.optim import SparseOptimizer

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="no C compiler (cc or gcc) here")


@pytest.fixture(scope="module")
def kernel() -> optim.SparseUpdateKernel:
    loaded, reason = optim.load_kernel()
    assert loaded is not None, reason
    assert reason.startswith("compiled with")
    return loaded


def zipf_gradient(rows: int, n: int, dim: int, seed: int) -> torch.Tensor:
    """A sparse [rows, dim] gradient of n entries whose rows repeat as a Zipf-distributed batch's ids do."""
    generator = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, rows + 1, dtype=torch.float64) ** 1.2
    ids = torch.multinomial(weights, n, replacement=True, generator=generator)
    return torch.sparse_coo_tensor(ids.unsqueeze(0), torch.randn(n, dim, generator=generator), (rows, dim))


def reference_step(rule: str, weight: torch.Tensor, state: torch.Tensor, grad: torch.Tensor, lr: float,
                   eps: float = 1e-10) -> None:
    """The rule written out row by row on a dense copy of the gradient (repeats summed by to_dense)."""
    dense = grad.to_dense()
    for row in dense.abs().sum(1).nonzero().flatten().tolist():
        g = dense[row]
        if rule == "sgd":
            weight[row] -= lr * g
            continue
        state[row] += g * g if rule == "adagrad" else (g * g).mean()
        weight[row] -= lr * g / (state[row].sqrt() + eps)


@pytest.mark.parametrize("rule", ["adagrad", "rowwise_adagrad", "sgd"])
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_each_rule_is_its_formula(rule, dense):
    """Three batches with repeated rows: the PyTorch update equals the formula on the rows touched, and
    leaves the others alone; the state has the rule's width (d, 1 or 0 floats per row)."""
    torch.sparse.check_sparse_tensor_invariants.disable()
    start = torch.randn(300, 8)
    weight = torch.nn.Parameter(start.clone())
    opt = SparseOptimizer([weight], lr=0.1, rule=rule)
    assert opt.state_sum(weight).shape == (300, optim.state_columns(rule, 8))
    expected, state = start.clone(), torch.zeros(300, 8 if rule == "adagrad" else 1)
    touched = torch.zeros(300, dtype=torch.bool)
    for step in range(3):
        grad = zipf_gradient(300, 200, 8, seed=step)
        touched[grad._indices()[0]] = True
        weight.grad = grad.to_dense() if dense else grad
        opt.step()
        reference_step(rule, expected, state, grad, lr=0.1)
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-5, atol=1e-6)
    if rule != "sgd":
        torch.testing.assert_close(opt.state_sum(weight), state, rtol=1e-5, atol=1e-6)
    assert torch.equal(weight.detach()[~touched], start[~touched]) and (~touched).any()


@needs_compiler
@pytest.mark.parametrize("rule", ["adagrad", "rowwise_adagrad", "sgd"])
@pytest.mark.parametrize("dim", [3, 64])
def test_compiled_update_is_the_pytorch_update(kernel, dim, rule):
    """Both updates on the same weights for three batches: the same weights and state (up to float
    rounding of the repeats' sums), untouched rows bit for bit untouched, the row map left empty."""
    torch.sparse.check_sparse_tensor_invariants.disable()
    rows = 5000
    start = torch.randn(rows, dim)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    compiled = SparseOptimizer([ours], lr=0.05, rule=rule, kernel=kernel)
    reference = SparseOptimizer([theirs], lr=0.05, rule=rule)
    touched = torch.zeros(rows, dtype=torch.bool)
    for step in range(3):
        grad = zipf_gradient(rows, 2048, dim, seed=step)
        touched[grad._indices()[0]] = True
        ours.grad, theirs.grad = grad, grad
        compiled.step()
        reference.step()
    assert 100 < int(touched.sum()) < rows  # repeats and untouched rows both present
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.state_sum(ours), reference.state_sum(theirs), rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours.detach()[touched], start[touched])
    assert torch.equal(ours.detach()[~touched], start[~touched])
    assert torch.equal(compiled._slots[ours], torch.full((rows,), -1, dtype=torch.int32))


@needs_compiler
def test_the_compiled_update_tells_autograd(kernel):
    """Weights changed through pointers count as changed in place: a graph that saved them raises in
    backward instead of computing gradients from the updated weights."""
    torch.sparse.check_sparse_tensor_invariants.disable()
    weight = torch.nn.Parameter(torch.randn(10, 4))
    opt = SparseOptimizer([weight], lr=0.1, kernel=kernel)
    pending = (weight * weight).sum()  # saves the weight for its backward
    weight.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.ones(2, 4), (10, 4))
    before = weight._version
    opt.step()
    assert weight._version > before and opt.state_sum(weight)._version > 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        pending.backward()


@needs_compiler
def test_a_row_out_of_range_raises_and_updates_nothing(kernel):
    torch.sparse.check_sparse_tensor_invariants.disable()
    start = torch.randn(10, 4)
    weight = torch.nn.Parameter(start.clone())
    opt = SparseOptimizer([weight], lr=0.1, kernel=kernel)
    weight.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3, 1, 10, 2]]), torch.ones(5, 4), (10, 4))
    with pytest.raises(IndexError, match="gradient row 3 names weight row 10, outside the weight's 10 rows"):
        opt.step()
    assert torch.equal(weight.detach(), start) and not opt.state_sum(weight).any()
    assert torch.equal(opt._slots[weight], torch.full((10,), -1, dtype=torch.int32))  # the map cleaned up


@needs_compiler
def test_what_the_kernel_does_not_take_goes_through_pytorch(kernel):
    """A float64 table (the C code reads float32) is updated by the PyTorch ops, with the same result."""
    torch.sparse.check_sparse_tensor_invariants.disable()
    start = torch.randn(50, 4, dtype=torch.float64)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    grad = zipf_gradient(50, 40, 4, seed=0).double()
    assert not kernel.accepts(ours, torch.zeros_like(ours), grad)
    compiled, reference = SparseOptimizer([ours], lr=0.1, kernel=kernel), SparseOptimizer([theirs], lr=0.1)
    ours.grad, theirs.grad = grad, grad
    compiled.step()
    reference.step()
    assert torch.equal(ours.detach(), theirs.detach()) and not compiled._slots


def test_no_compiler_means_no_kernel_and_says_why(tmp_path):
    missing = str(tmp_path / "no-such-cc")
    assert optim.load_kernel(missing) == (None, f"no C compiler ({missing}) found: PyTorch ops update the sparse rows")
