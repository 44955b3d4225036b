"""Folders written atomically: a crash leaves the old folder or the new one, never a mix."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from adaptune.errors import AdapterFileError


def atomic_write_dir(path: Path, fill: Callable[[Path], None], overwrite: bool) -> None:
    """Let ``fill`` write a temp folder beside ``path``, sync it, then swap it into place.

    A crash at any point leaves either the old folder or the new one, never a mix and never
    nothing; an existing folder is replaced only when ``overwrite`` is true. On Linux the swap is
    one atomic exchange of the two folders (``renameat2(RENAME_EXCHANGE)``); elsewhere it is two
    renames, and a crash between them leaves the old folder as ``.NAME.old-PID``, which the next
    write or :func:`recover_swap` puts back.
    """
    path = Path(path)
    recover_swap(path)
    if path.exists() and not overwrite:
        raise AdapterFileError(f"{path} already exists; choose another path or pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if not path.exists():
            os.replace(tmp, path)
        elif _exchange(tmp, path):  # tmp now holds the old folder
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_swap(path: Path) -> bool:
    """Put back the folder a crash between the two renames of a non-atomic swap left aside (the
    newest ``.NAME.old-PID`` beside a missing ``path``); True when it did."""
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return False
    left = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not left:
        return False
    os.replace(left[-1], path)
    return True


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2``); False where it is not available."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0
