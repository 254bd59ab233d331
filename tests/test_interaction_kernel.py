"""The compiled dot interaction: the same features and gradients as the PyTorch one, and its detection."""

import platform
import shutil
from pathlib import Path

import pytest
import torch

from bench.config import NUM_SPARSE, ModelConfig
from dlrm import interaction_kernel
from dlrm.model import DLRM, dot_interaction, interaction_size, top_input_size

COMPILER = shutil.which("cc") or shutil.which("gcc")
needs_compiler = pytest.mark.skipif(COMPILER is None, reason="no C compiler (cc or gcc) here")


@pytest.fixture(scope="module")
def kernel() -> interaction_kernel.InteractionKernel:
    loaded, reason = interaction_kernel.load()
    assert loaded is not None, reason
    assert reason.startswith(f"compiled with {COMPILER}")
    return loaded


def sharded_inputs(batch: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    """bottom and the 26 vectors in blocks out of table order, as the sharded tables deliver them."""
    generator = torch.Generator().manual_seed(seed)
    bottom = torch.randn(batch, dim, generator=generator, requires_grad=True)
    order = torch.randperm(NUM_SPARSE, generator=generator).tolist()
    blocks = [torch.randn(batch, n, dim, generator=generator, requires_grad=True) for n in (20, 3, 3)]
    return bottom, blocks, order


@needs_compiler
@pytest.mark.parametrize("dim", [4, 16, 20, 64, 128])  # 4, 20: columns past the last 16-float vector
def test_kernel_matches_the_pytorch_interaction(kernel, dim):
    bottom, blocks, order = sharded_inputs(37, dim)
    width = top_input_size(NUM_SPARSE, dim)
    expected = dot_interaction(bottom, blocks, order, width)
    result = dot_interaction(bottom, blocks, order, width, kernel)
    assert result.grad_fn.name() == "FusedDotInteractionBackward"
    torch.testing.assert_close(result, expected)
    assert torch.count_nonzero(result[:, interaction_size(NUM_SPARSE, dim):]) == 0
    grad = torch.randn(37, width)
    for got, want in zip(torch.autograd.grad(result, [bottom, *blocks], grad),
                         torch.autograd.grad(expected, [bottom, *blocks], grad)):
        assert got.is_contiguous()
        torch.testing.assert_close(got, want)


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


# Each x86-64 level the kernel has a code path for (vectors of 4, 8 and 16 floats), and the flags it needs.
V3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
LEVELS = {"x86-64": set(), "x86-64-v3": V3, "x86-64-v4": V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}}


@needs_compiler
@pytest.mark.parametrize("march", sorted(LEVELS))
def test_kernel_built_for_each_vector_width_matches_the_pytorch_interaction(march):
    """-march=native picks one of the kernel's three widths; the other two are built here for an
    older level of the instruction set, where this CPU runs them, and give the same results."""
    if platform.machine() != "x86_64" or not LEVELS[march] <= cpu_flags():
        pytest.skip(f"this CPU does not run {march} code")
    kernel, reason = interaction_kernel.load(march=march)
    if kernel is None and "could not compile" in reason:
        pytest.skip(f"this compiler does not know -march={march}: {reason}")
    assert kernel is not None, reason
    assert f"-march={march}" in reason
    # dims: 20, a vector of 16 (8, 4) columns then single ones; 40, whole vectors of 8 (4) but not
    # of 16; 64, whole tiles. 26 tables: 27 features, a last half tile of 3 rows; 10: 11, a tile of 5.
    for dim, tables in ((20, NUM_SPARSE), (40, NUM_SPARSE), (64, NUM_SPARSE), (64, 10), (16, 10)):
        bottom, blocks, order = sharded_inputs(37, dim)
        if tables != NUM_SPARSE:
            blocks, order = [blocks[0][:, :tables]], None
        width = top_input_size(tables, dim)
        expected = dot_interaction(bottom, blocks, order, width)
        result = dot_interaction(bottom, blocks, order, width, kernel)
        assert result.grad_fn.name() == "FusedDotInteractionBackward"
        torch.testing.assert_close(result, expected)
        grad = torch.randn(37, width)
        for got, want in zip(torch.autograd.grad(result, [bottom, *blocks], grad),
                             torch.autograd.grad(expected, [bottom, *blocks], grad)):
            torch.testing.assert_close(got, want)


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_reads_strided_inputs_in_place_and_splits_the_batch_over_threads(kernel, threads):
    """Blocks that are views of one [B, 26, d] tensor, and a bottom whose rows are further apart
    than d, are read where they lie, forward and backward; with 2 threads each takes whole rows,
    so the result is exactly the 1-thread one."""
    torch.manual_seed(0)
    embedded = torch.randn(9, NUM_SPARSE, 16, requires_grad=True)
    wide = torch.randn(9, 24, requires_grad=True)
    bottom, blocks = wide[:, 3:19], [embedded[:, :11], embedded[:, 11:]]
    assert interaction_kernel.readable(bottom, blocks) and not blocks[0].is_contiguous()
    expected = dot_interaction(bottom, embedded)
    grad = torch.randn(expected.shape)
    want = torch.autograd.grad(expected, (wide, embedded), grad)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        result = dot_interaction(bottom, blocks, width=expected.shape[1], kernel=kernel)
        got = torch.autograd.grad(result, (wide, embedded), grad)
        torch.set_num_threads(1)
        single = dot_interaction(bottom.detach(), [b.detach() for b in blocks], width=expected.shape[1], kernel=kernel)
    finally:
        torch.set_num_threads(previous)
    assert result.grad_fn.name() == "FusedDotInteractionBackward"
    torch.testing.assert_close(result, expected)
    assert torch.equal(result, single)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@needs_compiler
def test_inputs_the_kernel_cannot_read_take_the_pytorch_path(kernel):
    bottom, blocks, order = sharded_inputs(4, 8)
    transposed = blocks[0].detach().transpose(1, 2).contiguous().transpose(1, 2)  # vectors not contiguous
    assert not interaction_kernel.readable(bottom, [transposed, *blocks[1:]])
    result = dot_interaction(bottom, [transposed, *blocks[1:]], order, kernel=kernel)
    assert result.grad_fn.name() == "DotInteractionBackward"
    assert not interaction_kernel.readable(bottom.double(), [b.double() for b in blocks])
    assert not interaction_kernel.readable(bottom, [blocks[0][:3], *blocks[1:]])  # fewer rows than bottom
    assert not interaction_kernel.readable(bottom, [blocks[0][:, :, :4], *blocks[1:]])  # shorter vectors
    assert not interaction_kernel.readable(bottom, [blocks[0].detach().to_sparse()])
    assert dot_interaction(bottom.double(), [b.double() for b in blocks], order, kernel=kernel).dtype == torch.float64
    with pytest.raises(ValueError, match="25 tables named for 26 embedded vectors"):
        dot_interaction(bottom, blocks, order[:-1], kernel=kernel)


@needs_compiler
def test_under_bf16_autocast_the_kernel_takes_the_bf16_bottom_in_fp32(kernel):
    """In bf16 training the bottom MLP's output is bf16: the kernel widens it and computes in fp32."""
    bottom, blocks, order = sharded_inputs(6, 16)
    low = bottom.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = dot_interaction(low, blocks, order, kernel=kernel)
    assert result.dtype == torch.float32 and result.grad_fn.name() == "FusedDotInteractionBackward"
    widened = low.detach().float().requires_grad_()
    expected = dot_interaction(widened, blocks, order)
    torch.testing.assert_close(result, expected)
    grad = torch.randn(result.shape)
    (got,) = torch.autograd.grad(result, low, grad)
    (want,) = torch.autograd.grad(expected, widened, grad)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want.bfloat16())


@needs_compiler
def test_model_with_the_kernel_computes_the_same_logits_and_gradients(kernel):
    cfg = ModelConfig(embedding_dim=16, bottom_mlp=[32, 16], top_mlp=[32, 1])
    vocab = [7 + t for t in range(NUM_SPARSE)]
    models = []
    for k in (None, kernel):
        torch.manual_seed(3)
        models.append(DLRM(vocab, cfg, kernel=k))
    dense = torch.rand(10, 13)
    ids = torch.stack([torch.randint(0, size, (10,)) for size in vocab], dim=1)
    logits = [model(dense, ids) for model in models]
    torch.testing.assert_close(logits[1], logits[0])
    for logit in logits:
        logit.sum().backward()
    for plain, fused in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(fused.grad.to_dense(), plain.grad.to_dense())


def test_no_compiler_means_no_kernel_and_says_why(tmp_path):
    missing = str(tmp_path / "no-such-cc")
    assert interaction_kernel.load(missing) == (
        None, f"no C compiler ({missing}) found: the PyTorch interaction is used")


def test_a_failed_compilation_means_no_kernel_and_says_why(tmp_path):
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: error: unsupported option' >&2\nexit 1\n")
    broken.chmod(0o755)
    assert interaction_kernel.load(str(broken)) == (
        None, f"{broken} could not compile interaction.c (cc: error: unsupported option): "
              "the PyTorch interaction is used")


def test_a_library_that_cannot_be_loaded_means_no_kernel_and_says_why(tmp_path):
    """A compiler that 'succeeds' with something that is not a shared library (as a noexec temporary
    directory would make any library unloadable): the PyTorch interaction, and the loader's error."""
    fake = tmp_path / "cc"
    fake.write_text('#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\necho "not a library" > "$2"\n')
    fake.chmod(0o755)
    kernel, reason = interaction_kernel.load(str(fake))
    assert kernel is None
    assert reason.startswith("the compiled interaction could not be built or loaded (")
    assert reason.endswith("): the PyTorch interaction is used")
