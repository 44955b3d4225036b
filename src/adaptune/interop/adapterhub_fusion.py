"""Read an AdapterFusion saved by AdapterHub's ``save_adapter_fusion`` (``adapter_fusion_config.json``,
``pytorch_model_adapter_fusion.bin`` or ``model_adapter_fusion.safetensors``, and optionally its
head) onto a model that carries the fused adapters under AdapterHub's names
(:func:`adaptune.interop.adapterhub.load_adapterhub` each first).

AdapterHub's ``dynamic`` fusion is adaptune's (:mod:`adaptune.core.fusion`): query, key and value
layers, the query read after the adapters' own pre-processing, the result added to the adapters'
residual. The ``static`` fusion (no value layer), a temperature, a residual added before the value
layer or a value applied after the softmax are refused by name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from torch import nn

from adaptune.core.config import AdapterConfig
from adaptune.core.inject import fusion_config, get_container
from adaptune.core.io import fill_adapter
from adaptune.errors import AdapterFileError, AdaptuneError
from adaptune.interop.adapterhub import ForeignAdapter, _json, _read_head, _weights
from adaptune.interop.adapterhub_heads import model_head_tensors

FUSION_CONFIG, FUSION_BIN, FUSION_SAFE = (
    "adapter_fusion_config.json",
    "pytorch_model_adapter_fusion.bin",
    "model_adapter_fusion.safetensors",
)
_MUST_BE = {
    "key": True,
    "query": True,
    "value": True,
    "query_before_ln": False,
    "residual_before": False,
    "temperature": False,
    "value_before_softmax": True,
}
_KEY = re.compile(
    r"^(?:.*\.)?encoder\.layer\.(\d+)\.(attention\.output|output)\.adapter_fusion_layer\.([^.]+)\."
    r"(query|key|value)\.(weight|bias)$"
)


def load_adapterhub_fusion(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    name: str | None = None,
    activate: bool = True,
    with_head: bool = True,
) -> str:
    """Load an AdapterHub fusion folder as an adaptune fusion of the adapters it names.

    Raises:
        AdapterFileError: a damaged folder, an option adaptune cannot express (named), or fused
            adapters missing from the model.
    """
    path = Path(path)
    meta = _json(path / FUSION_CONFIG)
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or not meta.get("adapter_names"):
        raise AdapterFileError(f"{path / FUSION_CONFIG} is not an AdapterHub fusion config")
    for key, want in _MUST_BE.items():
        if meta["config"].get(key, want) != want:
            raise AdapterFileError(
                f"{path / FUSION_CONFIG}: option {key}={meta['config'][key]!r} cannot be expressed in adaptune "
                f"(it reads AdapterHub's dynamic fusion: {key}={want!r})"
            )
    names = [str(n) for n in meta["adapter_names"]]
    container = get_container(model)
    missing = [n for n in names if container is None or n not in container.sets]
    if missing:
        raise AdapterFileError(f"{path} fuses adapters {missing}, which this model does not have; load them first")
    tensors = {}
    for key, value in _weights(path, FUSION_SAFE, FUSION_BIN).items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterFileError(f"{path}: tensor {key!r} is not a fusion weight of a BERT-like layer")
        layer, loc, _, part, kind = m.groups()
        tensors[f"fusion.{int(layer)}.{'attn' if loc == 'attention.output' else 'ffn'}.{part}.{kind}"] = value
    head = None
    if with_head and (path / "head_config.json").is_file():
        head = ForeignAdapter(str(meta.get("name")), None, None, AdapterConfig(), {})
        _read_head(path, head)
        tensors.update(model_head_tensors(model, head, path))
    pooler = any(k.startswith("pooler.") for k in tensors)
    config = AdapterConfig(
        train_layer_norms=False, train_embedding_norm=False, train_head=head is not None, train_pooler=pooler
    )
    name = name or "fusion_" + "_".join(re.sub(r"[^A-Za-z0-9_-]", "_", n) for n in names)
    try:
        config = fusion_config(model, names, config)
    except AdaptuneError as e:
        raise AdapterFileError(f"{path}: {e}") from None
    fill_adapter(model, name, config, tensors, str(path), activate)
    return name
