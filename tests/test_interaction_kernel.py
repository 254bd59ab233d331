"""The compiled dot interaction: the same features and gradients as the PyTorch one, and its detection."""

import platform
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench.config import NUM_SPARSE, ModelConfig
from dlrm import interaction_kernel
from dlrm.interaction_kernel import Lookup
from dlrm.model import DLRM, EmbeddingTables, dot_interaction, interaction_size, top_input_size
from dlrm.roofline import torch_threads

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


def small_tables(dim: int, sparse: bool = False, batch: int = 11) -> tuple[EmbeddingTables, torch.Tensor]:
    """Tables 0, 2, 5 of 3, 40 and 9 rows and a batch's ids, many repeated (table 0 has 3 rows),
    taken as a column slice of a wider ids tensor as the loader's batches are."""
    torch.manual_seed(1)
    tables = EmbeddingTables([0, 2, 5], [3, 40, 9], dim, sparse=sparse)
    tables.reset_parameters(list(range(NUM_SPARSE)))
    wide = torch.stack([torch.randint(0, rows, (batch,)) for rows in (7, 3, 40, 9)], dim=1)
    return tables, wide[:, 1:]


def interaction_with_tables(kernel, tables: EmbeddingTables, ids: torch.Tensor, threads: int, accumulate: bool = False,
                            ) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """The features and gradients (bottom, other vectors, the tables' weight) with the tables' Lookup
    and with their gathered vectors (PyTorch's interaction), and how often the Lookup was gathered.
    ``accumulate``: the Lookup's through backward() (into the weight's .grad, holding 0.5s before),
    else through torch.autograd.grad."""
    batch, dim = ids.shape[0], tables.weight.shape[1]
    generator = torch.Generator().manual_seed(2)
    bottom = torch.randn(batch, dim, generator=generator, requires_grad=True)
    other = torch.randn(batch, 23, dim, generator=generator, requires_grad=True)
    order = [0, 2, 5, *[t for t in range(NUM_SPARSE) if t not in (0, 2, 5)]]
    width = top_input_size(NUM_SPARSE, dim)
    grad = torch.randn(batch, width, generator=generator)
    expected = dot_interaction(bottom, [tables(ids), other], order, width)
    want = [expected, *torch.autograd.grad(expected, [bottom, other, tables.weight], grad)]
    lookup = tables.deferred(ids)
    assert isinstance(lookup, Lookup) and lookup.shape == (batch, 3, dim)
    gathered = []
    counted = replace(lookup, gather=lambda: gathered.append(1) or lookup.gather())
    with torch_threads(threads):
        result = dot_interaction(bottom, [counted, other], order, width, kernel)
        if accumulate:
            held = tables.weight.grad = torch.full_like(tables.weight, 0.5)
            hooked = []
            tables.weight.register_post_accumulate_grad_hook(lambda weight: hooked.append(weight.grad.clone()))
            result.backward(grad)
            assert tables.weight.grad is held and len(hooked) == 1  # added where it lies, the hook run after
            torch.testing.assert_close(hooked[0], held)
            got = [result, bottom.grad, other.grad, held - 0.5]
        else:
            got = [result, *torch.autograd.grad(result, [bottom, other, tables.weight], grad)]
    assert result.grad_fn.name() == "FusedDotInteractionBackward"
    return got, want, len(gathered)


@needs_compiler
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dim", [16, 20, 64])  # 64: whole 4-vector tiles with AVX-512
def test_tables_read_in_place_give_the_gathered_tables_features_and_gradients(kernel, threads, dim, accumulate):
    """A Lookup's rows are read from the weight and its gradient added to a dense gradient of the
    weight (backward(): the weight's .grad itself): the same as gathering the vectors and scattering
    their gradients (ids repeat, so rows sum many samples' gradients, also across the threads'
    slices of the batch, each adding to a copy of its own)."""
    tables, ids = small_tables(dim, batch=1024)
    assert not ids.is_contiguous()
    got, want, gathered = interaction_with_tables(kernel, tables, ids, threads, accumulate)
    assert gathered == 0  # read in place
    for g, w in zip(got, want):
        assert g.layout == torch.strided and g.shape == w.shape
        # (a row of table 0 sums ~340 samples' gradients, in another order than index_add's)
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    never_looked_up = sorted(set(range(3, 43)) - set((ids[:, 1] + 3).tolist()))
    assert torch.count_nonzero(got[3][never_looked_up]) == 0


@needs_compiler
def test_many_threads_for_a_small_batch_gather_the_tables_rather_than_copy_their_gradient(kernel):
    """3 threads each adding into a 52-row copy of the gradient would hold more than the gathered
    [11, 3, d] vectors' gradient: the vectors are gathered (and the kernel reads those)."""
    tables, ids = small_tables(16)
    got, want, gathered = interaction_with_tables(kernel, tables, ids, threads=3)
    assert gathered == 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@needs_compiler
def test_ids_changed_in_place_before_backward_are_an_error_not_gradients_for_the_wrong_rows(kernel):
    tables, ids = small_tables(16, batch=64)
    ids = ids.contiguous()
    with torch_threads(1):
        result = dot_interaction(torch.randn(64, 16), [tables.deferred(ids), torch.randn(64, 23, 16)], kernel=kernel)
    ids[0, 0] = (ids[0, 0] + 1) % 3
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        result.sum().backward()


@needs_compiler
def test_a_table_row_out_of_range_is_an_index_error_not_a_wild_read(kernel):
    tables, ids = small_tables(16)
    bad = ids.clone()
    bad[7, 1] = 40  # table 2 has rows 0..39
    bottom, other = torch.randn(11, 16), torch.randn(11, 23, 16)
    with torch.no_grad():  # (read in place whatever the threads: see test_many_threads_...)
        with pytest.raises(IndexError, match="sample 7 of the batch names a table row out of range"):
            dot_interaction(bottom, [tables.deferred(bad), other], kernel=kernel)
        bad[7, 1] = -1
        with pytest.raises(IndexError, match="sample 7"):
            dot_interaction(bottom, [tables.deferred(bad), other], kernel=kernel)


def test_tables_with_sparse_gradients_are_gathered_while_training_and_read_in_place_otherwise():
    """A Lookup's gradient is dense: tables training with sparse gradients hand over their vectors."""
    tables, ids = small_tables(16, sparse=True)
    assert isinstance(tables.deferred(ids), torch.Tensor)
    with torch.no_grad():
        assert isinstance(tables.deferred(ids), Lookup)
    dense, _ = small_tables(16, sparse=False)
    lookup = dense.deferred(ids)
    assert isinstance(lookup, Lookup) and lookup.offsets == (0, 3, 43) and lookup.rows == (3, 40, 9)
    torch.testing.assert_close(lookup.gather(), dense(ids))


@needs_compiler
def test_lookups_the_kernel_cannot_read_are_gathered(kernel):
    tables, ids = small_tables(16)
    bottom, other = torch.randn(11, 16), torch.randn(11, 23, 16)
    for unreadable in (tables.deferred(ids.int()), tables.deferred(ids[:5])):
        assert not interaction_kernel.readable(bottom, [unreadable, other])
    result = dot_interaction(bottom, [tables.deferred(ids.int()), other], kernel=kernel)
    expected = dot_interaction(bottom, [tables(ids), other])
    torch.testing.assert_close(result, expected)
    grad = torch.randn(result.shape)
    (got,) = torch.autograd.grad(result, tables.weight, grad)
    (want,) = torch.autograd.grad(expected, tables.weight, grad)
    torch.testing.assert_close(got, want)


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
    # At inference the kernel reads every table's rows in place (no [B, 26, d] lookup).
    with torch.inference_mode():
        assert isinstance(models[1].embeddings.deferred(ids), Lookup)
        torch.testing.assert_close(models[1](dense, ids), models[0](dense, ids))


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
    assert reason.startswith("interaction.c could not be built or loaded (")
    assert reason.endswith("): the PyTorch interaction is used")
