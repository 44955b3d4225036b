"""Write an adaptune adapter as a folder AdapterHub's ``adapters`` 1.x loads with ``load_adapter``.

The inverse of :mod:`adaptune.interop.adapterhub`: the config becomes a full ``BnConfig`` (every
field written, so no default of another ``adapters`` version decides), the bottlenecks get
AdapterHub's tensor names, and the head (when the adapter has one) becomes a flex head:
``classification`` / ``multilabel_classification`` with two layers (adaptune's pooler copy, then
its classifier) or one layer on the model's pooler, ``tagging`` with one. Weights are written
twice: ``pytorch_adapter.bin`` (what ``load_adapter`` reads by default; a plain dict of tensors)
and ``adapter.safetensors`` (``use_safetensors=True``); the head likewise.

Refused, with the reason: adapters with their own layer-norm copies (AdapterHub has no place for
them: train with ``train_layer_norms=False`` to export), bottleneck sizes no reduction factor of
AdapterHub gives, and heads other than those above.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from adaptune.core.inject import _require
from adaptune.core.io import CONFIG, atomic_write_dir
from adaptune.errors import AdapterFileError
from adaptune.interop.adapterhub import (
    FAMILIES,
    HEAD_BIN,
    HEAD_CONFIG,
    HEAD_SAFE,
    LOCATIONS,
    WEIGHTS_BIN,
    WEIGHTS_SAFE,
)
from adaptune.interop.adapterhub_heads import HEAD_ACTIVATION, from_model_layout, model_head_kind

VERSION = "adapters.1.3.0"  # the format written (AdapterHub stamps its version the same way)
_EXPORT_ACTS = {"relu": "relu", "gelu": "gelu", "silu": "swish", "tanh": "tanh", "identity": "linear"}
_HEAD_TYPES = {"classification": "classification", "multi-label": "multilabel_classification", "token": "tagging"}


def _reduction_factor(hidden: int, size: int) -> float:
    """A reduction factor r with AdapterHub's ``int(hidden // r) == size``."""
    for r in (hidden / size, (hidden / size) * (1 - 1e-12), (hidden / size) * (1 + 1e-12)):
        if max(1, int(hidden // r)) == size:
            return r
    raise AdapterFileError(f"no AdapterHub reduction factor gives a bottleneck of {size} on width {hidden}")


def bn_config(config, hidden: int, num_layers: int) -> dict:
    """adaptune's AdapterConfig as AdapterHub's BnConfig fields (all of them)."""
    layers = config.resolve_layers(num_layers)
    parallel = config.mode == "parallel"
    return {
        "adapter_residual_before_ln": False,
        "cross_adapter": False,
        "dropout": 0.0,
        "factorized_phm_W": True,
        "factorized_phm_rule": False,
        "hypercomplex_nonlinearity": "glorot-uniform",
        "init_weights": "mam_adapter" if config.zero_init_up else "bert",
        "init_weights_seed": None,
        "inv_adapter": None,
        "inv_adapter_reduction_factor": None,
        "is_parallel": parallel,
        "learn_phm": True,
        "leave_out": [i for i in range(num_layers) if i not in layers],
        "ln_after": False,
        "ln_before": False,
        "mh_adapter": "attn" in config.slots,
        "non_linearity": _EXPORT_ACTS[config.nonlinearity],
        "original_ln_after": True,
        "original_ln_before": config.norm_before,
        "output_adapter": "ffn" in config.slots,
        "phm_bias": True,
        "phm_c_init": "normal",
        "phm_dim": 4,
        "phm_init_range": 0.0001,
        "phm_layer": False,
        "phm_rank": 1,
        "reduction_factor": _reduction_factor(hidden, config.size),
        "residual_before_ln": True,
        "scaling": float(config.scale),
        "shared_W_phm": False,
        "shared_phm_rule": True,
        "stochastic_depth": 0.0,
        "use_gating": False,
    }


def save_adapterhub(
    model: nn.Module,
    name: str,
    path: str | os.PathLike,
    *,
    labels: list[str] | None = None,
    with_head: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write adapter ``name`` of ``model`` as an AdapterHub folder.

    Args:
        model: the model carrying the adapter (a BERT-like transformers model).
        name: which adapter; also its name in the folder.
        path: target folder (written atomically; must not exist unless ``overwrite``).
        labels: the head's label names (default: the model config's ``id2label``).
        with_head: write the adapter's head too (when it has one).

    Raises:
        AdapterFileError: the adapter uses something AdapterHub's format cannot hold (named).
    """
    container = _require(model, name)
    aset = container.sets[name]
    family = getattr(model.config, "model_type", None)
    if family not in FAMILIES:
        raise AdapterFileError(f"AdapterHub folders are written for {', '.join(FAMILIES)} models; this is {family!r}")
    if aset.config.fuse:
        raise AdapterFileError(
            f"adapter {name!r} is an AdapterFusion; export the adapters it fuses (AdapterHub fusion folders are read, "
            "not written)"
        )
    if len(aset.norms):
        raise AdapterFileError(
            f"adapter {name!r} trains its own layer-norm copies, which AdapterHub's format cannot hold; "
            "train it with train_layer_norms=False (CLI: adaptune train --no-train-layer-norms) to export it"
        )
    hidden, num_layers = model.config.hidden_size, model.config.num_hidden_layers
    prefix = f"{model.base_model_prefix}.encoder.layer"
    tensors = {}
    for key, value in aset.adapters.state_dict().items():
        layer, slot, part, kind = key.split(".")
        part = "adapter_down.0" if part == "down" else "adapter_up"
        tensors[f"{prefix}.{layer}.{LOCATIONS[slot]}.adapters.{name}.{part}.{kind}"] = (
            value.detach().contiguous().cpu()
        )
    meta = {
        "config": bn_config(aset.config, hidden, num_layers),
        "hidden_size": hidden,
        "model_class": f"{type(model).__name__.split('For')[0].removesuffix('Model')}AdapterModel",
        "model_name": getattr(model.config, "_name_or_path", "") or "",
        "model_type": family,
        "name": name,
        "version": VERSION,
    }
    head = _head(model, aset, name, labels, meta) if with_head and len(aset.head) else None

    def fill(folder: Path) -> None:
        _write(folder, CONFIG, WEIGHTS_BIN, WEIGHTS_SAFE, meta, tensors)
        if head is not None:
            _write(folder, HEAD_CONFIG, HEAD_BIN, HEAD_SAFE, *head)

    atomic_write_dir(Path(path), fill, overwrite)
    return Path(path)


def _head(model: nn.Module, aset, name: str, labels, meta: dict) -> tuple[dict, dict]:
    kind = model_head_kind(model)
    if kind is None or set(aset.head) != {"classifier"}:
        raise AdapterFileError(
            f"the head of a {type(model).__name__} is not written as an AdapterHub head; "
            "export the adapter without it (with_head=False, CLI: --no-head)"
        )
    pooler = next(iter(aset.pooler.values()), None) if len(aset.pooler) else None
    if kind == "token" and pooler is not None:
        raise AdapterFileError(
            "a token-classification adapter with a pooler copy cannot be written as an AdapterHub head"
        )
    linears, two = from_model_layout(aset.head["classifier"], pooler)
    n = linears[-1].out_features
    if labels is None:
        id2label = getattr(model.config, "id2label", None) or {}
        labels = [id2label.get(i, f"LABEL_{i}") for i in range(n)] if len(id2label) == n else None
    labels = labels or [f"LABEL_{i}" for i in range(n)]
    two = two and kind != "token"
    config = {
        "head_type": _HEAD_TYPES[kind],
        "num_labels": n,
        "layers": 2 if two else 1,
        "activation_function": HEAD_ACTIVATION.get(model.config.model_type, "tanh") if two else "tanh",
        "label2id": {label: i for i, label in enumerate(labels)},
        "dropout_prob": None,
    }
    if kind != "token":
        config.update(use_pooler=not two, bias=True)
    tensors = {}
    for index, linear in zip((1, 4) if two else (1,), linears):
        tensors[f"heads.{name}.{index}.weight"] = linear.weight.detach().contiguous().cpu()
        tensors[f"heads.{name}.{index}.bias"] = linear.bias.detach().contiguous().cpu()
    return {**{k: v for k, v in meta.items() if k != "config"}, "config": config}, tensors


def _write(folder: Path, config_name: str, bin_name: str, safe_name: str, meta: dict, tensors: dict) -> None:
    (folder / config_name).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    torch.save(tensors, folder / bin_name)
    save_file(tensors, str(folder / safe_name), metadata={"format": "pt"})
