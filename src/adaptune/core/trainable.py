"""Which parameters train, per strategy — chosen by module membership, never by name substrings.

The paper compares adapter tuning with full fine-tuning and with fine-tuning only the top layers
(§3.4, Figures 3-4), and reports training only the layer norms (§3.6). Each is a named strategy
here; the training loop is the same for all of them and differs only in this selection.

- ``adapters``: the active adapter's bottlenecks, plus its own layer-norm and head copies when its
  config has them (the paper trains adapters + layer norms + head); with per-row routing, every
  adapter the rows name.
- ``full``: every base and head parameter.
- ``top-k``: the top k Transformer layers, the modules above them (pooler / final norm) and the head.
- ``layernorm``: every layer norm of the base and the head.
- ``head``: the head only.

The pooler of BERT-style classifiers (dense + tanh on the first token, read by the classifier) is
part of the task head unless ``train_pooler=False``: adapters then train a per-task copy of it, and
``head`` / ``layernorm`` train it with the head. The paper's BERT kept its pooler, pretrained on
next-sentence prediction, frozen; sentence-embedding checkpoints never trained theirs, and through
a frozen untrained pooler the head sees an almost constant feature (docs/quality.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adaptune.core.architectures import (
    ArchSpec,
    backbone,
    get_submodule,
    head_modules,
    layer_list,
    modules_above_layers,
    norm_paths,
    pooler_module,
    spec_for,
)
from adaptune.errors import ConfigError
from adaptune.core.inject import get_container
from adaptune.core.stack import Stack

STRATEGIES = ("adapters", "full", "top-k", "layernorm", "head")


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of a model under a strategy.

    ``base`` counts the pretrained model with its head (what full fine-tuning trains), without
    any adapter; ``percent`` is trainable / base, the paper's "% trained parameters per task".
    """

    trainable: int
    base: int
    adapters: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.base if self.base else 0.0


def _unique(params):
    seen = set()
    for p in params:
        if id(p) not in seen:  # tied weights (e.g. lm_head / embeddings) count once
            seen.add(id(p))
            yield p


def _base_params(model: nn.Module):
    container = get_container(model)
    skip = set() if container is None else {id(p) for p in container.parameters()}
    return [p for p in _unique(model.parameters()) if id(p) not in skip]


def trainable_modules(
    model: nn.Module, strategy: str, *, k: int | None = None, arch: ArchSpec | None = None, train_pooler: bool = True
) -> list[nn.Module]:
    """The modules whose parameters train under ``strategy`` (see the module docstring)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    container = get_container(model)
    if strategy == "adapters":
        if container is None or not container.active_names():
            raise ConfigError(
                "strategy 'adapters' needs an active adapter: call add_adapter(model, name, config) first"
            )
        if isinstance(container.active, Stack) and container.active.train == "top":
            return [container.sets[container.active.top]]  # the adapters below stay frozen
        return [container.sets[n] for n in container.active_names()]  # several: per-row routing, a Stack
    if container is not None and container.active_names():
        raise ConfigError(
            f"strategy {strategy!r} trains the base model, but adapter {container.active!r} is active; "
            "call set_active(model, None) first"
        )
    heads = list(head_modules(model).values())
    if strategy == "full":
        return [m for m in model.children() if m is not container]
    spec = container.spec if container is not None else spec_for(model, arch)
    pooler = pooler_module(model, spec) if train_pooler else None
    task_head = heads + ([pooler] if pooler is not None else [])  # the pooler belongs to the task head
    if strategy == "head":
        if not heads:
            raise ConfigError(
                "strategy 'head' needs a model with a task head (e.g. AutoModelForSequenceClassification)"
            )
        return task_head
    base = backbone(model)
    if strategy == "layernorm":
        return [get_submodule(base, p, "layer norm") for p in norm_paths(model, spec)] + task_head
    layers = layer_list(model, spec)
    if k is None or not 1 <= k <= len(layers):
        raise ConfigError(f"strategy 'top-k' needs k between 1 and {len(layers)} (the model's layer count), got {k!r}")
    return list(layers[len(layers) - k :]) + modules_above_layers(model, spec) + heads


def train_strategy(
    model: nn.Module, strategy: str, *, k: int | None = None, arch: ArchSpec | None = None, train_pooler: bool = True
) -> ParamCount:
    """Freeze everything, then unfreeze exactly what ``strategy`` trains.

    Args:
        model: the model (with an active adapter for ``"adapters"``).
        strategy: one of ``adapters``, ``full``, ``top-k``, ``layernorm``, ``head``.
        k: number of top layers for ``top-k``.
        arch: placement table for a custom model family.
        train_pooler: with ``head`` and ``layernorm``, train the pooler with the head (top-k and
            full always train it; adapters follow their config's ``train_pooler``).

    Returns:
        The resulting :class:`ParamCount`.

    Raises:
        ConfigError: unknown strategy, missing k, or an adapter state that contradicts the strategy.
    """
    modules = trainable_modules(model, strategy, k=k, arch=arch, train_pooler=train_pooler)
    model.requires_grad_(False)
    for m in modules:
        m.requires_grad_(True)
    return count_parameters(model)


def count_parameters(model: nn.Module) -> ParamCount:
    """Trainable, base and adapter parameter counts (tied weights counted once)."""
    container = get_container(model)
    adapters = 0 if container is None else sum(p.numel() for p in _unique(container.parameters()))
    return ParamCount(
        trainable=sum(p.numel() for p in _unique(model.parameters()) if p.requires_grad),
        base=sum(p.numel() for p in _base_params(model)),
        adapters=adapters,
    )
