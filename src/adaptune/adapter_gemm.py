"""The adapter's skinny matrix products through a small C kernel (one CPU thread, AVX2 + FMA, fp32).

An adapter multiplies the (B*T, d) hidden state by d x m and m x d weights with m much smaller than
d. BLAS libraries reach 55-65 GFLOP/s on a transformer's wide products on this project's CPU but
35-45 on these skinny ones: they pack the large operand for only m columns of output. The kernel
in ``csrc/adapter_gemm.c`` packs only the small weight, reads the large operand in place, and
starts each sum from the hidden state it adds onto (and the bias), so the adapter's add costs no
separate pass. Four of an adapter's six products use it (the down- and up-projections and their
input gradients); the two weight gradients stay with torch, which is as fast there.

It is compiled on first use with the system's C compiler (``$CC``, else ``cc``/``gcc``/``clang``)
into ``~/.cache/adaptune/kernels`` (``$ADAPTUNE_CACHE`` overrides) and checked against torch once.
Without a compiler, on other CPUs, with more than one torch thread (torch's own products then run
in parallel), for other dtypes and devices, under ``FlopCounterMode`` and other dispatch modes,
while ``torch.compile`` traces, or with ``ADAPTUNE_NATIVE=0``, every call returns
``None`` and the caller runs torch's product instead. Results equal torch's up to float rounding
(the sums run in another order); each row's result is independent of the other rows.
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

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "adapter_gemm.c"
_FLAGS = ("-O3", "-mavx2", "-mfma", "-shared", "-fPIC")
_enabled = os.environ.get("ADAPTUNE_NATIVE", "1") != "0"


def set_enabled(enabled: bool) -> bool:
    """Turn the kernel on or off for this process (it is on unless ``ADAPTUNE_NATIVE=0``); returns
    the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def available() -> bool:
    """Whether the kernel is built and loaded here (building it on first call)."""
    return _library() is not None


def _cache_dir() -> Path:
    root = os.environ.get("ADAPTUNE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "adaptune"


def _compile(cc: str, out_dir: Path) -> Path:
    """The shared library for this source, compiler and flags, built once per machine."""
    key = hashlib.sha256(_SOURCE.read_bytes() + "\0".join((cc, *_FLAGS)).encode()).hexdigest()[:16]
    target = out_dir / f"adapter_gemm-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        run = subprocess.run([cc, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            raise OSError(f"{cc} failed: {run.stderr.strip().splitlines()[-1:] or run.returncode}")
        os.replace(tmp, target)  # whole or not at all, also when two processes build at once
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


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
    try:
        try:
            path = _compile(cc, _cache_dir() / "kernels")
        except PermissionError:
            path = _compile(cc, Path(tempfile.gettempdir()) / f"adaptune-{os.getuid()}" / "kernels")
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        logger.info("adapter kernel: not built (%s); using torch's products", e)
        return None
    vp, long = ctypes.c_void_p, ctypes.c_long
    lib.adaptune_gemm.argtypes = [long, long, long, vp, long, vp, vp, long, vp, long, vp]
    lib.adaptune_gemm.restype = None
    if not _agrees(lib):
        logger.warning("adapter kernel: results differ from torch's on this machine; using torch's products")
        return None
    return lib


def _agrees(lib: ctypes.CDLL) -> bool:
    """One small product with every path of the kernel (full and tail tiles, H, bias) against torch."""
    g = torch.Generator().manual_seed(0)
    x, w, h, b = (torch.randn(s, generator=g) for s in ((13, 7), (32, 7), (13, 32), (32,)))
    got = _run(lib, x, pack(w, transpose=True), 32, h, b)
    return torch.allclose(got, torch.addmm(h + b, x, w.t()), rtol=1e-5, atol=1e-5)


def pack(w: torch.Tensor, transpose: bool) -> torch.Tensor:
    """B = wᵀ (``transpose``) or w, as N/16 contiguous panels of K x 16 (N: B's columns)."""
    b = w.t() if transpose else w  # (K, N)
    k, n = b.shape
    return b.reshape(k, n // 16, 16).transpose(0, 1).contiguous()


def _run(lib, x, panels, n, onto, bias) -> torch.Tensor:
    m, k = x.shape
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    lib.adaptune_gemm(m, n, k, x.data_ptr(), x.stride(0), panels.data_ptr(), out.data_ptr(), n,
                      None if onto is None else onto.data_ptr(), 0 if onto is None else onto.stride(0),
                      None if bias is None else bias.data_ptr())
    return out


def _rows(t: torch.Tensor, cols: int) -> bool:
    """A CPU fp32 matrix of ``cols`` columns whose rows are contiguous (any row stride)."""
    return (t.dim() == 2 and t.shape[1] == cols and t.dtype == torch.float32 and t.device.type == "cpu"
            and (t.stride(1) == 1 or cols == 1) and t.stride(0) >= cols)


def _usable(x: torch.Tensor, n: int, w: torch.Tensor, bias: torch.Tensor | None = None,
            onto: torch.Tensor | None = None) -> ctypes.CDLL | None:
    """The loaded kernel when it applies to these operands (B with ``n`` columns), else None."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return None  # compilers, FLOP counters and fake tensors see torch's ops, not a C call
    if not _enabled or n % 16 or torch.get_num_threads() != 1:
        return None
    if not _rows(x, x.shape[-1]) or x.shape[1] == 0 or (onto is not None and not _rows(onto, n)):
        return None
    ts = [t for t in (x, w, bias, onto) if t is not None]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in ts):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return None  # the kernel records no autograd graph
    return _library()


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, onto: torch.Tensor | None = None,
           scale: float = 1.0) -> torch.Tensor | None:
    """``onto + scale * (x @ wᵀ + bias)`` as a new (M, N) tensor, or None where the kernel does not
    apply. x: (M, K); w: (N, K); bias: (N,) or None; onto: (M, N) or None."""
    lib = _usable(x, w.shape[0], w, bias, onto)
    if lib is None:
        return None
    if scale != 1.0:
        w, bias = w * scale, None if bias is None else bias * scale
    return _run(lib, x, pack(w, transpose=True), w.shape[0], onto, None if bias is None else bias.contiguous())


def matmul(x: torch.Tensor, w: torch.Tensor, onto: torch.Tensor | None = None) -> torch.Tensor | None:
    """``onto + x @ w`` as a new (M, N) tensor, or None where the kernel does not apply. x: (M, K);
    w: (K, N); onto: (M, N) or None."""
    lib = _usable(x, w.shape[1], w, None, onto)
    return None if lib is None else _run(lib, x, pack(w, transpose=False), w.shape[1], onto, None)


__all__ = ["available", "linear", "matmul", "pack", "set_enabled"]
