"""Add, remove and activate named adapters on a loaded ``transformers`` model.

Many tasks share one frozen base (the paper's point, §1): each task is an :class:`AdapterSet` —
its bottlenecks, and optionally its own copies of the layer norms and the head — kept in one
container at ``model.adaptune``. One set (or none) is active. Nothing of the base model is
replaced or renamed: adapters act through forward hooks on the modules the placement table names,
so ``state_dict`` keys of the base stay as they were and loading code written for the plain model
keeps working.

- Sequential adapter (Houlsby): hook on the sub-layer's output module, ``out -> out + a(out)``.
- Parallel adapter (He et al.): a pre-hook on the sub-layer's input module keeps its input x;
  the output hook adds ``scale * a(x)``.
- Task copies of norms and head: a hook on the base module returns the copy's output instead,
  so training them never touches the base or another task.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from adaptune.architectures import (
    ArchSpec,
    backbone,
    get_submodule,
    head_modules,
    layer_list,
    model_identity,
    norm_paths,
    spec_for,
)
from adaptune.bottleneck import Bottleneck
from adaptune.config import AdapterConfig
from adaptune.errors import ArchitectureError, ConfigError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def _key(path: str) -> str:
    """ModuleDict keys may not contain dots: ``encoder.layer.0.x`` -> ``encoder-layer-0-x``."""
    return path.replace(".", "-")


def _fresh_copy(module: nn.Module) -> nn.Module:
    """A deep copy without the hooks we put on the original (else the copy would call itself)."""
    twin = copy.deepcopy(module)
    for m in twin.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        getattr(m, "_forward_hooks_with_kwargs", {}).clear()
        getattr(m, "_forward_pre_hooks_with_kwargs", {}).clear()
    return twin


class AdapterSet(nn.Module):
    """Everything one task adds to the shared base.

    Attributes:
        config: the :class:`AdapterConfig` it was built from.
        adapters: ``adapters[str(layer)][slot]`` is a :class:`Bottleneck`.
        norms: task copies of the layer norms, keyed by their path with dots as dashes.
        head: task copies of the head modules, keyed by their attribute name on the model.
    """

    def __init__(
        self,
        config: AdapterConfig,
        hidden_size: int,
        layer_ids: list[int],
        norms: dict[str, nn.Module],
        head: dict[str, nn.Module],
    ) -> None:
        super().__init__()
        self.config = config
        self.adapters = nn.ModuleDict(
            {str(i): nn.ModuleDict({s: Bottleneck(hidden_size, config) for s in config.slots}) for i in layer_ids}
        )
        self.norms = nn.ModuleDict({_key(p): _fresh_copy(m) for p, m in norms.items()})
        self.norm_paths = {_key(p): p for p in norms}  # ModuleDict key -> path in the backbone
        self.head = nn.ModuleDict({n: _fresh_copy(m) for n, m in head.items()})

    def bottleneck(self, layer: int, slot: str) -> Bottleneck | None:
        per_layer = self.adapters[str(layer)] if str(layer) in self.adapters else None
        return per_layer[slot] if per_layer is not None and slot in per_layer else None

    def num_bottleneck_params(self) -> int:
        return sum(p.numel() for p in self.adapters.parameters())


class AdapterContainer(nn.Module):
    """Holds every task's :class:`AdapterSet` and the hooks that route through the active one."""

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.sets = nn.ModuleDict()
        self.spec = spec
        self.active: str | None = None
        # Layers whose adapters are bypassed at run time (the paper's ablation, Figure 6).
        self.skip_layers: frozenset[int] = frozenset()
        self._hooks: dict[tuple, Any] = {}
        self._stash: dict[tuple[int, str], torch.Tensor] = {}

    def active_set(self) -> AdapterSet | None:
        return self.sets[self.active] if self.active is not None else None

    # ---- hooks ----------------------------------------------------------------------------
    def _install(self, key: tuple, module: nn.Module, hook, *, pre: bool = False) -> None:
        if key in self._hooks:
            return
        if pre:
            self._hooks[key] = module.register_forward_pre_hook(hook, with_kwargs=True)
        else:
            self._hooks[key] = module.register_forward_hook(hook, with_kwargs=True)

    def install_hooks(self, model: nn.Module, aset: AdapterSet) -> None:
        """Put the hooks this set needs on the base modules (once per module)."""
        layers = layer_list(model, self.spec)
        for layer_id, slots in aset.adapters.items():
            i = int(layer_id)
            for slot in slots:
                paths = self.spec.slot(slot)
                out_mod = get_submodule(layers[i], paths.output, f"{slot} output module")
                self._install(("out", i, slot), out_mod, self._output_hook(i, slot))
                if aset.config.mode == "parallel":
                    in_mod = get_submodule(layers[i], paths.input, f"{slot} input module")
                    self._install(("in", i, slot), in_mod, self._input_hook(i, slot), pre=True)
        base = backbone(model)
        for key, path in aset.norm_paths.items():
            self._install(("norm", key), get_submodule(base, path, "layer norm"), self._override_hook("norms", key))
        heads = head_modules(model)
        for name in aset.head:
            self._install(("head", name), heads[name], self._override_hook("head", name))

    def remove_hooks(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._stash.clear()

    def _routing(self, layer: int, slot: str) -> Bottleneck | None:
        aset = self.active_set()
        if aset is None or layer in self.skip_layers:
            return None
        return aset.bottleneck(layer, slot)

    def _output_hook(self, layer: int, slot: str):
        def hook(module, args, kwargs, out):
            x_in = self._stash.pop((layer, slot), None)
            adapter = self._routing(layer, slot)
            if adapter is None:
                return None
            h = out[0] if isinstance(out, tuple) else out
            if self.active_set().config.mode == "parallel":
                h = h + adapter(x_in)  # (B, T, d): scaled branch from the sub-layer's input
            else:
                h = h + adapter(h)  # (B, T, d): internal skip connection
            return (h, *out[1:]) if isinstance(out, tuple) else h

        return hook

    def _input_hook(self, layer: int, slot: str):
        def hook(module, args, kwargs):
            if self._routing(layer, slot) is not None:
                x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
                self._stash[(layer, slot)] = x
            return None

        return hook

    def _override_hook(self, group: str, key: str):
        def hook(module, args, kwargs, out):
            aset = self.active_set()
            if aset is None:
                return None
            table = getattr(aset, group)
            return table[key](*args, **kwargs) if key in table else None

        return hook


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
        raise ConfigError(f"adapter name {name!r} is invalid: use letters, digits, '_' and '-', not starting with a digit")
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
    base = backbone(model)
    norms = {p: get_submodule(base, p, "layer norm") for p in norm_paths(model, spec)} if config.train_layer_norms else {}
    head = head_modules(model) if config.train_head else {}
    aset = AdapterSet(config, hidden, layer_ids, norms, head)
    ref = next(base.parameters())
    aset.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    container.sets[name] = aset
    container.install_hooks(model, aset)
    return aset


def set_active(model: nn.Module, name: str | None) -> None:
    """Route the model through adapter ``name``; ``None`` gives the plain base model."""
    if name is None:
        container = get_container(model)
        if container is not None:
            container.active = None
        return
    _require(model, name).active = name


def active_adapter(model: nn.Module) -> str | None:
    """Name of the active adapter, or ``None``."""
    container = get_container(model)
    return None if container is None else container.active


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter ``name``; the base and the other adapters are untouched."""
    container = _require(model, name)
    del container.sets[name]
    if container.active == name:
        container.active = None
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
                "active": name == container.active,
                "num_adapters": sum(len(s) for s in aset.adapters.values()),
                "bottleneck_params": aset.num_bottleneck_params(),
                "norm_params": sum(p.numel() for p in aset.norms.parameters()),
                "head_params": sum(p.numel() for p in aset.head.parameters()),
                "params": sum(p.numel() for p in aset.parameters()),
                "config": aset.config,
            }
        )
    return rows
