"""Read the adapter folders AdapterHub's ``adapters`` 1.x writes (``model.save_adapter``).

A folder holds ``adapter_config.json`` (the same file name as adaptune's, another schema: the
adapter's ``BnConfig`` under ``"config"``, beside ``model_type``, ``hidden_size``, ``version``),
the weights as ``pytorch_adapter.bin`` (a pickled dict of tensors, read with
``torch.load(weights_only=True)`` so that nothing but tensors is ever unpickled) or
``adapter.safetensors``, and optionally a prediction head (``head_config.json`` with
``pytorch_model_head.bin`` or ``model_head.safetensors``). The format is told by the config's keys.

What maps, for BERT-like encoders (``encoder.layer.i.attention.output`` / ``.output``):

- ``double_seq_bn`` (Houlsby), ``seq_bn`` (Pfeiffer: ``original_ln_before`` is adaptune's
  ``norm_before``), ``par_bn`` (He et al.: ``is_parallel``), any mix of ``mh_adapter`` /
  ``output_adapter``, ``leave_out``, a reduction factor (one for every layer), a number as
  ``scaling``; the non-linearities ``relu``, ``gelu``, ``swish``/``silu``, ``tanh``, ``linear``.
  Dropout, stochastic depth and the init options act only in training and are not kept.
- Heads: ``classification`` and ``multilabel_classification`` (two layers on the first token:
  BERT's pooler copy and classifier, or RoBERTa's / ELECTRA's classifier itself,
  :mod:`adaptune.interop.adapterhub_heads`; one layer on the model's pooler: the classifier),
  ``tagging`` (one layer: a token classifier), and the static heads of ``BertFor...`` models.

Anything else (Compacter's PHM layers, gating, the adapters' own layer norms, invertible adapters,
learned scaling, other heads, another family) is refused with a message that names the option.
AdapterHub keeps no per-task layer norms and no fingerprint of the base weights: an imported
adapter uses the base's layer norms, and only the base's type and width can be checked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from adaptune.core.architectures import layer_list, spec_for
from adaptune.core.config import AdapterConfig
from adaptune.core.io import CONFIG, few, fill_adapter
from adaptune.errors import AdapterFileError, AdaptuneError
from adaptune.interop.adapterhub_heads import model_head_tensors

WEIGHTS_BIN, WEIGHTS_SAFE = "pytorch_adapter.bin", "adapter.safetensors"
HEAD_CONFIG, HEAD_BIN, HEAD_SAFE = "head_config.json", "pytorch_model_head.bin", "model_head.safetensors"
FAMILIES = ("bert", "roberta", "xlm-roberta", "electra")  # encoder.layer.i.{attention.output,output}
LOCATIONS = {"attn": "attention.output", "ffn": "output"}
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "swish": "silu", "silu": "silu", "tanh": "tanh", "linear": "identity"}
_KEY = re.compile(
    r"^(?:.*\.)?encoder\.layer\.(\d+)\.(attention\.output|output)\.adapters\.([^.]+)\."
    r"(adapter_down\.0|adapter_up)\.(weight|bias)$"
)
# option -> the value adaptune can express (anything else is refused by name)
_MUST_BE = {
    "phm_layer": False,
    "use_gating": False,
    "ln_before": False,
    "ln_after": False,
    "inv_adapter": None,
    "cross_adapter": False,
    "original_ln_after": True,
}


@dataclass
class ForeignAdapter:
    """An AdapterHub folder, read and translated: adaptune's config and tensor names."""

    name: str
    model_type: str | None
    hidden_size: int | None
    config: AdapterConfig
    tensors: dict[str, torch.Tensor]  # AdapterSet keys: adapters.{i}.{slot}.{down,up}.{weight,bias}
    head: str | None = None  # "classification", "multi-label" or "token"; None: no head saved
    head_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # head.* and pooler.* keys
    labels: list[str] | None = None
    version: str | None = None
    head_activation: str = "tanh"  # of a two-layer head's first layer

    @property
    def num_labels(self) -> int | None:
        """The head's output width (its last linear layer's rows), None without a head."""
        last = self.head_tensors.get(
            "head.classifier.weight", self.head_tensors.get("head.classifier.out_proj.weight")
        )
        return None if last is None else last.shape[0]


def is_adapterhub_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an AdapterHub adapter (its ``adapter_config.json`` has AdapterHub's
    keys: the adapter's options under ``"config"``, no adaptune ``"format"``)."""
    meta = _json(Path(path) / CONFIG, quiet=True)
    return isinstance(meta, dict) and "format" not in meta and isinstance(meta.get("config"), dict)


def read_adapterhub(path: str | os.PathLike, num_layers: int) -> ForeignAdapter:
    """Read and translate an AdapterHub folder for a base of ``num_layers`` layers.

    Raises:
        AdapterFileError: a missing or damaged file, or an option adaptune cannot express (named).
    """
    path = Path(path)
    meta = _json(path / CONFIG)
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise AdapterFileError(f'{path / CONFIG} is not an AdapterHub adapter config (no "config" object)')
    model_type, hidden = meta.get("model_type"), meta.get("hidden_size")
    if not isinstance(hidden, int):
        raise AdapterFileError(f"{path / CONFIG} has no integer hidden_size; it is damaged")
    tensors = _weights(path, WEIGHTS_SAFE, WEIGHTS_BIN)
    name, adapters = _bottlenecks(tensors, path)
    config = _translate(meta["config"], hidden, num_layers, adapters, path)
    out = ForeignAdapter(
        str(meta.get("name") or name), model_type, hidden, config, adapters, version=meta.get("version")
    )
    if (path / HEAD_CONFIG).is_file():
        _read_head(path, out)
    return out


def _json(file: Path, quiet: bool = False) -> Any:
    if not file.is_file():
        if quiet:
            return None
        raise AdapterFileError(f"{file.parent} has no {file.name}; it is not an AdapterHub adapter folder")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if quiet:
            return None
        raise AdapterFileError(f"{file} is not valid JSON ({e}); the file is damaged") from None


def _weights(path: Path, safe: str, pickled: str) -> dict[str, torch.Tensor]:
    """The tensors of ``safe`` (preferred) or ``pickled``; nothing but tensors is unpickled."""
    if (path / safe).is_file():
        try:
            return load_file(str(path / safe), device="cpu")
        except Exception as e:  # safetensors' own error type for damaged headers
            raise AdapterFileError(f"{path / safe} cannot be read ({str(e).splitlines()[0]}); it is damaged") from None
    if not (path / pickled).is_file():
        raise AdapterFileError(f"{path} has neither {safe} nor {pickled}; the adapter's weights are missing")
    try:
        data = torch.load(path / pickled, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "not a tensor file"
        raise AdapterFileError(
            f"{path / pickled} holds more than tensors ({first[:120]}); refusing to unpickle it"
        ) from None
    except Exception as e:  # truncated zip, not a torch file
        raise AdapterFileError(
            f"{path / pickled} cannot be read ({str(e).splitlines()[0][:120]}); it is damaged"
        ) from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise AdapterFileError(
            f"{path / pickled} is not a dict of named tensors; it is not an AdapterHub weights file"
        )
    return data


def _bottlenecks(tensors: dict[str, torch.Tensor], path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """AdapterHub's bottleneck keys -> adaptune's, and the adapter's name in the file."""
    out, names = {}, set()
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterFileError(
                f"{path}: tensor {key!r} is not a bottleneck adapter weight of a BERT-like layer; "
                "only bottleneck adapters (double_seq_bn, seq_bn, par_bn) are read"
            )
        layer, loc, name, part, kind = m.groups()
        names.add(name)
        slot = "attn" if loc == "attention.output" else "ffn"
        out[f"adapters.{int(layer)}.{slot}.{'down' if part.startswith('adapter_down') else 'up'}.{kind}"] = value
    if len(names) != 1:
        raise AdapterFileError(f"{path}: the weights hold {len(names)} adapters ({sorted(names)}); expected one")
    return names.pop(), out


def _translate(c: dict, hidden: int, num_layers: int, tensors: dict, path: Path) -> AdapterConfig:
    """AdapterHub's BnConfig -> AdapterConfig, refusing options adaptune cannot express."""
    where = f"{path / CONFIG}"
    arch = c.get("architecture")
    if arch not in (None, "bottleneck"):
        raise AdapterFileError(
            f"{where}: architecture {arch!r} is not a bottleneck adapter; adaptune reads those only"
        )
    for key in ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity"):
        if key not in c:
            raise AdapterFileError(
                f"{where}: the adapter config has no {key!r}; it is damaged or not a bottleneck adapter"
            )
    for key, want in _MUST_BE.items():
        if key in c and c[key] != want:
            raise AdapterFileError(
                f"{where}: option {key}={c[key]!r} cannot be expressed in adaptune (needs {want!r})"
            )
    parallel, before = bool(c.get("is_parallel", False)), bool(c.get("original_ln_before", False))
    if parallel and before:
        raise AdapterFileError(
            f"{where}: option original_ln_before=true with is_parallel cannot be expressed in adaptune"
        )
    if before and c.get("residual_before_ln", True) is not True:
        raise AdapterFileError(
            f"{where}: option residual_before_ln={c.get('residual_before_ln')!r} cannot be expressed in adaptune "
            "(Pfeiffer's placement adds the adapter to the sub-layer's output: residual_before_ln=true)"
        )
    if c.get("residual_before_ln", True) == "post_add":
        raise AdapterFileError(f"{where}: option residual_before_ln='post_add' cannot be expressed in adaptune")
    scale = c.get("scaling", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise AdapterFileError(f"{where}: option scaling={scale!r} (a learned scale) cannot be expressed in adaptune")
    act = str(c["non_linearity"]).lower()
    if act not in ACTIVATIONS:
        raise AdapterFileError(
            f"{where}: non_linearity {c['non_linearity']!r} is not supported; adaptune reads {sorted(ACTIVATIONS)}"
        )
    slots = tuple(s for s, on in (("attn", c["mh_adapter"]), ("ffn", c["output_adapter"])) if on)
    if not slots:
        raise AdapterFileError(f"{where}: mh_adapter and output_adapter are both false: the adapter has no modules")
    leave_out = c.get("leave_out") or []
    layers = [i for i in range(num_layers) if i not in leave_out]
    size = _size(c["reduction_factor"], hidden, layers, where)
    try:
        config = AdapterConfig(
            size=size,
            slots=slots,
            mode="parallel" if parallel else "sequential",
            norm_before=before,
            nonlinearity=ACTIVATIONS[act],
            scale=float(scale),
            zero_init_up=c.get("init_weights") == "mam_adapter",
            init_std=1e-2 if c.get("init_weights") == "houlsby" else 2e-2,
            layers=None if len(layers) == num_layers else tuple(layers),
            train_layer_norms=False,
            train_embedding_norm=False,
            train_head=False,
            train_pooler=False,
        )
    except AdaptuneError as e:
        raise AdapterFileError(f"{where}: {e}") from None
    expected = {
        f"adapters.{i}.{s}.{p}.{w}" for i in layers for s in slots for p in ("down", "up") for w in ("weight", "bias")
    }
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise AdapterFileError(
            f"{path}: the weights do not match the config (missing {few(missing) or 'none'}; "
            f"unexpected {few(extra) or 'none'})"
        )
    return config


def _size(rf: Any, hidden: int, layers: list[int], where: str) -> int:
    """The bottleneck size AdapterHub derives from a reduction factor (one for every layer)."""
    if isinstance(rf, dict):
        values = {rf.get(str(i), rf.get("default")) for i in layers}
        if len(values) != 1 or None in values:
            raise AdapterFileError(
                f"{where}: option reduction_factor={rf!r} (sizes per layer) cannot be expressed in adaptune"
            )
        rf = values.pop()
    if isinstance(rf, bool) or not isinstance(rf, (int, float)) or rf <= 0:
        raise AdapterFileError(f"{where}: reduction_factor {rf!r} is not a positive number")
    return max(1, int(hidden // rf))


def _read_head(path: Path, out: ForeignAdapter) -> None:
    """The prediction head saved beside the adapter, as adaptune head (and pooler) tensors."""
    meta = _json(path / HEAD_CONFIG)
    if not isinstance(meta, dict):
        raise AdapterFileError(f"{path / HEAD_CONFIG} must hold a JSON object")
    tensors = _weights(path, HEAD_SAFE, HEAD_BIN)
    cfg = meta.get("config")
    if cfg is None:  # a static head: the transformers model's own classifier
        cls = str(meta.get("model_class") or "")
        kind = "token" if cls.endswith("ForTokenClassification") else "classification"
        if not cls.endswith(("ForSequenceClassification", "ForTokenClassification")):
            raise AdapterFileError(
                f"{path / HEAD_CONFIG}: the head of a {cls or 'unknown'} model is not read by adaptune"
            )
        linear = {"classifier.weight", "classifier.bias"}  # BERT's; RoBERTa's: classifier.dense/.out_proj
        dense = {f"classifier.{m}.{k}" for m in ("dense", "out_proj") for k in ("weight", "bias")}
        if set(tensors) not in (linear, dense):
            raise AdapterFileError(f"{path}: the static head holds {few(sorted(tensors))}; expected {sorted(linear)}")
        out.head, out.head_tensors = kind, {f"head.{k}": v for k, v in tensors.items()}
        out.labels = _labels(meta.get("label2id"), out.num_labels)
        return
    if not isinstance(cfg, dict):
        raise AdapterFileError(f'{path / HEAD_CONFIG}: "config" must be an object or null')
    kinds = {"classification": "classification", "multilabel_classification": "multi-label", "tagging": "token"}
    head_type = cfg.get("head_type")
    if head_type not in kinds:
        raise AdapterFileError(
            f"{path / HEAD_CONFIG}: head_type {head_type!r} is not read by adaptune; it reads {sorted(kinds)} "
            "(load the adapter without its head: with_head=False)"
        )
    layers, pooler = cfg.get("layers", 2), bool(cfg.get("use_pooler", False))
    act = str(cfg.get("activation_function", "tanh")).lower()
    if cfg.get("bias", True) is not True:
        raise AdapterFileError(
            f"{path / HEAD_CONFIG}: option bias={cfg.get('bias')!r} cannot be expressed in adaptune"
        )
    if head_type != "tagging" and (layers, pooler) == (2, False) and act in ("tanh", "gelu"):
        mapping = {"1": "pooler.pooler.dense", "4": "head.classifier"}  # first token -> dense -> tanh -> classifier
    elif layers == 1 and (pooler or head_type == "tagging"):
        mapping = {"1": "head.classifier"}
    else:
        raise AdapterFileError(
            f"{path / HEAD_CONFIG}: a {head_type} head with layers={layers}, use_pooler={pooler}, "
            f"activation_function={act!r} cannot be expressed in adaptune (it reads two layers with tanh or gelu "
            "on the first token, or one layer on the pooler)"
        )
    prefix = f"heads.{meta.get('name') or out.name}."
    heads = {}
    for key, value in tensors.items():
        layer, _, kind = key.removeprefix(prefix).partition(".")
        if not key.startswith(prefix) or layer not in mapping or kind not in ("weight", "bias"):
            raise AdapterFileError(f"{path}: unexpected head tensor {key!r} for a {layers}-layer {head_type} head")
        heads[f"{mapping[layer]}.{kind}"] = value
    if len(heads) != 2 * len(mapping):
        raise AdapterFileError(f"{path}: the head's weights are incomplete ({few(sorted(tensors))})")
    out.head, out.head_tensors, out.head_activation = kinds[head_type], heads, act
    out.labels = _labels(cfg.get("label2id"), heads["head.classifier.weight"].shape[0])


def _labels(label2id: Any, n: int) -> list[str] | None:
    if not isinstance(label2id, dict) or sorted(label2id.values()) != list(range(n)):
        return None
    return [name for name, _ in sorted(label2id.items(), key=lambda kv: kv[1])]


def load_adapterhub(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    name: str | None = None,
    activate: bool = True,
    with_head: bool = True,
) -> str:
    """Load an AdapterHub adapter folder onto ``model`` as a new adaptune adapter.

    Args:
        model: the base it was trained on (a BERT-like model; for the head, a ``...ForSequenceClassification``
            or ``...ForTokenClassification`` model).
        path: the folder ``save_adapter`` of AdapterHub's ``adapters`` wrote.
        name: its name on the model (default: the saved name).
        with_head: also load the prediction head saved beside it (when there is one).

    Returns:
        The adapter's name on the model.

    Raises:
        AdapterFileError: a damaged folder, an option adaptune cannot express, or another base.
    """
    path = Path(path)
    family = getattr(model.config, "model_type", None)
    if family not in FAMILIES:
        raise AdapterFileError(f"AdapterHub folders are read for {', '.join(FAMILIES)} models; this is {family!r}")
    foreign = read_adapterhub(path, len(layer_list(model, spec_for(model))))
    if foreign.model_type not in (None, family) or foreign.hidden_size != model.config.hidden_size:
        raise AdapterFileError(
            f"{path} was saved for a {foreign.model_type} model of width {foreign.hidden_size}; this model is a "
            f"{family} of width {model.config.hidden_size}: load it on the base it was trained on"
        )
    head = foreign.head if with_head else None
    heads = model_head_tensors(model, foreign, path) if head is not None else {}
    pooler = any(k.startswith("pooler.") for k in heads)
    config = dataclasses.replace(foreign.config, train_head=head is not None, train_pooler=pooler)
    name = name or foreign.name
    tensors = {**foreign.tensors, **heads}
    fill_adapter(model, name, config, tensors, str(path), activate)
    return name
