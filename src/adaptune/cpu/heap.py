"""Keep freed CPU memory in the process while a job runs, instead of faulting it back in page by page.

A training step or a batched forward on the CPU allocates and frees hundreds of MiB of activations.
glibc's ``malloc`` gives large freed blocks back to the kernel (``munmap``, or by trimming the top
of its heap), so the next step gets the same memory back one 4 KiB page fault at a time
(docs/performance.md, "Freed memory kept between steps", has the counts; ``bench/adapter_speed.py
--only heap`` measures them).

:func:`keep_freed_memory` sets glibc's mmap threshold to its maximum (32 MiB: smaller blocks come
from the heap) and stops trimming while it is active, so freed blocks are reused by the next step.
The peak barely moves, since what is kept is memory the job used anyway; the heap fragments a
little more. The setting is the whole process's, other threads included.
Leaving the outermost block hands what is free back to the kernel (``malloc_trim``) and lets glibc
trim its heap again above 64 MiB free. glibc cannot go back to its adaptive thresholds once set,
so the process keeps a fixed 32 MiB mmap threshold and a 64 MiB trim threshold after it, about
where glibc's own rule would have taken them for this work.
A child forked inside the block (a ``fork`` DataLoader worker) starts outside it, with trimming on.

:func:`return_freed_memory` is the opposite choice, for work that must fit the machine: blocks of
1 MiB and more are mapped apart and unmapped when freed, so the resident memory follows the live
tensors (checkpointed training frees and re-creates activations between live ones, and glibc's heap
would keep the holes). Leaving it, or a child forked inside it, returns to the same fixed 32 MiB
and 64 MiB thresholds. The outermost block of either kind decides; a block nested in one of the
other kind yields False.

It does nothing on other C libraries (macOS, Windows, musl), under a preloaded allocator (jemalloc,
tcmalloc, mimalloc), when ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TOP_PAD_``,
``MALLOC_MMAP_MAX_`` or a ``glibc.malloc.*`` tunable in ``GLIBC_TUNABLES`` is set (the user chose), or
with ``ADAPTUNE_KEEP_FREED_MEMORY=0``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import sys
import threading
from collections.abc import Iterator

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit systems
_SMALL_MMAP_THRESHOLD = 1 << 20  # return_freed_memory: blocks of 1 MiB and more mapped apart
_TRIM_AFTER = 64 << 20  # twice that: where glibc's adaptive trim threshold tops out
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_lock = threading.Lock()
_depth = 0  # open keep_freed_memory blocks
_libc: ctypes.CDLL | None = None  # set while the outermost block applies the setting
_mmap_threshold = 0  # the mmap threshold the outermost block set


@functools.cache
def _load_glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc and its malloc is the one in use and untuned; else None."""
    if os.environ.get("ADAPTUNE_KEEP_FREED_MEMORY", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if any(os.environ.get(v) for v in _USER_SETTINGS) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    if any(name in os.environ.get("LD_PRELOAD", "") for name in _OTHER_ALLOCATORS):
        return None
    return _load_glibc()


@contextlib.contextmanager
def keep_freed_memory(give_back: bool = True) -> Iterator[bool]:
    """Within the block, freed CPU memory stays in the process for reuse; on leaving, it goes back.

    Yields whether the setting applies here (glibc's own, untuned ``malloc``, 64-bit). Nests: only
    the outermost block changes the setting and, with ``give_back`` (the command line, about to
    exit, skips it), returns the free memory on leaving. The command line runs every command inside
    it (or inside :func:`return_freed_memory` when memory comes first); library calls
    (:func:`adaptune.training.train.train`, ``evaluate``, :class:`adaptune.Predictor`) never
    change this process-wide setting themselves. Python callers opt in around their own work::

        with adaptune.keep_freed_memory():
            adaptune.training.train(cfg, "runs/r")    # or a loop of model(**batch), or Predictor.predict
    """
    with _heap_block(_MMAP_THRESHOLD, -1, give_back) as applied:  # trim -1: never trim (mallopt(3))
        yield applied


@contextlib.contextmanager
def return_freed_memory(give_back: bool = True) -> Iterator[bool]:
    """The opposite choice, for work that must fit the machine: within the block, every block of
    1 MiB or more is mapped apart and unmapped when freed, so the process's resident memory follows
    what its tensors hold, not the most its heap ever held. Each such block is faulted in anew, a
    page at a time, which costs time. The command line uses it for runs that ask to save memory
    (``--quantize``, ``--gradient-checkpointing``). Same nesting and conditions as
    :func:`keep_freed_memory`; the outermost block of either kind decides (a block nested in one of
    the other kind yields False)."""
    with _heap_block(_SMALL_MMAP_THRESHOLD, _TRIM_AFTER, give_back) as applied:
        yield applied


@contextlib.contextmanager
def _heap_block(mmap_threshold: int, trim_threshold: int, give_back: bool) -> Iterator[bool]:
    global _depth, _libc, _mmap_threshold
    with _lock:
        if _depth == 0:
            libc = _glibc()
            if libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1:
                libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
                _libc, _mmap_threshold = libc, mmap_threshold
        _depth += 1
        applied = _libc is not None and _mmap_threshold == mmap_threshold  # this block's setting holds
    try:
        yield applied
    finally:
        with _lock:
            if _depth > 0:  # 0 in a child forked inside the block that unwinds it
                _depth -= 1
                if _depth == 0 and _libc is not None:
                    _libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
                    _libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_AFTER)
                    if give_back:
                        _libc.malloc_trim(0)
                    _libc = None


def _outside_in_child() -> None:
    """A forked child does not inherit the parent's open blocks: trimming back on, nothing open."""
    global _depth, _libc
    if _libc is not None:
        _libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
        _libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_AFTER)
    _depth, _libc = 0, None


os.register_at_fork(after_in_child=_outside_in_child)
