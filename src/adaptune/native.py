"""The C kernels in ``csrc/`` (CPU, AVX2 + FMA, fp32): built on first use, loaded once, checked once.

- ``csrc/adapter_gemm.c``: the adapter's skinny products (used by :mod:`adaptune.adapter_gemm`);
- ``csrc/attention.c``: attention with dropout for training (used by :mod:`adaptune.kernels`);
- ``csrc/dropout.c``: dropout drawn and applied in one pass (used by :mod:`adaptune.kernels`);
- ``csrc/gelu.c``: the exact GELU and its gradient (used by :mod:`adaptune.kernels` and the adapter);
- ``csrc/tile.h``: the register tile the products use; ``csrc/dropout.h``: the random draws;
  ``csrc/vmath.h``: vector exp and GELU.

They are compiled together with the system's C compiler (``$CC``, else ``cc``/``gcc``/``clang``)
into one shared library in ``~/.cache/adaptune/kernels`` (``$ADAPTUNE_CACHE`` overrides), named by
a hash of the sources, compiler and flags, and checked against torch once per process. Built with
OpenMP where the compiler has it, they split work over ``torch.get_num_threads()`` threads of
torch's own OpenMP runtime (the loader shares the library torch mapped); built without, or where
that runtime would be a second one, they run at one torch thread only (``library().parallel``).
Without a compiler, on other CPUs, when the check fails, or with ``ADAPTUNE_NATIVE=0``,
:func:`library` is None and every caller runs torch's operators instead.
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

_CSRC = Path(__file__).with_name("csrc")
_FLAGS = ("-O3", "-mavx2", "-mfma", "-shared", "-fPIC")


def _sources() -> list[Path]:
    return sorted(_CSRC.glob("*.c"))


def _compile(cc: str, flags: tuple[str, ...], out_dir: Path) -> Path:
    """The shared library for these sources, compiler and flags, built once per machine."""
    parts = [p.read_bytes() for p in sorted(_CSRC.glob("*.[ch]"))]
    key = hashlib.sha256(b"\0".join(parts) + "\0".join((cc, *flags)).encode()).hexdigest()[:16]
    target = out_dir / f"adaptune_native-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        run = subprocess.run([cc, *flags, "-o", tmp, *map(str, _sources()), "-lm"], capture_output=True, text=True,
                             timeout=180)
        if run.returncode != 0:
            raise OSError(f"{cc} failed: {(run.stderr.strip().splitlines() or [f'exit {run.returncode}'])[-1]}")
        os.replace(tmp, target)  # whole or not at all, also when two processes build at once
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _build(cc: str) -> Path:
    """Built with OpenMP where the compiler has it (work split over torch's threads), else without."""
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


def _declare(lib: ctypes.CDLL) -> None:
    """Argument types of the exported functions (the C sources document them)."""
    vp, long, f32, i32, u64 = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int, ctypes.c_uint64
    strided = [vp, long, long, long]  # a base pointer, then strides over batch, head and row
    lib.adaptune_gemm.argtypes = [long, long, long, vp, long, vp, long, i32, f32, vp, long, vp, long, vp, i32]
    lib.adaptune_attention_forward.argtypes = [long] * 5 + strided * 4 + [f32, f32, u64] + strided + [vp, vp, i32]
    lib.adaptune_attention_backward.argtypes = [long] * 5 + strided * 3 + [vp, vp, f32, f32] + strided * 4 + [i32]
    for fn in (lib.adaptune_gemm, lib.adaptune_attention_forward, lib.adaptune_attention_backward):
        fn.restype = ctypes.c_int
    lib.adaptune_dropout.argtypes = [long, vp, vp, vp, f32, u64, i32]
    lib.adaptune_dropout_backward.argtypes = [long, vp, vp, f32, vp, i32]
    lib.adaptune_dropout.restype = lib.adaptune_dropout_backward.restype = None
    lib.adaptune_adapter_forward.argtypes = [long, long, long, vp, long, vp, long, vp, vp, vp, vp, f32, vp, vp, long, i32]
    lib.adaptune_adapter_backward.argtypes = [long, long, long, vp, long, vp, vp, vp, f32, vp, vp, vp, long, i32, i32]
    lib.adaptune_adapter_forward.restype = lib.adaptune_adapter_backward.restype = ctypes.c_int
    lib.adaptune_gelu.argtypes = [long, vp, vp, i32]
    lib.adaptune_gelu_backward.argtypes = [long, vp, vp, vp, i32]
    lib.adaptune_gelu.restype = lib.adaptune_gelu_backward.restype = None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels (built on the first call), or None where they cannot run here."""
    if os.environ.get("ADAPTUNE_NATIVE", "1") == "0":
        return None
    if sys.platform not in ("linux", "darwin") or platform.machine().lower() not in ("x86_64", "amd64") or \
            torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        logger.info("C kernels: need Linux or macOS on an x86-64 CPU with AVX2; using torch's operators")
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        logger.info("C kernels: no C compiler found; using torch's operators")
        return None
    before = _openmp_runtimes()
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, subprocess.SubprocessError) as e:
        logger.info("C kernels: not built (%s); using torch's operators", e)
        return None
    _declare(lib)
    # More than one thread only where its OpenMP is torch's own (the loader shares a library already
    # mapped under the same name): a second runtime's threads would fight torch's for the cores.
    lib.parallel = bool(lib.adaptune_parallel()) and len(before) == 1 and _openmp_runtimes() == before
    from adaptune import adapter_gemm, kernels  # their checks use their own wrappers

    with torch.inference_mode(False), torch.enable_grad():  # the first call may come from inside either
        agrees = (adapter_gemm.agrees(lib) and kernels.native_attention_agrees(lib)
                  and kernels.native_dropout_agrees(lib) and kernels.native_gelu_agrees(lib))
    if not agrees:
        logger.warning("C kernels: results differ from torch's on this machine; using torch's operators")
        return None
    return lib


def usable() -> ctypes.CDLL | None:
    """The library where a kernel may run now: loaded, at torch's thread count, and not under a
    compiler's trace or a dispatch mode (FLOP counters and fake tensors see torch's ops, not a C call)."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return None
    lib = library()
    return None if lib is None or (torch.get_num_threads() > 1 and not lib.parallel) else lib


def threads(lib: ctypes.CDLL) -> int:
    """How many threads a kernel call may use."""
    return torch.get_num_threads() if lib.parallel else 1


__all__ = ["library", "threads", "usable"]
