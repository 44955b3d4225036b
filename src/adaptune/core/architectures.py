"""Where each model family keeps the modules adapters attach to — as data.

Every path is relative to ``model.base_model`` (the backbone without its task head), and inside a
layer relative to the layer. One generic mechanism in ``inject.py`` reads these rows; adding a
family means adding a row and a tiny test, never a copy of a Hugging Face ``forward``.

Per sub-layer slot (``attn``, ``ffn``) a row names:
- ``output``: the module whose output a sequential adapter transforms. Where the family applies a
  dropout right after the output projection, that dropout (the released code runs
  ``dense → dropout → adapter → layer_norm(x + residual)``); else the projection itself.
- ``input``: the module whose input is the sub-layer's input (read by parallel adapters).
- ``norm``: the layer norm that belongs to that sub-layer (trained per task in the paper).

For a model of another family, build an :class:`ArchSpec` yourself and pass it as ``arch=``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adaptune.errors import ArchitectureError


@dataclass(frozen=True)
class SlotSpec:
    """Module paths of one sub-layer, relative to a Transformer layer."""

    output: str
    input: str
    norm: str


@dataclass(frozen=True)
class ArchSpec:
    """Placement table of one model family.

    Args:
        layers: path of the ``nn.ModuleList`` of Transformer layers, relative to the backbone.
        attn: paths of the attention sub-layer.
        ffn: paths of the feed-forward sub-layer.
        extra_norms: layer norms outside the layers (embedding norm, final norm).
        post: modules between the top layer and the head that every model of the family has (a
            final norm); top-k trains them.
        pooler: the pooler between the top layer's first token and the head (BERT's dense + tanh),
            for families whose classifiers read it. Optional on the loaded model: a family's
            sequence classifier may be built without one (RoBERTa, XLM-R, ELECTRA and MPNet put
            their own dense layer into the head), and a bare-encoder checkpoint may or may not
            carry its weights. :func:`pooler_module` finds it or says there is none.
        post_norm: each slot's ``norm`` runs after the residual add (``norm(x + sublayer(x))``,
            BERT-like); False for pre-norm families (GPT-2, LLaMA). Adapters that read the
            normed sum (``norm_before``, Pfeiffer's placement) need it.

    Example (a custom model whose layers live at ``blocks``)::

        ArchSpec(layers="blocks",
                 attn=SlotSpec(output="attn.proj", input="attn", norm="norm1"),
                 ffn=SlotSpec(output="mlp.fc2", input="mlp", norm="norm2"))
    """

    layers: str
    attn: SlotSpec
    ffn: SlotSpec
    extra_norms: tuple[str, ...] = ()
    post: tuple[str, ...] = ()
    pooler: str | None = None
    post_norm: bool = True

    def slot(self, name: str) -> SlotSpec:
        return {"attn": self.attn, "ffn": self.ffn}[name]


_BERT_LIKE = ArchSpec(
    layers="encoder.layer",
    attn=SlotSpec(output="attention.output.dropout", input="attention", norm="attention.output.LayerNorm"),
    ffn=SlotSpec(output="output.dropout", input="intermediate", norm="output.LayerNorm"),
    extra_norms=("embeddings.LayerNorm",),
    pooler="pooler",
)

_LLAMA_LIKE = ArchSpec(
    layers="layers",
    attn=SlotSpec(output="self_attn.o_proj", input="self_attn", norm="input_layernorm"),
    ffn=SlotSpec(output="mlp.down_proj", input="mlp", norm="post_attention_layernorm"),
    extra_norms=("norm",),
    post=("norm",),
    post_norm=False,
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "mpnet": ArchSpec(
        layers="encoder.layer",
        attn=SlotSpec(output="attention.dropout", input="attention", norm="attention.LayerNorm"),
        ffn=SlotSpec(output="output.dropout", input="intermediate", norm="output.LayerNorm"),
        extra_norms=("embeddings.LayerNorm",),
        pooler="pooler",
    ),
    "distilbert": ArchSpec(
        layers="transformer.layer",
        attn=SlotSpec(output="attention.out_lin", input="attention", norm="sa_layer_norm"),
        ffn=SlotSpec(output="ffn.dropout", input="ffn", norm="output_layer_norm"),
        extra_norms=("embeddings.LayerNorm",),
    ),
    # GPT-2 is pre-LN: ln_1 / ln_2 sit before their sub-layer; the adapter still goes on the
    # sub-layer's output, before the residual add.
    "gpt2": ArchSpec(
        layers="h",
        attn=SlotSpec(output="attn.resid_dropout", input="attn", norm="ln_1"),
        ffn=SlotSpec(output="mlp.dropout", input="mlp", norm="ln_2"),
        extra_norms=("ln_f",),
        post=("ln_f",),
        post_norm=False,
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
}


def get_submodule(root: nn.Module, path: str, what: str) -> nn.Module:
    """``root.get_submodule(path)`` with an error that names the path and what it was meant to be."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise ArchitectureError(
            f"{type(root).__name__} has no module at {path!r} (expected the {what}); "
            "the placement table does not fit this model: pass a corrected ArchSpec as arch="
        ) from None


def spec_for(model: nn.Module, arch: ArchSpec | None = None) -> ArchSpec:
    """The placement table row for ``model`` (or ``arch`` when given).

    Raises:
        ArchitectureError: the model's family has no row and no ``arch`` was passed.
    """
    if arch is not None:
        return arch
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ArchitectureError(
            f"model type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}. "
            "For another model, pass arch=ArchSpec(layers=..., attn=SlotSpec(...), ffn=SlotSpec(...))"
        )
    return ARCHITECTURES[model_type]


def backbone(model: nn.Module) -> nn.Module:
    """The model without its task head (``model.base_model`` for Hugging Face models)."""
    return getattr(model, "base_model", model)


def layer_list(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    layers = get_submodule(backbone(model), spec.layers, "list of Transformer layers")
    if not isinstance(layers, nn.ModuleList):
        raise ArchitectureError(f"{spec.layers!r} is a {type(layers).__name__}, not the ModuleList of layers")
    return layers


def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The task head: top-level children of the model, outside the backbone, that hold parameters.

    Structural: for ``BertForSequenceClassification`` this is ``classifier``, for DistilBERT
    ``pre_classifier`` and ``classifier``, for ``LlamaForSequenceClassification`` ``score``. A
    language model's output embedding (``lm_head``, often tied to the input embedding) is pretrained
    vocabulary, not a task head: it is never copied per task nor trained by ``top-k``/``layernorm``.
    """
    base = backbone(model)
    if base is model:
        return {}
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    return {
        name: child
        for name, child in model.named_children()
        if child is not base and child is not out_emb and name != "adaptune" and any(True for _ in child.parameters())
    }


def pooler_module(model: nn.Module, spec: ArchSpec) -> nn.Module | None:
    """The model's pooler (``spec.pooler``), or None when the family has none or this model was built
    without it (``add_pooling_layer=False``, as RoBERTa-style sequence classifiers are)."""
    if spec.pooler is None:
        return None
    try:
        module = backbone(model).get_submodule(spec.pooler)
    except AttributeError:  # this model was built without it
        return None
    return module if any(True for _ in module.parameters()) else None


def modules_above_layers(model: nn.Module, spec: ArchSpec) -> list[nn.Module]:
    """The modules between the top layer and the head: ``spec.post`` and the pooler where the model
    has one (:func:`pooler_module`)."""
    post = [get_submodule(backbone(model), p, "post-layer module") for p in spec.post]
    pooler = pooler_module(model, spec)
    return post + ([pooler] if pooler is not None else [])


def input_norm_paths(spec: ArchSpec) -> list[str]:
    """The norms outside the layers that sit before the first one (``extra_norms`` not in ``post``),
    e.g. BERT's ``embeddings.LayerNorm``; LLaMA's and GPT-2's final norms are not among them."""
    return [p for p in spec.extra_norms if p not in spec.post]


def norm_paths(model: nn.Module, spec: ArchSpec, input_norms: bool = True) -> list[str]:
    """Paths (relative to the backbone) of every layer norm the spec names, in model order.

    ``input_norms=False`` leaves out the norms before the first layer (:func:`input_norm_paths`).
    """
    n = len(layer_list(model, spec))
    paths = [f"{spec.layers}.{i}.{spec.slot(s).norm}" for i in range(n) for s in ("attn", "ffn")]
    skip = set() if input_norms else set(input_norm_paths(spec))
    paths += [p for p in spec.extra_norms if p not in paths and p not in skip]
    for p in paths:
        get_submodule(backbone(model), p, "layer norm")
    return paths


def model_identity(model: nn.Module, spec: ArchSpec) -> dict[str, object]:
    """Model type, hidden size and depth, as stamped into adapter files."""
    cfg = getattr(model, "config", None)
    hidden = None
    for attr in ("hidden_size", "n_embd", "dim", "d_model"):
        if cfg is not None and isinstance(getattr(cfg, attr, None), int):
            hidden = getattr(cfg, attr)
            break
    return {
        "model_type": getattr(cfg, "model_type", type(model).__name__),
        "hidden_size": hidden,
        "num_layers": len(layer_list(model, spec)),
    }


__all__ = [
    "ArchSpec",
    "SlotSpec",
    "ARCHITECTURES",
    "spec_for",
    "backbone",
    "head_modules",
    "input_norm_paths",
    "layer_list",
    "norm_paths",
    "modules_above_layers",
    "pooler_module",
]
