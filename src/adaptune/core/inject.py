"""Add, remove and activate named adapters on a loaded ``transformers`` model.

Many tasks share one frozen base (the paper's point, §1): each task is an :class:`AdapterSet` —
its bottlenecks, and optionally its own copies of the layer norms and the head — kept in one
container at ``model.adaptune``. One set (or none) is active, or one set per batch row (mixed-task
batches, below). Nothing of the base model is replaced or renamed, so ``state_dict`` keys of the
base stay as they were and loading code written for the plain model keeps working.

- Sequential adapter (Houlsby): the sub-layer's output module gets a routed ``forward`` (below)
  that returns ``out + a(out)``, the add fused into the up-projection (:meth:`Bottleneck.add_to`).
- Parallel adapter (He et al.): a pre-hook on the sub-layer's input module keeps its input x;
  the output module's routed forward adds ``scale * a(x)``.
- Task copies of norms and head: the base module's ``forward`` (an instance attribute, not its
  class) is routed to the active task's copy, so the base module's own output is never computed
  and thrown away; with no active copy it runs as before. Removing the last adapter restores it.
- Mixed-task batches: ``set_active(model, ["a", "b", None, ...])`` (or :func:`using_adapters`)
  names the adapter of each batch row; every routed module then runs each task's copy on that
  task's rows (a view when the rows are contiguous) and writes the results into one output.
  Row i's result equals that of a batch run with adapter i alone, up to float rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any
from collections.abc import Iterator, Sequence

from torch import nn

from adaptune.core.architectures import (
    ArchSpec,
    backbone,
    get_submodule,
    head_modules,
    layer_list,
    model_identity,
    norm_paths,
    pooler_module,
    spec_for,
)
from adaptune.core.config import AdapterConfig
from adaptune.core.container import AdapterContainer
from adaptune.core.adapter_set import _NAME, AdapterSet
from adaptune.core.stack import Stack
from adaptune.errors import ArchitectureError, ConfigError


# ---- public API ------------------------------------------------------------------------------


def get_container(model: nn.Module, arch: ArchSpec | None = None, create: bool = False) -> AdapterContainer | None:
    """The model's adapter container, created on first use when ``create`` is true."""
    container = getattr(model, "adaptune", None)
    if container is None and create:
        container = AdapterContainer(spec_for(model, arch))
        model.adaptune = container  # registered as a submodule: moves with model.to(...)
    elif container is not None and arch is not None and arch != container.spec:
        # A corrected table passed after a failed attempt must take effect, never be ignored;
        # once adapters exist they were placed by the old table, so changing it is an error.
        if len(container.sets):
            raise ArchitectureError(
                f"this model already carries adapters {list(container.sets)} placed with another ArchSpec; "
                "remove them before passing a different arch="
            )
        container.spec = arch
    return container


def _require(model: nn.Module, name: str) -> AdapterContainer:
    container = get_container(model)
    if container is None or name not in container.sets:
        have = [] if container is None else list(container.sets)
        raise ConfigError(f"no adapter named {name!r} on this model; it has {have or 'none'}")
    return container


def add_adapter(
    model: nn.Module,
    name: str,
    config: AdapterConfig | str = "houlsby",
    *,
    arch: ArchSpec | None = None,
    activate: bool = True,
) -> AdapterSet:
    """Add a new task adapter to ``model``; the base and every other adapter stay unchanged.

    Args:
        model: a loaded ``transformers`` model (with or without a task head).
        name: the task's name: letters, digits, ``_`` and ``-``; unique on this model.
        config: an :class:`AdapterConfig` or a preset name (``"houlsby"``, ``"pfeiffer"``, ``"parallel"``).
        arch: placement table for a model family that is not built in.
        activate: make the new adapter the active one.

    Returns:
        The new :class:`AdapterSet` (a module at ``model.adaptune.sets[name]``).

    Raises:
        ConfigError: bad name, duplicate name, or layer indices out of range.
        ArchitectureError: the family is unsupported, a table path does not resolve, or ``arch``
            differs from the table the model's existing adapters were placed with.

    Example:
        >>> add_adapter(model, "sst2", AdapterConfig.preset("houlsby", size=64))
    """
    if isinstance(config, str):
        config = AdapterConfig.preset(config)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"adapter name {name!r} is invalid: use letters, digits, '_' and '-', not starting with a digit"
        )
    created = get_container(model) is None
    container = get_container(model, arch, create=True)
    if name in container.sets:
        raise ConfigError(f"an adapter named {name!r} already exists; remove it first or pick another name")
    try:
        aset = _build_and_install(model, container, name, config)
    except BaseException:
        # Leave no half-added adapter behind (a set without hooks, or hooks without a set).
        if name in container.sets:
            del container.sets[name]
        container.remove_hooks()
        for other in container.sets.values():
            container.install_hooks(model, other)
        if created:
            del model.adaptune
        raise
    if activate:
        container.active = name
    return aset


def _build_and_install(model: nn.Module, container: AdapterContainer, name: str, config: AdapterConfig) -> AdapterSet:
    spec = container.spec
    ident = model_identity(model, spec)
    layers = layer_list(model, spec)
    layer_ids = config.resolve_layers(len(layers))
    # Width of the hidden state, from the model's config (hidden_size / n_embd / dim / d_model).
    hidden = ident["hidden_size"]
    if not isinstance(hidden, int):
        raise ConfigError("cannot tell the model's hidden size from its config (hidden_size / n_embd / dim)")
    if config.norm_before and not spec.post_norm:
        raise ArchitectureError(
            f"norm_before (Pfeiffer's placement) reads the layer norm that follows the residual add; "
            f"{ident['model_type']} normalises before each sub-layer instead: use the houlsby-ffn preset"
        )
    if config.fuse:
        _check_fused(container, config, layer_ids)
    base = backbone(model)
    paths = norm_paths(model, spec, input_norms=config.train_embedding_norm) if config.train_layer_norms else []
    norms = {p: get_submodule(base, p, "layer norm") for p in paths}
    head = head_modules(model) if config.train_head else {}
    pooler = pooler_module(model, spec) if config.train_pooler else None
    aset = AdapterSet(config, hidden, layer_ids, norms, head, {spec.pooler: pooler} if pooler is not None else None)
    ref = next(base.parameters())
    aset.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    container.sets[name] = aset
    container.install_hooks(model, aset)
    return aset


def add_fusion(
    model: nn.Module, name: str, adapters: Sequence[str], config: AdapterConfig | None = None, *, activate: bool = True
) -> AdapterSet:
    """Add an AdapterFusion (:mod:`adaptune.core.fusion`) of ``adapters`` (on the model) as adapter ``name``.

    Its placement (slots, layers, what the adapters read) is the fused adapters'; ``config`` gives
    the rest (which copies it trains: head, pooler, layer norms). Train it with the ``adapters``
    strategy: the fusion layers and its copies train, the fused adapters stay frozen.
    """
    return add_adapter(model, name, fusion_config(model, adapters, config), activate=activate)


def fusion_config(model: nn.Module, adapters: Sequence[str], config: AdapterConfig | None = None) -> AdapterConfig:
    """The config of a fusion of ``adapters``: ``config`` (default: the defaults) with their placement."""
    container = get_container(model)
    missing = [n for n in adapters if container is None or n not in container.sets]
    if missing:
        raise ConfigError(f"cannot fuse {missing}: no such adapters on this model; load them first")
    first = container.sets[adapters[0]].config
    return dataclasses.replace(
        config or AdapterConfig(),
        fuse=tuple(adapters),
        slots=first.slots,
        layers=first.layers,
        mode="sequential",
        norm_before=first.norm_before,
        size=first.size,
        nonlinearity=first.nonlinearity,
    )


def _check_fused(container: AdapterContainer, config: AdapterConfig, layer_ids: list[int]) -> None:
    """A fusion's adapters are on the model, sequential, alike in what they read, and cover
    exactly the fusion's sub-layers."""
    missing = [n for n in config.fuse if n not in container.sets]
    if missing:
        raise ConfigError(
            f"the fusion references adapters {missing} that this model does not have "
            f"(it has {list(container.sets) or 'none'}); load them first"
        )
    for n in config.fuse:
        other = container.sets[n].config
        if other.fuse or other.mode != "sequential":
            raise ConfigError(
                f"adapter {n!r} is {'a fusion' if other.fuse else 'parallel'}; only sequential adapters fuse"
            )
        places = {(int(i), s) for i, slots in container.sets[n].adapters.items() for s in slots}
        if places != {(i, s) for i in layer_ids for s in config.slots}:
            raise ConfigError(
                f"adapter {n!r} sits on other sub-layers than the fusion's (slots {list(config.slots)}, "
                f"layers {layer_ids}); fuse adapters of one placement"
            )
        if other.reads != container.sets[config.fuse[0]].config.reads:
            raise ConfigError(
                f"adapters {config.fuse[0]!r} and {n!r} read different inputs; fuse adapters of one placement"
            )


def set_active(model: nn.Module, name: str | Sequence[str | None] | None) -> None:
    """Route the model through adapter ``name``; ``None`` gives the plain base model; a
    :class:`~adaptune.core.stack.Stack` runs several adapters one after another.

    A list routes per batch row: ``set_active(model, ["a", "b", None, "a"])`` runs row 0 and 3
    through adapter ``a``, row 1 through ``b`` and row 2 through the plain base, in one forward
    pass; each row's output equals that of a single-task run (up to float rounding). The next
    batch must then have as many rows. Task heads of different widths give logits padded with NaN
    to the widest.

    Raises:
        ConfigError: an unknown name, or (at forward time) a batch of another size than the list.
    """
    if name is None:
        container = get_container(model)
        if container is not None:
            container.active = None
        return
    if isinstance(name, str):
        _require(model, name).active = name
        return
    container = get_container(model)
    if isinstance(name, Stack):
        if container is None:
            raise ConfigError("a Stack needs adapters on this model; add them with add_adapter first")
        container.active = name
        return
    if container is None:
        raise ConfigError("per-row adapters need adapters on this model; add them with add_adapter first")
    container.active = list(name)


@contextlib.contextmanager
def using_adapters(model: nn.Module, name: str | Sequence[str | None] | None) -> Iterator[None]:
    """``with using_adapters(model, ["a", "b", ...]): ...`` — :func:`set_active` for a block only.

    The routing found on entry is restored on exit, also after an exception.
    """
    container = get_container(model)
    before = None if container is None else container.active
    set_active(model, name)
    try:
        yield
    finally:
        if container is not None:
            container.active = before


def active_adapter(model: nn.Module) -> str | tuple[str | None, ...] | None:
    """Name of the active adapter, the per-row tuple given to :func:`set_active`, or ``None``."""
    container = get_container(model)
    return None if container is None else container.active


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter ``name``; the base and the other adapters are untouched."""
    container = _require(model, name)
    users = [n for n, aset in container.sets.items() if name in aset.config.fuse]
    if users:
        raise ConfigError(
            f"adapter {name!r} is fused by {users}; remove {'those' if len(users) > 1 else 'that'} first"
        )
    if name in container.active_names():
        container.active = None
    del container.sets[name]
    # Re-install only the hooks the remaining sets need.
    container.remove_hooks()
    for aset in container.sets.values():
        container.install_hooks(model, aset)


def list_adapters(model: nn.Module) -> list[dict[str, Any]]:
    """One row per adapter: name, active flag, parameter counts and config."""
    container = get_container(model)
    if container is None:
        return []
    rows = []
    for name, aset in container.sets.items():
        rows.append(
            {
                "name": name,
                "active": name in container.active_names(),
                "num_adapters": sum(len(s) for s in aset.adapters.values()),
                "bottleneck_params": aset.num_bottleneck_params(),
                "norm_params": sum(p.numel() for p in aset.norms.parameters()),
                "head_params": sum(p.numel() for p in aset.head.parameters()),
                "pooler_params": sum(p.numel() for p in aset.pooler.parameters()),
                "params": sum(p.numel() for p in aset.parameters()),
                "config": aset.config,
            }
        )
    return rows
