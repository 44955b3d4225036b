"""The adapter's C kernel for its skinny products (src/adaptune/cpu/adapter_gemm.py, csrc/adapter_gemm.c)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from conftest import fake_compiler

from adaptune import AdapterConfig, Bottleneck
from adaptune.cpu import adapter_gemm
from adaptune.core import backend
from adaptune.cpu import native

needs_kernel = pytest.mark.skipif(not adapter_gemm.available(), reason="no C compiler or no AVX2 CPU here")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 300])
@pytest.mark.parametrize("k,n", [(1, 16), (7, 48), (64, 384), (384, 64)])
def test_products_equal_torch_for_every_tile_shape(one_thread, rows, k, n):
    """Full 6-row tiles and the tail rows; with and without the hidden state and bias; scaled."""
    g = torch.Generator().manual_seed(rows * 1000 + k)
    x, h = torch.randn(rows, k, generator=g), torch.randn(rows, n, generator=g)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    close = dict(rtol=1e-5, atol=1e-5 * k**0.5)
    torch.testing.assert_close(adapter_gemm.linear(x, w), x @ w.t(), **close)
    torch.testing.assert_close(adapter_gemm.linear(x, w, b), torch.addmm(b, x, w.t()), **close)
    torch.testing.assert_close(
        adapter_gemm.linear(x, w, b, onto=h, scale=-0.5), h - 0.5 * torch.addmm(b, x, w.t()), **close
    )
    torch.testing.assert_close(adapter_gemm.matmul(x, w.t().contiguous()), x @ w.t(), **close)
    torch.testing.assert_close(adapter_gemm.matmul(x, w.t(), onto=h), torch.addmm(h, x, w.t()), **close)


@needs_kernel
def test_strided_rows_and_inputs_left_untouched(one_thread):
    """Rows of a wider matrix (row stride > K) are read in place; no operand is written."""
    wide, h = torch.randn(50, 40), torch.randn(50, 32)
    x = wide[:, 3:27]  # 24 columns, row stride 40
    w, b = torch.randn(32, 24), torch.randn(32)
    copies = [t.clone() for t in (wide, h, w, b)]
    torch.testing.assert_close(adapter_gemm.linear(x, w, b, onto=h), h + torch.addmm(b, x, w.t()))
    for t, c in zip((wide, h, w, b), copies):
        assert torch.equal(t, c)


@needs_kernel
def test_a_rows_result_does_not_depend_on_the_other_rows(one_thread):
    """Mixed-task batches run each task's rows apart; they must equal the same rows of a whole batch."""
    x, h, w, b = torch.randn(101, 64), torch.randn(101, 384), torch.randn(384, 64), torch.randn(384)
    whole = adapter_gemm.linear(x, w, b, onto=h)
    idx = torch.tensor([0, 3, 4, 50, 99, 100])
    assert torch.equal(adapter_gemm.linear(x[idx], w, b, onto=h[idx]), whole[idx])


@needs_kernel
def test_declines_where_it_does_not_apply(one_thread, monkeypatch):
    """None (the caller runs torch) for widths not a multiple of 16, other dtypes, fewer rows than
    MIN_ROWS, operands needing a gradient, FLOP counters, and when turned off."""
    x, w = torch.randn(8, 32), torch.randn(16, 32)
    assert adapter_gemm.linear(x, w) is not None
    monkeypatch.setattr(adapter_gemm, "MIN_ROWS", 9)
    assert adapter_gemm.linear(x, w) is None and adapter_gemm.linear(torch.randn(9, 32), w) is not None
    monkeypatch.setattr(adapter_gemm, "MIN_ROWS", 0)
    assert adapter_gemm.linear(x, torch.randn(12, 32)) is None
    assert adapter_gemm.linear(x.double(), w.double()) is None
    assert adapter_gemm.linear(x, w.requires_grad_()) is None
    with torch.no_grad():
        assert adapter_gemm.linear(x, w) is not None
    with FlopCounterMode(display=False):
        assert adapter_gemm.linear(x, w.detach()) is None
    previous = adapter_gemm.set_enabled(False)
    try:
        assert adapter_gemm.linear(x, w.detach()) is None
    finally:
        adapter_gemm.set_enabled(previous)


def _record_fused_calls(monkeypatch) -> list:
    """A list that each call of the whole-adapter kernels appends to: its name where the kernel ran,
    "declined" where it returned None (and the caller ran the products one by one)."""
    calls = []

    def spy(name, real):
        def call(*args):
            result = real(*args)
            calls.append(name if result is not None else "declined")
            return result

        return call

    for name in ("adapter_forward", "adapter_backward"):  # the slots the core calls them through
        monkeypatch.setattr(backend, name, spy(name, getattr(backend, name)))
    return calls


@needs_kernel
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_adapter_uses_the_kernel_and_matches_torch_with_gradients(one_thread, monkeypatch, parallel, act):
    """add_to (forward, one-node backward, and no-grad inference) gives torch's values and gradients
    within float tolerance while the kernel runs: with the exact GELU, the whole adapter in one call
    each way; with another nonlinearity, four products of each adapter pass."""
    torch.manual_seed(0)
    b = Bottleneck(48, AdapterConfig(size=16, init_std=0.3, scale=2.0, nonlinearity=act))
    h = torch.randn(3, 7, 48, requires_grad=True)
    x = torch.randn(3, 7, 48, requires_grad=True) if parallel else None
    calls = _record_fused_calls(monkeypatch)
    run = adapter_gemm._run
    monkeypatch.setattr(adapter_gemm, "_run", lambda *a: calls.append(a[4]) or run(*a))

    fused = b.add_to(h, x)
    g = torch.randn_like(fused)
    leaves = [t for t in (h, x, *b.parameters()) if t is not None]
    grads = torch.autograd.grad(fused, leaves, g)
    with torch.no_grad():
        served = b.add_to(h, x)
    if act == "gelu":
        assert calls == ["adapter_forward", "adapter_backward", "adapter_forward"]
    else:
        assert calls == [16, 48, 16, 48, 16, 48]  # down, up; their input gradients; down, up again

    previous = adapter_gemm.set_enabled(False)
    try:
        plain = h + b(h if x is None else x)
        torch.testing.assert_close(fused, plain)
        torch.testing.assert_close(served, plain)
        torch.testing.assert_close(grads, torch.autograd.grad(plain, leaves, g))
    finally:
        adapter_gemm.set_enabled(previous)


def test_without_a_compiler_torch_runs_and_nothing_is_left(tmp_path, monkeypatch, one_thread):
    """A failing compiler: the kernel is unavailable, the adapter still runs, no file is left behind."""
    monkeypatch.setenv("CC", str(fake_compiler(tmp_path, "echo 'cc: error: no such thing' >&2\nexit 1")))
    monkeypatch.setenv("ADAPTUNE_CACHE", str(tmp_path / "cache"))
    native.library.cache_clear()
    try:
        assert not adapter_gemm.available()
        assert adapter_gemm.linear(torch.randn(8, 32), torch.randn(16, 32)) is None
        b = Bottleneck(32, AdapterConfig(size=16, init_std=0.3))
        h = torch.randn(2, 3, 32)
        torch.testing.assert_close(b.add_to(h), h + b(h))
        assert list((tmp_path / "cache" / "kernels").iterdir()) == []
    finally:
        native.library.cache_clear()


@needs_kernel
def test_weights_changed_in_place_are_seen(one_thread):
    """Nothing of a weight is kept between calls: changes in place, also through ``.data`` (which
    no version counter sees, as checkpoint restores do), show in the next product."""
    x, w = torch.randn(20, 32), torch.nn.Parameter(torch.randn(16, 32))
    with torch.no_grad():
        first = adapter_gemm.linear(x, w)
        w.mul_(-2.0)
        torch.testing.assert_close(adapter_gemm.linear(x, w), -2.0 * first)
        w.data.copy_(torch.randn(16, 32))
        torch.testing.assert_close(adapter_gemm.linear(x, w), x @ w.t())
        torch.testing.assert_close(adapter_gemm.matmul(x, w.t()), x @ w.t())


@needs_kernel
def test_built_once_into_the_cache(tmp_path, monkeypatch):
    """The first use compiles into $ADAPTUNE_CACHE/kernels; later loads reuse that file."""
    monkeypatch.setenv("ADAPTUNE_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        assert adapter_gemm.available()
        built = list((tmp_path / "kernels").glob("adaptune_native-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        assert adapter_gemm.available() and built[0].stat().st_mtime_ns == stamp
    finally:
        native.library.cache_clear()


@needs_kernel
def test_threads_split_rows_without_changing_a_bit(one_thread, monkeypatch):
    """Built with OpenMP on torch's own runtime, more torch threads give the same bits as one;
    without that, more than one thread leaves the product to torch."""
    x, h, w, b = torch.randn(1000, 64), torch.randn(1000, 384), torch.randn(384, 64), torch.randn(384)
    one = adapter_gemm.linear(x, w, b, onto=h)
    torch.set_num_threads(2)
    if native.library().parallel:
        assert torch.equal(adapter_gemm.linear(x, w, b, onto=h), one)
    monkeypatch.setattr(native.library(), "parallel", False)
    assert adapter_gemm.linear(x, w, b, onto=h) is None


@needs_kernel
def test_mismatched_shapes_are_left_to_torch(one_thread):
    """Operands that do not fit together never reach the C code (it would read past them): None,
    and torch then raises its own error."""
    x = torch.randn(8, 32)
    assert adapter_gemm.linear(x, torch.randn(16, 31)) is None
    assert adapter_gemm.linear(x, torch.randn(16, 32), torch.randn(15)) is None
    assert adapter_gemm.linear(x, torch.randn(16, 32), onto=torch.randn(7, 16)) is None
    assert adapter_gemm.matmul(x, torch.randn(31, 16)) is None
    assert adapter_gemm.matmul(x, torch.randn(32, 16), onto=torch.randn(8, 32)) is None
    assert adapter_gemm.linear(x, torch.randn(16)) is None


@needs_kernel
@pytest.mark.parametrize("rows,m", [(5, 16), (13, 64), (20, 256)])
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("frozen", ["none", "adapter", "input", "down"])
def test_fused_adapter_equals_autograd_of_the_plain_ops(one_thread, monkeypatch, rows, m, parallel, frozen):
    """The whole-adapter kernels (exact GELU): tail blocks of rows, bottlenecks up to MAX_M, both
    modes, any part frozen; values and every gradient asked for equal autograd's of h + b(x)."""
    calls = _record_fused_calls(monkeypatch)
    torch.manual_seed(rows)
    b = Bottleneck(32, AdapterConfig(size=m, init_std=0.2, scale=0.5))
    h = torch.randn(rows, 32, requires_grad=frozen != "input")
    x = torch.randn(rows, 32, requires_grad=frozen != "input") if parallel else None
    if frozen == "adapter":
        b.requires_grad_(False)
    elif frozen == "down":
        b.down.requires_grad_(False)
    out = b.add_to(h, x)
    plain = h + b(h if x is None else x)
    torch.testing.assert_close(out, plain)
    leaves = [t for t in (h, x, *b.parameters()) if t is not None and t.requires_grad]
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, leaves, g), torch.autograd.grad(plain, leaves, g))
    assert calls == ["adapter_forward", "adapter_backward"]  # every case wants the input's or down's gradient


@needs_kernel
def test_fused_adapter_declines_what_it_cannot_take(one_thread):
    """A bottleneck wider than MAX_M, a width that is not a multiple of 16, or float64: None (the
    caller runs the products one by one)."""
    x = torch.randn(12, 32)
    for m, d, dtype in (
        (adapter_gemm.MAX_M + 16, 32, torch.float32),
        (24, 32, torch.float32),
        (16, 40, torch.float32),
        (16, 32, torch.float64),
    ):
        xs = torch.randn(12, d, dtype=dtype)
        args = (
            torch.randn(m, d, dtype=dtype),
            torch.randn(m, dtype=dtype),
            torch.randn(d, m, dtype=dtype),
            torch.randn(d, dtype=dtype),
        )
        assert adapter_gemm.adapter_forward(xs, xs, *args, 1.0) is None
        assert (
            adapter_gemm.adapter_backward(xs, torch.randn(12, m, dtype=dtype), args[0], args[2], 1.0, True, True)
            is None
        )
    assert (
        adapter_gemm.adapter_forward(
            x, x, torch.randn(16, 32), torch.randn(16), torch.randn(32, 16), torch.randn(32), 1.0
        )
        is not None
    )


@needs_kernel
def test_fused_adapter_same_bits_at_any_thread_count(one_thread):
    """Blocks of six rows split over threads, each summed in one order: two threads give one's bits."""
    if not native.library().parallel:
        pytest.skip("the kernels were built without a shared OpenMP runtime: one thread only")
    x, wd, bd, wu, bu = (
        torch.randn(1001, 64),
        torch.randn(32, 64),
        torch.randn(32),
        torch.randn(64, 32),
        torch.randn(64),
    )
    g = torch.randn(1001, 64)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        z, out = adapter_gemm.adapter_forward(x, x, wd, bd, wu, bu, 0.7)
        results.append((z, out, *adapter_gemm.adapter_backward(g, z, wd, wu, 0.7, True, True)))
    assert all(torch.equal(a, b) for a, b in zip(*results))
