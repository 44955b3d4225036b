"""A quantised frozen base: the frozen linear layers' weights kept in int8 (or int4), while the
adapters, norms and head train in full precision.

``torchao``'s weight-only quantisation (``quantize_`` with ``Int8WeightOnlyConfig``) replaces each
chosen ``nn.Linear``'s weight by a quantised tensor subclass; its matrix products still pass the
gradient to their input, so the adapters below a quantised layer train (checked in the suite).
Only frozen ``nn.Linear`` layers of the base are quantised: never the adapters or task copies
(``model.adaptune``), nor a layer whose weight is shared with the input embeddings (a tied output
layer of a language model).

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
    return len(chosen)


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
