"""Training state on disk, for exact resume after a crash or a SIGKILL.

A checkpoint holds everything the next step depends on: the trainable tensors, the optimiser's
moments, the scheduler's position, the torch RNG (dropout) and where in which epoch the loop was.
Batch order is a pure function of (seed, epoch), so it needs no saving. Writes are atomic: a
checkpoint folder is either the old one or the new one, never half of each.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adaptune.errors import TrainingError
from adaptune.io import atomic_write_dir

STATE = "state.safetensors"
META = "state.json"
BEST = "best.safetensors"


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file via a temp file and a rename, so readers never see half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of every trainable parameter, by name."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_best(folder: Path, state: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{BEST}.tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, folder / BEST)


def load_best(folder: Path) -> dict[str, torch.Tensor] | None:
    f = folder / BEST
    return load_file(str(f)) if f.is_file() else None


def save_checkpoint(folder: Path, model: nn.Module, optimizer, scheduler, progress: dict[str, Any],
                    rank_rng: list[torch.Tensor] | None = None) -> None:
    """Write the training state to ``folder`` (replacing the previous one atomically).

    ``rank_rng``: under torchrun, every rank's CPU RNG state, so each resumes its own dropout stream.
    """
    tensors = {f"param.{k}": v for k, v in trainable_state(model).items()}
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for key, value in st.items():
            tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous().clone()
    tensors["rng.torch"] = torch.get_rng_state()
    for r, state in enumerate(rank_rng or []):
        tensors[f"rng.torch.rank{r}"] = state
    meta = {
        "progress": progress,
        "param_groups": opt["param_groups"],
        "scheduler": scheduler.state_dict(),
        "cuda_rng": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    best = load_best(folder)  # the best weights live beside the state and must survive the swap

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / STATE))
        (tmp / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if best is not None:
            save_file(best, str(tmp / BEST))

    atomic_write_dir(folder, fill, overwrite=True)


_HOW = ("fused", "foreach", "capturable", "differentiable")  # optimizer settings of the process, not the run


def load_checkpoint(folder: Path, model: nn.Module, optimizer, scheduler, rank: int = 0) -> dict[str, Any] | None:
    """Restore the state saved by :func:`save_checkpoint`; returns its progress dict, or None."""
    if not (folder / STATE).is_file() or not (folder / META).is_file():
        return None
    try:
        tensors = load_file(str(folder / STATE))
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except Exception as e:
        raise TrainingError(f"checkpoint in {folder} is damaged ({e}); delete it to restart the run from scratch") from None
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("param."):
                name = key[len("param.") :]
                if name not in params or not params[name].requires_grad:
                    raise TrainingError(f"checkpoint in {folder} has parameter {name!r} that this run does not train")
                params[name].copy_(value)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    # How the update runs (fused, foreach) is this process's choice for its device, not the saved one's.
    groups = [{**saved, **{k: now[k] for k in _HOW if k in now}} for saved, now in zip(meta["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors.get(f"rng.torch.rank{rank}", tensors["rng.torch"]))
    if meta.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())])
    return meta["progress"]
