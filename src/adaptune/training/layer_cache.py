"""Frozen lower layers: run them without dropout, and compute their outputs once (issue 5).

Houlsby et al. 2019 (§3.6, Figure 6) find that adapters in the lower layers matter least; with
adapters only in the top k of L layers (``--adapter-layers``), or with ``top-k`` fine-tuning,
nothing trains below the *cut* j, the lowest layer in which anything trains. The hidden state
entering layer j is then a function of the input ids alone — provided the frozen layers below
run without dropout. Two options follow, both stated in :class:`~adaptune.training.train.TrainConfig`:

- ``frozen_dropout=False``: the embeddings and layers < j run in eval mode (no dropout) while
  training. This changes the training (no noise below the cut), so it is never implicit.
- ``cache_frozen_layers=True`` (needs the above): the first time an example is seen, the hidden
  state entering layer j is kept (CPU, unpadded, ``T_i x d`` floats); when every example of a
  batch is kept, layers < j are skipped and layer j starts from the kept states. Epochs after
  the first then cost about what layers >= j (+ head) cost.

Results equal recomputing up to float rounding: the kept state of an example is what its lower
layers gave it in the batch it was first seen in; recomputed in another batch (another padded
length) the same numbers can differ in the last bits. Padded positions start layer j at zero
instead of their recomputed values: with right padding their keys are masked, so no real
position and no loss term reads them, and their gradient is exactly zero.
The kept states are not part of a checkpoint: a resumed run (``--resume``) fills them again as
it goes, and then ends equal to the uninterrupted run up to float rounding, not bit for bit.

Generic over families: the cut comes from which parameters train (and the active adapter's
bottlenecks and layer-norm copies), the skip from passing the hidden state through layers < j,
and the model's own ``forward`` still builds the attention masks and position embeddings the
upper layers need. Requirements, checked with an error that says what to change: something
trains at or above the cut, nothing trains in the embeddings or below the cut (the per-task
layer-norm copies of the Houlsby adapter cover *every* layer: pass ``--no-train-layer-norms``),
the layers return their hidden state as one tensor, and batches are right-padded
(:func:`adaptune.data.collate`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from adaptune.core.architectures import ArchSpec, backbone, layer_list, model_identity, modules_above_layers, spec_for
from adaptune.errors import ArchitectureError, ConfigError
from adaptune.core.inject import get_container

DEFAULT_MAX_BYTES = 4 * 2**30  # the cache refuses to grow past this (4 GiB of CPU memory)


def find_cut(model: nn.Module, arch: ArchSpec | None = None) -> tuple[int, str]:
    """The lowest layer in which anything trains, and what trains there (or below it).

    Returns:
        ``(j, what)``: ``j`` is 0 when something in the embeddings or in layer 0 trains, and the
        layer count L when no layer trains (only the head or the modules above the layers).
    """
    container = get_container(model)
    spec = container.spec if container is not None else spec_for(model, arch)
    layers = layer_list(model, spec)
    base = backbone(model)
    layer_of = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    above = {id(p) for m in modules_above_layers(model, spec) for p in m.parameters()}
    cut, what = len(layers), "nothing"

    def lower(j: int, name: str) -> None:
        nonlocal cut, what
        if j < cut:
            cut, what = j, name

    for name, p in base.named_parameters():
        if not p.requires_grad or id(p) in above:
            continue
        lower(layer_of.get(id(p), 0), f"base parameter {name!r}")  # not in a layer: embeddings
    if container is not None:
        for task in container.active_names():
            aset = container.sets[task]
            for layer_id, slots in aset.adapters.items():
                if any(p.requires_grad for p in slots.parameters()):
                    lower(int(layer_id), f"adapter {task!r} bottlenecks of layer {layer_id}")
            for key, path in aset.norm_paths.items():
                if path in spec.post or not any(p.requires_grad for p in aset.norms[key].parameters()):
                    continue
                prefix = spec.layers + "."
                j = int(path[len(prefix) :].split(".")[0]) if path.startswith(prefix) else 0
                lower(j, f"adapter {task!r} layer-norm copy of {path!r}")
    return cut, what


def lower_modules(model: nn.Module, cut: int, arch: ArchSpec | None = None) -> list[nn.Module]:
    """The backbone's modules below the cut: layers < ``cut`` and the children (embeddings, rotary
    position embeddings) that hold no layer >= ``cut`` and no post-layer module."""
    container = get_container(model)
    spec = container.spec if container is not None else spec_for(model, arch)
    layers = layer_list(model, spec)
    base = backbone(model)
    upper = {id(m) for layer in layers[cut:] for m in layer.modules()}
    upper |= {id(m) for top in modules_above_layers(model, spec) for m in top.modules()}
    upper.add(id(layers))
    out = [c for c in base.children() if not any(id(m) in upper for m in c.modules())]
    return out + list(layers[:cut])


def _pass_through(hidden_states, *args, **kwargs):
    return hidden_states


class FrozenBelow:
    """Dropout off below the cut while training, and optionally the kept states of layer ``cut``.

    Args:
        model: the model, with its strategy applied (``requires_grad`` set).
        cache: keep the hidden state entering the cut layer per example and reuse it.
        lengths: token count of every training example (the cache's size estimate and row lengths).
        max_bytes: refuse to cache when the estimate of the kept states exceeds this.
        arch: placement table for a custom model family.

    Raises:
        ConfigError: with ``cache``, nothing to skip (something trains in the embeddings or layer 0),
            nothing trains in any layer, or the estimate exceeds ``max_bytes``.

    Example::

        frozen = FrozenBelow(model, cache=True, lengths=[len(e["input_ids"]) for e in train_enc])
        for idx in batches:                      # idx: the examples of the batch, in row order
            with frozen.step(idx):
                loss = training_step(model, collate([train_enc[i] for i in idx], pad_id), ...)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        cache: bool,
        lengths: Sequence[int],
        max_bytes: int = DEFAULT_MAX_BYTES,
        arch: ArchSpec | None = None,
    ) -> None:
        container = get_container(model)
        spec = container.spec if container is not None else spec_for(model, arch)
        self.layers = layer_list(model, spec)
        self.cut, what = find_cut(model, arch)
        self.lower = lower_modules(model, self.cut, arch)
        self.lengths = list(lengths)
        self.store: dict[int, torch.Tensor] = {}
        self.cache = cache
        self.hidden_size = model_identity(model, spec)["hidden_size"]
        self.bytes_needed = sum(self.lengths) * (self.hidden_size or 0) * 4  # fp32
        self._idx: list[int] | None = None
        self._reuse = False
        self._hook = None
        if not cache:
            return
        n = len(self.layers)
        if self.cut == 0:
            raise ConfigError(
                f"--cache-frozen-layers: nothing below the lowest trained layer to cache, because {what} trains. "
                "Train only top layers: --adapter-layers with the top layers and --no-train-layer-norms (the "
                "adapter's layer-norm copies cover every layer), or --strategy top-k"
            )
        if self.cut == n:
            raise ConfigError(
                f"--cache-frozen-layers needs something trained in a layer (layers 0-{n - 1}); "
                "with only the head training it is not supported"
            )
        if self.bytes_needed > max_bytes:
            raise ConfigError(
                f"--cache-frozen-layers would keep {self.bytes_needed / 2**30:.2f} GiB of hidden states "
                f"(limit {max_bytes / 2**30:.2f} GiB); use --limit-train or a lower --max-length, or train without "
                "the cache"
            )
        self._hook = self.layers[self.cut].register_forward_pre_hook(self._enter_cut, with_kwargs=True)

    def describe(self) -> str:
        what = f"layers 0-{self.cut - 1}" if self.cut > 0 else "no layer"
        note = f"{what} and the embeddings run without dropout (frozen below layer {self.cut})"
        if self.cache:
            note += f"; their output is kept after the first epoch ({self.bytes_needed / 2**20:.0f} MiB)"
        return note

    @contextlib.contextmanager
    def step(self, idx: Sequence[int]) -> Iterator[bool]:
        """Around one forward/backward of the training examples ``idx`` (in row order).

        Yields whether the kept states are reused (the lower layers skipped).
        """
        for m in self.lower:  # every step: evaluation's model.train() turns dropout back on
            m.eval()
        self._idx = list(idx)
        self._reuse = self.cache and all(i in self.store for i in self._idx)
        skipped = []
        if self._reuse:
            for layer in self.layers[: self.cut]:
                skipped.append((layer, layer.__dict__.get("forward")))
                layer.forward = _pass_through
        try:
            yield self._reuse
        finally:
            for layer, own in skipped:
                if own is None:
                    del layer.forward
                else:
                    layer.forward = own
            self._idx, self._reuse = None, False

    def _enter_cut(self, module, args, kwargs):
        """Forward pre-hook of the cut layer: keep its input rows, or replace it with the kept ones."""
        if self._idx is None or not self.cache:
            return None  # evaluation, or a forward outside step()
        h = args[0] if args else kwargs["hidden_states"]  # (B, T, d)
        if not isinstance(h, torch.Tensor) or h.shape[0] != len(self._idx):
            raise ArchitectureError(
                f"layer {self.cut} got {type(h).__name__} of shape {getattr(h, 'shape', None)} "
                f"as its hidden state; the layer cache expected ({len(self._idx)}, T, d)"
            )
        if not self._reuse:
            if h.requires_grad:
                raise ConfigError(
                    f"--cache-frozen-layers: the input of layer {self.cut} depends on trained parameters; "
                    "something below the cut trains (turn off what trains there, or the cache)"
                )
            for row, i in enumerate(self._idx):
                self.store[i] = h[row, : self.lengths[i]].detach().to("cpu", copy=True)  # (T_i, d), no padding
            return None
        if h.dim() != 3:  # the pass-through layers handed on the embeddings' output: must be (B, T, d)
            raise ArchitectureError(
                f"layers of {type(module).__name__} do not take a (B, T, d) hidden state; "
                "the layer cache cannot skip them"
            )
        kept = h.new_zeros(h.shape)  # padded positions start at zero: masked, never read
        for row, i in enumerate(self._idx):
            s = self.store[i]
            kept[row, : s.shape[0]] = s.to(h.device, h.dtype)
        return ((kept, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": kept})

    def remove(self) -> None:
        """Take the hook off the model and drop the kept states."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.store.clear()


__all__ = ["FrozenBelow", "find_cut", "lower_modules", "DEFAULT_MAX_BYTES"]
