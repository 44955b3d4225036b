"""What adaptune shares with its surroundings: where it keeps what it builds once per machine, and
how it quiets ``transformers`` while loading. Imports nothing of adaptune (every layer may use it)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path


def cache_dir() -> Path:
    """Where adaptune keeps what it builds once per machine: converted models, compiled kernels."""
    return Path(os.environ.get("ADAPTUNE_CACHE") or Path.home() / ".cache" / "adaptune")


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report (e.g. 'classifier newly initialised': that is intended), and
    the warnings torchao logs when transformers' quantizer registry imports it (its optional CUDA
    libraries, torch's deprecation of its enum registrations): levels are restored on leaving."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # the "Loading weights" bar of every from_pretrained
    others = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    before = [lg.level for lg in others]
    for lg in others:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, lv in zip(others, before):
            lg.setLevel(lv)
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
