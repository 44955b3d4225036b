"""The adapter's skinny matrix products through a small C kernel (CPU, AVX2 + FMA, fp32).

An adapter multiplies the (B*T, d) hidden state by d x m and m x d weights with m much smaller than
d, where BLAS libraries are slow: they pack the large operand for only m columns of output. The
kernel in ``csrc/adapter_gemm.c`` packs only the small weight, reads the large operand in place, and
starts each sum from the hidden state it adds onto (and the bias), so the adapter's add costs no
separate pass. Four of an adapter's six products use it (the down- and up-projections and their
input gradients). The two weight gradients contract over all B*T rows, so both their operands are
large and need packing either way; they stay with torch, which is faster there.

With the exact GELU (the default nonlinearity) the whole adapter runs as one kernel call each way
(:func:`adapter_forward`, :func:`adapter_backward`): six rows at a time, the down-projection, the
GELU (``csrc/vmath.h``) and the up-projection onto h, so a block's rows of x and h are read once
and stay in cache from the first product to the second, and the activation never goes to memory;
backward likewise runs both input-side products and the GELU's gradient over one block of the
incoming gradient, and hands torch the two weight gradients' operands. What it gains is measured
in docs/performance.md.

It is built and loaded with the other C kernels (:mod:`adaptune.cpu.native`) and splits the rows over
torch's threads where that library runs in parallel. Every call returns ``None``, and the caller
runs torch's product, where the library is not loaded, for fewer than ``MIN_ROWS`` rows, for
other dtypes and devices, under ``FlopCounterMode`` and other dispatch modes, while
``torch.compile`` traces, or after ``set_enabled(False)``. Results equal torch's up to
float rounding (the sums run in another order); each row is summed by one thread in one order, so
its result depends neither on the other rows nor on the thread count. Nothing of a weight is kept
between calls, so changes to it are always seen.
"""

from __future__ import annotations

import ctypes

import torch

from adaptune.core import backend
from adaptune.cpu import native

_enabled = True
# Below this many rows (B*T tokens) torch runs the product: the checks, the foreign call and the
# packing of the weight (~30 us a call) cost as much as the kernel saves. Measured at d = 384,
# m = 64, one thread, kernel / torch, one adapter's no-grad forward: 1.09 at 256 rows, 1.01 at
# 512, 0.97 at 1024, 0.88-0.92 at 2048-4096; its forward + backward: 1.01-1.05 up to 1024 rows,
# 1.00 at 2048, 0.92 at 4096. At two threads: forward 0.94 at 1024-2048, 0.88 at 4096; forward +
# backward 1.04 at 1024, 1.00 at 2048, 0.95 at 4096.
MIN_ROWS = 2048
MAX_M = 256  # the widest bottleneck the fused adapter kernels take (csrc/adapter_gemm.c)


def set_enabled(enabled: bool) -> bool:
    """Turn the adapter's kernel on or off for this process (it is on unless ``ADAPTUNE_NATIVE=0``
    turns every C kernel off); returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def available() -> bool:
    """Whether the kernel is built and loaded here (building it on first call) and runs at torch's
    current thread count."""
    lib = native.library()
    return lib is not None and (torch.get_num_threads() == 1 or lib.parallel)


def agrees(lib: ctypes.CDLL) -> bool:
    """Small products through every path of the kernel (full and tail tiles, both weight layouts,
    H, bias, scale) against torch."""
    g = torch.Generator().manual_seed(0)
    x, w, h, b = (
        torch.randn(s, generator=g, dtype=torch.float32, device="cpu") for s in ((13, 7), (32, 7), (13, 32), (32,))
    )
    got = _run(lib, x, w, True, 32, h, b, 0.5), _run(lib, x, w.t().contiguous(), False, 32, None, None)
    want = h + 0.5 * torch.addmm(b, x, w.t()), x @ w.t()
    return all(r is not None and torch.allclose(r, t, rtol=1e-5, atol=1e-5) for r, t in zip(got, want))


def _run(lib, x, w, transposed: bool, n: int, onto, bias, scale: float = 1.0) -> torch.Tensor | None:
    """The kernel's ``onto + scale * (bias + x @ B)``, B = wᵀ (``transposed``) or w; None if it
    could not get memory for the packed weight."""
    m, k = x.shape
    w = w.detach().contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    failed = lib.adaptune_gemm(
        m,
        n,
        k,
        x.data_ptr(),
        x.stride(0),
        w.data_ptr(),
        w.stride(0),
        transposed,
        scale,
        out.data_ptr(),
        n,
        None if onto is None else onto.data_ptr(),
        0 if onto is None else onto.stride(0),
        None if bias is None else bias.data_ptr(),
        native.threads(lib),
    )
    return None if failed else out


def _rows(t: torch.Tensor, cols: int) -> bool:
    """A matrix of ``cols`` columns whose rows are contiguous (any row stride); dtype and device are
    checked with the other operands in ``_usable``."""
    return t.dim() == 2 and t.shape[1] == cols and (t.stride(1) == 1 or cols == 1) and t.stride(0) >= cols


def _usable(
    x: torch.Tensor,
    w: torch.Tensor,
    k: int,
    n: int,
    bias: torch.Tensor | None = None,
    onto: torch.Tensor | None = None,
) -> ctypes.CDLL | None:
    """The loaded kernel when it applies to these operands (x: (M, k) times a k x n matrix from w;
    bias: (n,); onto: (M, n)), else None."""
    if not _enabled or n % 16 or x.dim() != 2 or x.shape[0] < MIN_ROWS:
        return None
    if not _rows(x, k) or k == 0 or w.dim() != 2 or (bias is not None and bias.shape != (n,)):
        return None
    if onto is not None and (onto.shape != (x.shape[0], n) or not _rows(onto, n)):
        return None
    ts = [t for t in (x, w, bias, onto) if t is not None]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in ts):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return None  # the kernel records no autograd graph
    return native.usable()


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    onto: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor | None:
    """``onto + scale * (x @ wᵀ + bias)`` as a new (M, N) tensor, or None where the kernel does not
    apply (the caller then runs torch). x: (M, K); w: (N, K); bias: (N,) or None; onto: (M, N) or None."""
    n, k = w.shape if w.dim() == 2 else (0, 0)
    lib = _usable(x, w, k, n, bias, onto)
    if lib is None:
        return None
    return _run(lib, x, w, True, n, onto, None if bias is None else bias.detach().contiguous(), scale)


def matmul(x: torch.Tensor, w: torch.Tensor, onto: torch.Tensor | None = None) -> torch.Tensor | None:
    """``onto + x @ w`` as a new (M, N) tensor, or None where the kernel does not apply (the caller
    then runs torch). x: (M, K); w: (K, N); onto: (M, N) or None."""
    k, n = w.shape if w.dim() == 2 else (0, 0)
    lib = _usable(x, w, k, n, None, onto)
    return None if lib is None else _run(lib, x, w, False, n, onto, None)


def _adapter_usable(
    x: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, *others: torch.Tensor
) -> ctypes.CDLL | None:
    """The loaded kernel when the fused adapter kernels apply: x (M, d) and every other operand fp32
    CPU, rows contiguous, d and m multiples of 16, m at most MAX_M, from MIN_ROWS rows, no gradient
    recorded."""
    m, d = w_down.shape if w_down.dim() == 2 else (0, 0)
    if d % 16 or m > MAX_M or w_up.shape != (d, m) or any(t.dim() == 2 and not _rows(t, t.shape[1]) for t in others):
        return None
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (w_up, *others)):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (w_up, *others)):
        return None  # the kernel records no autograd graph
    return _usable(x, w_down, d, m)


def adapter_forward(
    x: torch.Tensor,
    h: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A whole adapter with the exact GELU in one kernel call: ``z = x @ w_downᵀ + b_down`` and
    ``h + scale * (gelu(z) @ w_upᵀ + b_up)``, each block of rows in cache from the first product to
    the last; or None where it does not apply (the caller runs the products one by one). x, h: (M, d)."""
    lib = _adapter_usable(x, w_down, w_up, h, b_down, b_up)
    if lib is None or h.shape != x.shape or b_down.shape != w_down.shape[:1] or b_up.shape != w_up.shape[:1]:
        return None
    (m, d), rows = w_down.shape, x.shape[0]
    w_down, b_down, w_up, b_up = (t.detach().contiguous() for t in (w_down, b_down, w_up, b_up))
    z, out = x.new_empty(rows, m), x.new_empty(rows, d)
    failed = lib.adaptune_adapter_forward(
        rows,
        d,
        m,
        x.data_ptr(),
        x.stride(0),
        h.data_ptr(),
        h.stride(0),
        w_down.data_ptr(),
        b_down.data_ptr(),
        w_up.data_ptr(),
        b_up.data_ptr(),
        scale,
        z.data_ptr(),
        out.data_ptr(),
        d,
        native.threads(lib),
    )
    return None if failed else (z, out)


def adapter_backward(
    g: torch.Tensor, z: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, scale: float, grad_in: bool, skip: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """The backward of :func:`adapter_forward` given g at its output: (gz, sa, grad_x) with gz the
    gradient at z, sa = scale * gelu(z) (so the up-projection's weight gradient is gᵀ sa), and, with
    ``grad_in``, the gradient reaching x through the down-projection (plus g itself with ``skip``: a
    sequential adapter's input); or None where it does not apply."""
    lib = _adapter_usable(g, w_down, w_up, z)
    if lib is None or z.shape != (g.shape[0], w_down.shape[0]) or not z.is_contiguous():
        return None
    (m, d), rows = w_down.shape, g.shape[0]
    w_down, w_up = w_down.detach().contiguous(), w_up.detach().contiguous()
    gz, sa = g.new_empty(rows, m), g.new_empty(rows, m)
    gx = g.new_empty(rows, d) if grad_in else None
    failed = lib.adaptune_adapter_backward(
        rows,
        d,
        m,
        g.data_ptr(),
        g.stride(0),
        z.data_ptr(),
        w_down.data_ptr(),
        w_up.data_ptr(),
        scale,
        gz.data_ptr(),
        sa.data_ptr(),
        None if gx is None else gx.data_ptr(),
        d,
        skip,
        native.threads(lib),
    )
    return None if failed else (gz, sa, gx)


native.register_check(agrees)
backend.register(linear=linear, matmul=matmul, adapter_forward=adapter_forward, adapter_backward=adapter_backward)

__all__ = ["MAX_M", "MIN_ROWS", "adapter_backward", "adapter_forward", "available", "linear", "matmul", "set_enabled"]
