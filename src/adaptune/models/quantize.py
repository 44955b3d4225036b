"""A quantised frozen base: the frozen linear layers' weights kept in int8 (or int4), while the
adapters, norms and head train in full precision.

``torchao``'s weight-only quantisation (``quantize_`` with ``Int8WeightOnlyConfig``) replaces each
chosen ``nn.Linear``'s weight by a quantised tensor subclass; its matrix products still pass the
gradient to their input, so the adapters below a quantised layer train (checked in the suite).
Only frozen ``nn.Linear`` layers of the base are quantised: never the adapters or task copies
(``model.adaptune``), nor a layer whose weight is shared with the input embeddings (a tied output
layer of a language model). A frozen input embedding becomes int8 rows with a scale per row
(:class:`Int8Embedding`, also under ``int4``), and an output layer tied to it reads the same table
(:class:`Int8TiedHead`).

Autograd would keep, for each quantised layer, the full-precision copy of its weight that the
product dequantises (the input gradient needs the weight): no memory saved. So the quantised layers
become :class:`FrozenQuantizedLinear`, whose product keeps the quantised weight itself and
dequantises it again in the backward pass, one layer at a time.

The base's fingerprint is taken before quantising and kept on the model, so an adapter trained on
a quantised base records the full base's fingerprint and loads on it, and back.
"""

from __future__ import annotations

import torch
from torch import nn

from adaptune.core.io import fingerprint
from adaptune.errors import ConfigError

QUANTIZE = ("none", "int8", "int4")


def quantize_base(model: nn.Module, kind: str) -> int:
    """Quantise ``model``'s frozen linear layers in place (``kind``: int8 or int4); how many."""
    if kind == "none":
        return 0
    if kind not in QUANTIZE:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE)}, got {kind!r}")
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise ConfigError("--quantize needs torchao: pip install torchao") from None
    model.adaptune_base_fingerprint = fingerprint(model)  # of the full-precision weights
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = embedding.weight if embedding is not None else None
    chosen = set()

    def frozen_linear(module: nn.Module, fqn: str) -> bool:
        take = (
            type(module) is nn.Linear
            and not module.weight.requires_grad
            and not fqn.startswith("adaptune.")
            and module.weight is not tied
        )
        if take:
            chosen.add(fqn)
        return take

    config = Int8WeightOnlyConfig() if kind == "int8" else Int4WeightOnlyConfig()
    try:
        quantize_(model, config, filter_fn=frozen_linear)
    except Exception as e:  # e.g. int4 kernels this CPU or torch build lacks
        raise ConfigError(f"--quantize {kind} does not run here ({str(e).splitlines()[0][:160]}); try int8") from None
    for name in chosen:
        model.get_submodule(name).__class__ = FrozenQuantizedLinear
    model.adaptune_quantized = kind
    replaced = len(chosen) + _quantize_embedding(model, embedding)
    _own_memory(model)
    return replaced


@torch.no_grad()
def _own_memory(model: nn.Module) -> None:
    """Copy the float tensors that stay (norms, biases, adapters) into memory of their own. A base
    read from safetensors holds views of the memory-mapped file; while any of them lives, the whole
    file stays mapped, and the pages quantising read stay resident (SmolLM2: 513 MiB beside
    147 MiB of int8 weights)."""
    copies: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is None or type(t.data) is not torch.Tensor:  # a quantised tensor is new memory already
                    continue
                if id(t) not in copies:
                    copies[id(t)] = t.data.clone()
                fresh = copies[id(t)]
                if isinstance(t, nn.Parameter):
                    t.data = fresh
                else:
                    table[key] = fresh


def _quantize_embedding(model: nn.Module, embedding: nn.Module | None) -> int:
    """Quantise a frozen input embedding to int8 rows (a language model's largest matrix: SmolLM2's
    49152 × 576 is a fifth of its weights) and an output layer tied to it: both then read one int8
    table. How many modules it replaced (0 when the embedding trains or is not a plain one)."""
    if type(embedding) is not nn.Embedding or embedding.weight.requires_grad:
        return 0
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    tied = type(head) is nn.Linear and head.weight is embedding.weight
    if tied and head.bias is not None and head.bias.requires_grad:
        return 0  # a trained bias of the output layer: keep the layer as it is
    table = Int8Embedding(embedding.weight, embedding.padding_idx)
    model.set_input_embeddings(table)
    if tied:
        model.set_output_embeddings(Int8TiedHead(table, head.bias))
        # the two already share one table: transformers' tie_weights() has no float weights to tie
        model._tied_weights_keys = model.all_tied_weights_keys = {}
    return 1 + tied


class Int8Embedding(nn.Module):
    """A frozen embedding table kept as int8 rows with one scale per row (symmetric: the row's
    largest magnitude maps to 127). A lookup dequantises only the rows it reads."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None):
        super().__init__()
        w = weight.detach()
        scale = w.float().abs().amax(1).clamp_min(1e-12) / 127  # fp32, whatever the weight's type
        self.register_buffer("qweight", torch.round(w.float() / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        # the type of the values it hands out: an empty float buffer, so model.to(dtype) moves it
        self.register_buffer("out_type", torch.empty(0, dtype=w.dtype))
        self.num_embeddings, self.embedding_dim = w.shape
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids)

    def __getattr__(self, name: str):
        if name == "weight":  # what transformers' resize or a caller would reach for
            raise AttributeError(
                "an int8 embedding (quantize_base) has no float weight: resize or edit the embedding before "
                "quantising; .dequantize() gives a float copy"
            )
        return super().__getattr__(name)

    def rows(self, index) -> torch.Tensor:
        """Rows ``index`` (token ids, or a slice) of the table, dequantised."""
        return (self.qweight[index].float() * self.scale[index, None]).to(self.out_type.dtype)

    def dequantize(self) -> torch.Tensor:
        """The whole table in the embedding's float type."""
        return self.rows(slice(None))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


class Int8TiedHead(nn.Module):
    """An output layer tied to an :class:`Int8Embedding`: logits from the same int8 table. The table
    is referenced, not registered, so it is stored and moved once, with the embedding."""

    def __init__(self, table: Int8Embedding, bias: torch.Tensor | None = None):
        super().__init__()
        self._table = (table,)  # a tuple: not a submodule
        self.bias = bias
        self.in_features, self.out_features = table.embedding_dim, table.num_embeddings

    def dequantize(self) -> torch.Tensor:
        return self._table[0].dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits a block of the vocabulary at a time: no float copy of the whole table (a generated
        token would otherwise dequantise all of it)."""
        table, step = self._table[0], 8192
        parts = [
            nn.functional.linear(x, table.rows(slice(lo, lo + step)).to(x.dtype))
            for lo in range(0, self.out_features, step)
        ]
        logits = torch.cat(parts, -1)
        return logits if self.bias is None else logits + self.bias.to(logits.dtype)


def dense_head(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An output layer's weight as a plain (dequantised) tensor, and its bias: for a product computed
    outside the layer (the chunked language-model loss)."""
    if isinstance(head, Int8TiedHead):
        return head.dequantize(), head.bias
    if isinstance(head, FrozenQuantizedLinear):
        return head.weight.dequantize(), head.bias
    return head.weight, head.bias


class _FrozenProduct(torch.autograd.Function):
    """``x @ weightᵀ + bias`` for a frozen quantised weight: keeps the quantised weight (not a
    dequantised copy) for the input's gradient, dequantised again in the backward pass."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight.dequantize().to(grad.dtype), None, None


class FrozenQuantizedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is a frozen quantised tensor (:func:`quantize_base` swaps the
    class of the layers it quantises; no new module, so routed forwards and names stay)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenProduct.apply(x, self.weight, self.bias)
        return nn.functional.linear(x, self.weight, self.bias)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, looking inside tensor subclasses (a quantised weight's int8 data and
    scales, not the float32 it stands for)."""
    if isinstance(t, nn.Parameter):
        t = t.data
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (a tied weight once)."""
    return sum(tensor_bytes(t) for t in [*model.parameters(), *model.buffers()])
