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

from adaptune.errors import ConfigError, TrainingError
from adaptune.core.io import atomic_write_dir, recover_swap

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


def read_json(path: Path, key: str | None = None) -> Any:
    """A run folder's JSON file (``key``: one section of it), or a :class:`ConfigError` saying which
    file is missing or damaged."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing; {path.parent} is not a finished run folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} cannot be read ({e}); the run folder is damaged: train it again") from None
    if key is None:
        return value
    if not isinstance(value, dict) or not isinstance(value.get(key), dict):
        raise ConfigError(f"{path} has no {key!r} section; the run folder is damaged or from another tool")
    return value[key]


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


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer,
    scheduler,
    progress: dict[str, Any],
    rank_rng: list[torch.Tensor] | None = None,
) -> None:
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
    """Restore the state saved by :func:`save_checkpoint`; returns its progress dict, or None when
    ``folder`` holds no checkpoint (a swap a crash interrupted is put back first).

    Raises:
        TrainingError: the checkpoint is damaged or does not fit this run (a trained parameter
            missing or of another shape, RNG states of another number of GPUs); nothing is changed.
    """
    recover_swap(folder)
    if not (folder / STATE).is_file() or not (folder / META).is_file():
        return None
    try:
        tensors = load_file(str(folder / STATE))
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except Exception as e:
        raise TrainingError(
            f"checkpoint in {folder} is damaged ({e}); delete it to restart the run from scratch"
        ) from None
    saved = {k[len("param.") :]: v for k, v in tensors.items() if k.startswith("param.")}
    _check_fits(folder, saved, {n: p for n, p in model.named_parameters() if p.requires_grad}, meta, tensors)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    # How the update runs (fused, foreach) is this process's choice for its device, not the saved one's.
    groups = [
        {**saved, **{k: now[k] for k in _HOW if k in now}}
        for saved, now in zip(meta["param_groups"], optimizer.param_groups)
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors.get(f"rng.torch.rank{rank}", tensors["rng.torch"]))
    if meta.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())])
    return meta["progress"]


def _check_fits(
    folder: Path,
    saved: dict[str, torch.Tensor],
    trained: dict[str, torch.Tensor],
    meta: dict,
    tensors: dict[str, torch.Tensor],
) -> None:
    """Refuse a checkpoint that does not fit this run, before anything is restored."""
    unknown = sorted(set(saved) - set(trained))
    if unknown:
        raise TrainingError(
            f"checkpoint in {folder} has parameter {unknown[0]!r} that this run does not train"
            f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; resume with the "
            "run's own settings"
        )
    missing = sorted(set(trained) - set(saved))
    if missing:
        raise TrainingError(
            f"checkpoint in {folder} lacks trained parameter {missing[0]!r}"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; it was written by "
            "another run or is damaged: delete it to restart from scratch"
        )
    for name, value in saved.items():
        if value.shape != trained[name].shape:
            raise TrainingError(
                f"checkpoint in {folder} has {name} of shape {tuple(value.shape)}, this run "
                f"{tuple(trained[name].shape)}; it was written by another run"
            )
    if meta.get("cuda_rng") and torch.cuda.is_available():
        saved_gpus = sum(1 for k in tensors if k.startswith("rng.cuda."))
        if saved_gpus != torch.cuda.device_count():
            raise TrainingError(
                f"checkpoint in {folder} was written with {saved_gpus} GPU(s) visible, this process "
                f"sees {torch.cuda.device_count()}; resume with the same GPUs visible "
                "(CUDA_VISIBLE_DEVICES) to continue the run exactly"
            )
