"""Save and load one task adapter: a folder with ``adapter.safetensors`` and ``adapter_config.json``.

Only the task's own tensors are written (bottlenecks, and its layer-norm, pooler and head copies
when it has them) — a few percent of the model. The JSON is stamped with the library version and the base
model's identity: type, hidden size, depth and a fingerprint of the base weights. Loading is
strict: a different base, an unknown field, a missing, unexpected or mis-shaped tensor, or a
damaged file is an :class:`AdapterFileError` that names the problem. Nothing is unpickled.
Writes are atomic: the folder appears complete or not at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any
from collections.abc import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adaptune.core.architectures import ArchSpec, backbone, model_identity, pooler_module
from adaptune.core.atomic import atomic_write_dir, recover_swap  # noqa: F401 (recover_swap: re-exported)
from adaptune.core.config import AdapterConfig
from adaptune.errors import AdapterFileError, AdaptuneError
from adaptune.core.inject import _require, add_adapter, get_container, remove_adapter

FORMAT = 1
WEIGHTS = "adapter.safetensors"
CONFIG = "adapter_config.json"
FUSED = "fused"  # a fusion's folder holds the adapters it fuses, one folder each
_TOP_FIELDS = {"format", "adaptune_version", "name", "config", "base", "tensors", "extra", "sha256"}


def fingerprint(model: nn.Module, skip: str | None = None) -> str:
    """A short hash of the base weights: names, shapes and 256 evenly spaced values per tensor.

    Values are rounded to bfloat16 first, so the same checkpoint loaded in float32 or bfloat16
    gives the same fingerprint; the task head and any adapters are left out. A base quantised by
    :func:`adaptune.models.quantize.quantize_base` gives the fingerprint of its weights before.
    ``skip``: leave out the module at that backbone path (the pooler, which models built without
    one, as token classifiers are, do not have).
    """
    kept = getattr(model, "adaptune_base_fingerprint", None)
    if kept is not None and skip is None:
        return kept
    h = hashlib.sha256()
    for name, p in backbone(model).named_parameters():
        if name.startswith("adaptune.") or (skip is not None and name.startswith(skip + ".")):
            continue
        flat = p.detach().reshape(-1)
        steps = min(256, flat.numel())  # evenly spaced, in integers (float32 rounds past 2**24 elements)
        idx = torch.arange(steps, dtype=torch.int64) * (flat.numel() - 1) // max(steps - 1, 1)
        sample = flat[idx].to(torch.bfloat16).to(torch.float32).cpu().numpy().tobytes()
        h.update(f"{name}:{tuple(p.shape)}:".encode())
        h.update(sample)
    return h.hexdigest()[:16]


def base_identity(model: nn.Module) -> dict[str, Any]:
    container = get_container(model)
    ident = model_identity(model, container.spec)
    ident["fingerprint"] = fingerprint(model)
    quantized = getattr(model, "adaptune_quantized", None)
    if quantized is not None:  # trained on a quantised base; it loads on the full one too
        ident["quantized"] = quantized
    return ident


def save_adapter(
    model: nn.Module, name: str, path: str | os.PathLike, *, overwrite: bool = False, extra: dict | None = None
) -> Path:
    """Write adapter ``name`` of ``model`` to the folder ``path``.

    Args:
        model: the model carrying the adapter.
        name: which adapter.
        path: target folder (created; must not exist unless ``overwrite``).
        overwrite: replace an existing folder (atomically).
        extra: JSON-serialisable metadata to keep beside the config (e.g. label names).

    Returns:
        The folder's path.

    Raises:
        ConfigError: no adapter of that name.
        AdapterFileError: the folder exists and ``overwrite`` is false.
    """
    container = _require(model, name)
    fused = container.sets[name].config.fuse
    base = base_identity(model)  # once: the fused adapters' files carry the same

    def fill(folder: Path) -> None:
        _write_files(model, name, folder, extra, base)
        for other in fused:  # a fusion carries the adapters it fuses, so that a reload needs nothing else
            (folder / FUSED / other).mkdir(parents=True)
            _write_files(model, other, folder / FUSED / other, None, base)

    atomic_write_dir(Path(path), fill, overwrite)
    return Path(path)


def _write_files(model: nn.Module, name: str, folder: Path, extra: dict | None, base: dict[str, Any]) -> None:
    """The weights and config of adapter ``name`` into ``folder``, stamped with the base's identity."""
    aset = get_container(model).sets[name]
    tensors = {k: v.detach().contiguous().cpu() for k, v in aset.state_dict().items()}
    meta = {
        "format": FORMAT,
        "adaptune_version": _version(),
        "name": name,
        "config": aset.config.to_dict(),
        "base": base,
        "tensors": sorted(tensors),
        "extra": extra or {},
    }
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    meta["sha256"] = _sha256(folder / WEIGHTS)  # safetensors checks its header, not the data
    (folder / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed, validated ``adapter_config.json`` of an adapter folder (no tensors are read)."""
    path = Path(path)
    cfg_file = path / CONFIG
    if not path.is_dir():
        raise AdapterFileError(f"{path} is not an adapter folder (expected a folder with {CONFIG} and {WEIGHTS})")
    if not cfg_file.is_file():
        raise AdapterFileError(f"{path} is missing {CONFIG}; it is not a complete adapter folder")
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{cfg_file} is not valid JSON ({e}); the file is damaged") from None
    if not isinstance(meta, dict):
        raise AdapterFileError(f"{cfg_file} must hold a JSON object")
    if "format" not in meta and isinstance(meta.get("config"), dict) and "model_type" in meta:
        raise AdapterFileError(
            f"{path} is an AdapterHub adapter folder ({meta.get('version') or 'adapters'}), not an adaptune one: "
            "load it with adaptune.interop.adapterhub.load_adapterhub(model, path), or convert it with "
            f"'adaptune convert {path} --from adapterhub --model BASE -o OUT'"
        )
    if not (path / WEIGHTS).is_file():
        raise AdapterFileError(f"{path} is missing {WEIGHTS}; it is not a complete adapter folder")
    unknown = sorted(set(meta) - _TOP_FIELDS)
    if unknown:
        raise AdapterFileError(f"{cfg_file} has unknown field(s) {unknown}; it was written by another tool or version")
    if meta.get("format") != FORMAT:
        raise AdapterFileError(f"{cfg_file} has format {meta.get('format')!r}; this adaptune reads format {FORMAT}")
    if isinstance(meta.get("config"), dict) and "train_pooler" not in meta["config"]:
        meta["config"]["train_pooler"] = False  # written before the field existed: no pooler copy
    try:
        meta["config"] = AdapterConfig.from_dict(meta.get("config"))
    except AdaptuneError as e:
        raise AdapterFileError(f"{cfg_file}: {e}") from None
    return meta


def _check_base(model: nn.Module, saved: dict[str, Any], where: Path) -> None:
    here = base_identity(model)
    for key in ("model_type", "hidden_size", "num_layers"):
        if saved.get(key) != here[key]:
            raise AdapterFileError(
                f"adapter {where} was made for a base model with {key}={saved.get(key)!r}, "
                f"but this model has {key}={here[key]!r}; load it on the base model it was trained on"
            )
    pooler = get_container(model).spec.pooler
    without = fingerprint(model, skip=pooler) if pooler and saved.get("fingerprint") != here["fingerprint"] else None
    if saved.get("fingerprint") not in (here["fingerprint"], without):  # (trained on the same base without
        raise AdapterFileError(  # its pooler: a token-classification or RoBERTa-style model)
            f"adapter {where} was trained on different base weights (fingerprint {saved.get('fingerprint')} "
            f"vs {here['fingerprint']}); load the same checkpoint it was trained on, or pass check_base=False"
        )


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    name: str | None = None,
    activate: bool = True,
    check_base: bool = True,
    arch: ArchSpec | None = None,
    head: bool = True,
) -> str:
    """Load an adapter folder onto ``model`` as a new named adapter.

    Args:
        model: the base model it was trained on (any other adapters stay as they are).
        path: folder written by :func:`save_adapter`.
        name: name on this model (default: the saved name).
        activate: make it the active adapter.
        check_base: refuse a file made for a different base (type, size, depth, weights).
        arch: placement table for a custom model family.
        head: load the saved head copy too; ``False`` leaves it out (the task's head then runs
            elsewhere: :func:`adapter_tensors` reads it), e.g. a question-answering head served
            on a sequence-classification model's backbone.

    Returns:
        The adapter's name on the model.

    Raises:
        AdapterFileError: missing, damaged or mismatched files, listing the offending keys.
    """
    path = Path(path)
    meta = read_adapter_config(path)
    name = name or meta.get("name")
    config: AdapterConfig = meta["config"]
    container = get_container(model, arch, create=True)
    if check_base:
        _check_base(model, meta.get("base") or {}, path)
    loaded = []  # the fused adapters this call loads (removed again if the fusion fails)
    try:
        for other in config.fuse:
            if other in container.sets:
                continue  # already on the model (a reload of the fusion alone)
            if not (path / FUSED / other / CONFIG).is_file():
                raise AdapterFileError(
                    f"fusion {path} references adapter {other!r}, which is neither on this model nor in "
                    f"{path / FUSED}; load it first"
                )
            loaded.append(load_adapter(model, path / FUSED / other, name=other, activate=False, check_base=check_base))
        return _load_own(model, path, meta, name, activate, head)
    except BaseException:
        for other in reversed(loaded):
            remove_adapter(model, other)
        raise


def adapter_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder as saved (``head.*``, ``pooler.*``, bottlenecks, norms), on
    the CPU; not checked against a model (:func:`load_adapter` does that).

    Raises:
        AdapterFileError: the weights file is missing, truncated or damaged.
    """
    file = Path(path) / WEIGHTS
    try:
        return load_file(str(file), device="cpu")
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt headers
        raise AdapterFileError(
            f"{file} cannot be read ({str(e).splitlines()[0]}); the file is truncated or damaged"
        ) from None


def _load_own(model: nn.Module, path: Path, meta: dict, name: str, activate: bool, head: bool = True) -> str:
    """The adapter's own tensors (its fused adapters are on the model); ``head=False``: not its head."""
    config: AdapterConfig = meta["config"]
    tensors = adapter_tensors(path)
    if not head and config.train_head:
        config = dataclasses.replace(config, train_head=False)
        tensors = {k: v for k, v in tensors.items() if not k.startswith("head.")}

    def check(tensors: dict[str, torch.Tensor]) -> None:
        if meta.get("sha256") is not None and meta["sha256"] != _sha256(path / WEIGHTS):
            raise AdapterFileError(
                f"{path / WEIGHTS} does not match the checksum in {CONFIG}: the file is corrupted or was "
                "changed after saving; save the adapter again"
            )
        broken = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
        if broken:
            raise AdapterFileError(
                f"{path / WEIGHTS} holds NaN or infinite values in {few(broken)}; it was saved "
                "from a run that diverged: train it again with a lower learning rate"
            )

    pooler = pooler_module(model, get_container(model).spec)
    if config.train_pooler and pooler is not None and not any(k.startswith("pooler.") for k in tensors):
        config = dataclasses.replace(config, train_pooler=False)  # trained on this base built without its pooler
    fill_adapter(model, name, config, tensors, str(path / WEIGHTS), activate, check)
    return name


def fill_adapter(
    model: nn.Module,
    name: str,
    config: AdapterConfig,
    tensors: dict[str, torch.Tensor],
    where: str,
    activate: bool = True,
    check: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> nn.Module:
    """Add adapter ``name`` with ``config`` and load ``tensors`` into it strictly: head copies take the
    saved widths, a missing, unexpected or mis-shaped tensor is an :class:`AdapterFileError` naming it
    (``where``: the source), ``check`` may refuse more; nothing stays behind on an error."""
    aset = add_adapter(model, name, config, activate=False)
    try:
        fit_head_widths(aset, tensors)
        get_container(model)._rebuild()  # the head copy's new width: another bank for mixed batches
        problem = mismatch(aset.state_dict(), tensors)
        if problem:
            raise AdapterFileError(f"{where} does not fit this model: {problem}")
        if check is not None:
            check(tensors)
        aset.load_state_dict(tensors, strict=True)
    except BaseException:
        remove_adapter(model, name)
        raise
    if activate:
        get_container(model).active = name
    return aset


def mismatch(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> str | None:
    """What keeps ``tensors`` from loading strictly where ``expected`` (a state dict) is: the
    missing, unexpected and mis-shaped keys in one line; None when they fit."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    parts = []
    if missing:
        parts.append(f"missing {few(missing)}")
    if unexpected:
        parts.append(f"unexpected {few(unexpected)}")
    if shapes:
        parts.append(
            "shape mismatch " + few([f"{k} {tuple(tensors[k].shape)} vs {tuple(expected[k].shape)}" for k in shapes])
        )
    return "; ".join(parts) or None


def fit_head_widths(aset: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give the task's head copy the output width saved with it (its own number of labels).

    A head copy starts as a copy of the base model's head, which has the width of whatever task
    the base was loaded for; tasks with other label counts can share that base. Only a
    ``Linear``'s output width changes (weight rows and bias), its input must match; any other
    mismatch is left for the caller to report.
    """
    for mod_name, module in aset.named_modules():
        if not mod_name.startswith("head.") or not isinstance(module, nn.Linear):
            continue
        w, b = tensors.get(f"{mod_name}.weight"), tensors.get(f"{mod_name}.bias")
        if w is None or w.ndim != 2 or w.shape[1] != module.in_features or w.shape[0] == module.out_features:
            continue
        if (b is None) != (module.bias is None) or (b is not None and tuple(b.shape) != (w.shape[0],)):
            continue
        grad = module.weight.requires_grad
        ref = module.weight
        module.weight = nn.Parameter(torch.empty(w.shape, dtype=ref.dtype, device=ref.device), requires_grad=grad)
        if b is not None:
            module.bias = nn.Parameter(torch.empty(b.shape, dtype=ref.dtype, device=ref.device), requires_grad=grad)
        module.out_features = w.shape[0]


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def few(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _version() -> str:
    from adaptune import __version__

    return __version__
