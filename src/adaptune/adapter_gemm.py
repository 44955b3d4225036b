"""The adapter's skinny matrix products through a small C kernel (CPU, AVX2 + FMA, fp32).

An adapter multiplies the (B*T, d) hidden state by d x m and m x d weights with m much smaller than
d. BLAS libraries reach 50-65 GFLOP/s on a transformer's wide products on this project's CPU but
35-45 on these skinny ones: they pack the large operand for only m columns of output. The kernel
in ``csrc/adapter_gemm.c`` packs only the small weight, reads the large operand in place, and
starts each sum from the hidden state it adds onto (and the bias), so the adapter's add costs no
separate pass. Four of an adapter's six products use it (the down- and up-projections and their
input gradients). The two weight gradients contract over all B*T rows, so both their operands are
large and need packing either way; they stay with torch, which is faster there.

It is compiled on first use with the system's C compiler (``$CC``, else ``cc``/``gcc``/``clang``)
into ``~/.cache/adaptune/kernels`` (``$ADAPTUNE_CACHE`` overrides) and checked against torch once.
Built with OpenMP where the compiler has it, it splits the rows over ``torch.get_num_threads()``
threads of torch's own OpenMP runtime (the loader shares the library torch mapped); built without,
or where that runtime would be a second one, it runs at one torch thread only. Every call returns
``None``, and the caller runs torch's product, without a compiler, on other CPUs, for fewer than
``MIN_ROWS`` rows, for other dtypes and devices, under ``FlopCounterMode`` and other dispatch
modes, while ``torch.compile`` traces, or with ``ADAPTUNE_NATIVE=0``. Results equal torch's up to
float rounding (the sums run in another order); each row is summed by one thread in one order, so
its result depends neither on the other rows nor on the thread count. Nothing of a weight is kept
between calls, so changes to it are always seen.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from adaptune.convert import cache_dir

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "adapter_gemm.c"
_FLAGS = ("-O3", "-mavx2", "-mfma", "-shared", "-fPIC")
_enabled = os.environ.get("ADAPTUNE_NATIVE", "1") != "0"
# Below this many rows (B*T tokens) torch runs the product: the checks, the foreign call and the
# packing of the weight (~30 us a call) cost as much as the kernel saves. Measured at d = 384,
# m = 64, one thread, kernel / torch, one adapter's no-grad forward: 1.09 at 256 rows, 1.01 at
# 512, 0.97 at 1024, 0.88-0.92 at 2048-4096; its forward + backward: 1.01-1.05 up to 1024 rows,
# 1.00 at 2048, 0.92 at 4096. At two threads: forward 0.94 at 1024-2048, 0.88 at 4096; forward +
# backward 1.04 at 1024, 1.00 at 2048, 0.95 at 4096.
MIN_ROWS = 2048


def set_enabled(enabled: bool) -> bool:
    """Turn the kernel on or off for this process (it is on unless ``ADAPTUNE_NATIVE=0``); returns
    the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def available() -> bool:
    """Whether the kernel is built and loaded here (building it on first call) and runs at torch's
    current thread count."""
    lib = _library()
    return lib is not None and (torch.get_num_threads() == 1 or lib.parallel)


def _compile(cc: str, flags: tuple[str, ...], out_dir: Path) -> Path:
    """The shared library for this source, compiler and flags, built once per machine."""
    key = hashlib.sha256(_SOURCE.read_bytes() + "\0".join((cc, *flags)).encode()).hexdigest()[:16]
    target = out_dir / f"adapter_gemm-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        run = subprocess.run([cc, *flags, "-o", tmp, str(_SOURCE)], capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            raise OSError(f"{cc} failed: {(run.stderr.strip().splitlines() or [f'exit {run.returncode}'])[-1]}")
        os.replace(tmp, target)  # whole or not at all, also when two processes build at once
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _build(cc: str) -> Path:
    """Built with OpenMP where the compiler has it (rows split over torch's threads), else without."""
    error: Exception = OSError("not built")
    for flags in ((*_FLAGS, "-fopenmp"), _FLAGS):
        try:
            try:
                return _compile(cc, flags, cache_dir() / "kernels")
            except PermissionError:
                return _compile(cc, flags, Path(tempfile.gettempdir()) / f"adaptune-{os.getuid()}" / "kernels")
        except (OSError, subprocess.SubprocessError) as e:
            error = e
    raise error


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtime files mapped into this process (Linux; empty elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    return {line.split()[-1] for line in maps.splitlines() if any(n in line for n in ("libgomp", "libiomp", "libomp"))}


@functools.cache
def _library() -> ctypes.CDLL | None:
    if sys.platform not in ("linux", "darwin") or platform.machine().lower() not in ("x86_64", "amd64") or \
            torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        logger.info("adapter kernel: needs Linux or macOS on an x86-64 CPU with AVX2; using torch's products")
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        logger.info("adapter kernel: no C compiler found; using torch's products")
        return None
    before = _openmp_runtimes()
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, subprocess.SubprocessError) as e:
        logger.info("adapter kernel: not built (%s); using torch's products", e)
        return None
    vp, long = ctypes.c_void_p, ctypes.c_long
    lib.adaptune_gemm.argtypes = [long, long, long, vp, long, vp, long, ctypes.c_int, ctypes.c_float,
                                  vp, long, vp, long, vp, ctypes.c_int]
    lib.adaptune_gemm.restype = ctypes.c_int
    # More than one thread only where its OpenMP is torch's own (the loader shares a library already
    # mapped under the same name): a second runtime's threads would fight torch's for the cores.
    lib.parallel = bool(lib.adaptune_parallel()) and len(before) == 1 and _openmp_runtimes() == before
    if not _agrees(lib):
        logger.warning("adapter kernel: results differ from torch's on this machine; using torch's products")
        return None
    return lib


def _agrees(lib: ctypes.CDLL) -> bool:
    """Small products through every path of the kernel (full and tail tiles, both weight layouts,
    H, bias, scale) against torch."""
    g = torch.Generator().manual_seed(0)
    x, w, h, b = (torch.randn(s, generator=g) for s in ((13, 7), (32, 7), (13, 32), (32,)))
    got = _run(lib, x, w, True, 32, h, b, 0.5), _run(lib, x, w.t().contiguous(), False, 32, None, None)
    want = h + 0.5 * torch.addmm(b, x, w.t()), x @ w.t()
    return all(r is not None and torch.allclose(r, t, rtol=1e-5, atol=1e-5) for r, t in zip(got, want))


def _run(lib, x, w, transposed: bool, n: int, onto, bias, scale: float = 1.0) -> torch.Tensor | None:
    """The kernel's ``onto + scale * (bias + x @ B)``, B = wᵀ (``transposed``) or w; None if it
    could not get memory for the packed weight."""
    m, k = x.shape
    w = w.detach().contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    failed = lib.adaptune_gemm(m, n, k, x.data_ptr(), x.stride(0), w.data_ptr(), w.stride(0), transposed, scale,
                               out.data_ptr(), n, None if onto is None else onto.data_ptr(),
                               0 if onto is None else onto.stride(0), None if bias is None else bias.data_ptr(),
                               torch.get_num_threads() if lib.parallel else 1)
    return None if failed else out


def _rows(t: torch.Tensor, cols: int) -> bool:
    """A matrix of ``cols`` columns whose rows are contiguous (any row stride); dtype and device are
    checked with the other operands in ``_usable``."""
    return t.dim() == 2 and t.shape[1] == cols and (t.stride(1) == 1 or cols == 1) and t.stride(0) >= cols


def _usable(x: torch.Tensor, w: torch.Tensor, k: int, n: int, bias: torch.Tensor | None = None,
            onto: torch.Tensor | None = None) -> ctypes.CDLL | None:
    """The loaded kernel when it applies to these operands (x: (M, k) times a k x n matrix from w;
    bias: (n,); onto: (M, n)), else None."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return None  # compilers, FLOP counters and fake tensors see torch's ops, not a C call
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
    lib = _library()
    return None if lib is None or (torch.get_num_threads() > 1 and not lib.parallel) else lib


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, onto: torch.Tensor | None = None,
           scale: float = 1.0) -> torch.Tensor | None:
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


__all__ = ["MIN_ROWS", "available", "linear", "matmul", "set_enabled"]
