"""The C kernels in ``csrc/`` (CPU, AVX2 + FMA, fp32): built on first use, loaded once, checked once.

- ``csrc/adapter_gemm.c``: the adapter's skinny products (used by :mod:`adaptune.cpu.adapter_gemm`);
- ``csrc/attention.c``: attention with dropout for training (used by :mod:`adaptune.cpu.kernels`);
- ``csrc/dropout.c``: dropout drawn and applied in one pass (used by :mod:`adaptune.cpu.kernels`);
- ``csrc/gelu.c``: the exact GELU and its gradient (used by :mod:`adaptune.cpu.kernels` and the adapter);
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
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from adaptune.env import cache_dir

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).with_name("csrc")
_FLAGS = ("-O3", "-mavx2", "-mfma", "-shared", "-fPIC")


def _sources() -> list[Path]:
    return sorted(_CSRC.glob("*.c"))


# The whole build (with OpenMP, then without if that fails) may take this long; then torch runs.
BUILD_SECONDS = 150


def _compile(cc: str, flags: tuple[str, ...], out_dir: Path, timeout: float) -> Path:
    """The shared library for these sources, compiler and flags, built once per machine."""
    parts = [p.read_bytes() for p in sorted(_CSRC.glob("*.[ch]"))]
    key = hashlib.sha256(b"\0".join(parts) + "\0".join((cc, *flags)).encode()).hexdigest()[:16]
    target = out_dir / f"adaptune_native-{key}.so"
    if target.exists():
        _check_safe(target)
        return target
    logger.warning(
        "C kernels: compiling them for this machine (once, up to %d s); "
        "`adaptune build-kernels` builds them ahead of time",
        int(timeout),
    )
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        run = subprocess.run(
            [cc, *flags, "-o", tmp, *map(str, _sources()), "-lm"],
            capture_output=True,
            text=True,
            timeout=max(1.0, timeout),
        )
        if run.returncode != 0:
            raise OSError(f"{cc} failed: {(run.stderr.strip().splitlines() or [f'exit {run.returncode}'])[-1]}")
        os.chmod(tmp, 0o700)
        os.replace(tmp, target)  # whole or not at all, also when two processes build at once
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _check_safe(path: Path) -> None:
    """Refuse (OSError) a folder or file that another user owns or may write: a library loaded from
    there would run their code in this process."""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OSError(f"{path} is not safe to load kernels from (a link, another user's, or writable by others)")


def _private_dir(folder: Path) -> Path:
    """``folder``, created private to this user where missing, checked safe (:func:`_check_safe`)
    where it exists."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_safe(folder)
    return folder


def kernel_dir() -> Path:
    """Where the kernels are built and loaded from: ``<cache>/kernels``; where that cannot be
    created, a folder of this user's in the system's temporary directory, used only when it is
    private (owned by this user, writable by no one else), as is the cache's.

    Raises:
        OSError: neither is usable.
    """
    try:
        return _private_dir(cache_dir() / "kernels")
    except OSError as e:
        first = e
    try:
        base = Path(tempfile.gettempdir()) / f"adaptune-{os.getuid()}"
        base.mkdir(mode=0o700, exist_ok=True)
        _check_safe(base)
        return _private_dir(base / "kernels")
    except OSError as e:
        raise OSError(f"no private folder to build them in ({first}; {e})") from None


def _build(cc: str) -> Path:
    """Built with OpenMP where the compiler has it (work split over torch's threads), else without;
    both tries together within ``BUILD_SECONDS``."""
    error: Exception = OSError("not built")
    deadline = time.monotonic() + BUILD_SECONDS
    out_dir = kernel_dir()
    for flags in ((*_FLAGS, "-fopenmp"), _FLAGS):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            return _compile(cc, flags, out_dir, left)
        except (OSError, subprocess.SubprocessError) as e:
            error = e
            if "not safe" in str(e):
                break
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
    lib.adaptune_adapter_forward.argtypes = [
        long,
        long,
        long,
        vp,
        long,
        vp,
        long,
        vp,
        vp,
        vp,
        vp,
        f32,
        vp,
        vp,
        long,
        i32,
    ]
    lib.adaptune_adapter_backward.argtypes = [long, long, long, vp, long, vp, vp, vp, f32, vp, vp, vp, long, i32, i32]
    lib.adaptune_adapter_forward.restype = lib.adaptune_adapter_backward.restype = ctypes.c_int
    lib.adaptune_gelu.argtypes = [long, vp, vp, i32]
    lib.adaptune_gelu_backward.argtypes = [long, vp, vp, vp, i32]
    lib.adaptune_gelu.restype = lib.adaptune_gelu_backward.restype = None


# Each module with C kernels registers its check of them against torch (adapter_gemm, kernels):
# they run once when the library loads, or at once for a module imported later; one failing check
# turns every kernel off. This module imports none of them.
_checks: list[Callable[[ctypes.CDLL], bool]] = []
_verdicts: dict[Callable[[ctypes.CDLL], bool], bool] = {}


def register_check(check: Callable[[ctypes.CDLL], bool]) -> None:
    """Have ``check(lib)`` (the registering module's kernels against torch) pass before any kernel runs."""
    if check not in _checks:
        _checks.append(check)


def library() -> ctypes.CDLL | None:
    """The loaded kernels (built on the first call) whose registered checks all pass, or None where
    they cannot run here."""
    lib = _load()
    if lib is None:
        return None
    if len(_verdicts) != len(_checks):
        with torch.inference_mode(False), torch.enable_grad():  # the first call may come from inside either
            for check in _checks:
                if check not in _verdicts:
                    _verdicts[check] = bool(check(lib))
        if not all(_verdicts.values()):
            _without("their results differ from torch's on this machine", logging.WARNING)
    return lib if all(_verdicts.values()) else None


def _forget() -> None:
    """Load (and check) anew on the next call: for tests that change the environment."""
    _load.cache_clear()
    _verdicts.clear()


library.cache_clear = _forget


@functools.cache
def _load() -> ctypes.CDLL | None:
    """The built and loaded library, before the checks; None where it cannot be had."""
    if os.environ.get("ADAPTUNE_NATIVE", "1") == "0":
        return _without("ADAPTUNE_NATIVE=0 turns them off", logging.DEBUG)
    if (
        sys.platform not in ("linux", "darwin")
        or platform.machine().lower() not in ("x86_64", "amd64")
        or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512")
    ):
        return _without("they need Linux or macOS on an x86-64 CPU with AVX2", logging.INFO)
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return _without("no C compiler found (install gcc or clang, or set CC)", logging.INFO)
    before = _openmp_runtimes()
    try:
        path = _build(cc)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        return _without(f"not built ({e})", logging.WARNING)
    lib.path = path
    _declare(lib)
    # More than one thread only where its OpenMP is torch's own (the loader shares a library already
    # mapped under the same name): a second runtime's threads would fight torch's for the cores.
    lib.parallel = bool(lib.adaptune_parallel()) and len(before) == 1 and _openmp_runtimes() == before
    return lib


_why_not: list[str] = []


def _without(reason: str, level: int) -> None:
    """Log why torch's operators run instead, keep the reason for :func:`why_not`; returns None."""
    _why_not[:] = [reason]
    logger.log(level, "C kernels: %s; using torch's operators", reason)
    return None


def why_not() -> str | None:
    """Why :func:`library` is None (after it was called), or None when the kernels are loaded."""
    return None if library() is not None else (_why_not[0] if _why_not else "turned off")


def usable() -> ctypes.CDLL | None:
    """The library where a kernel may run now: loaded, at torch's thread count, and not under a
    compiler's trace, a dispatch mode (FLOP counters and fake tensors see torch's ops, not a C call) or
    a ``torch.func`` transform (``vmap`` runs a task's copy of a module per row: its tensors are not plain)."""
    if (
        torch.compiler.is_compiling()
        or _get_current_dispatch_mode() is not None
        or torch._C._are_functorch_transforms_active()
    ):
        return None
    lib = library()
    return None if lib is None or (torch.get_num_threads() > 1 and not lib.parallel) else lib


def threads(lib: ctypes.CDLL) -> int:
    """How many threads a kernel call may use."""
    return torch.get_num_threads() if lib.parallel else 1


__all__ = ["BUILD_SECONDS", "kernel_dir", "library", "register_check", "threads", "usable", "why_not"]
