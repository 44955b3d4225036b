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
import copy
import re
from typing import Any
from collections.abc import Iterator, Sequence

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
    pooler_module,
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
    """A deep copy without the hooks and routed forwards we put on the original (else the copy
    would call itself)."""
    # Our hooks and routes hold the whole container: map them to None so deepcopy does not copy it.
    memo: dict[int, Any] = {}
    for m in module.modules():
        if isinstance(m.__dict__.get("forward"), (_Route, _AdaptedOutput)):
            memo[id(m.__dict__["forward"])] = None
        memo.update({id(h): None for h in m._forward_pre_hooks.values() if isinstance(h, _InputHook)})
    twin = copy.deepcopy(module, memo)
    for m in twin.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        getattr(m, "_forward_hooks_with_kwargs", {}).clear()
        getattr(m, "_forward_pre_hooks_with_kwargs", {}).clear()
        if "forward" in m.__dict__ and m.__dict__["forward"] is None:
            del m.forward  # was our routed forward: the copy runs its class's own
    return twin


class _RoutedForward:
    """Handle for a module whose ``forward`` we routed: ``remove()`` puts the old one back.

    Only if ours is still the module's ``forward``: code that wrapped it since (device-placement
    hooks, another library's patch) keeps its wrapper, and our route inside it turns inert (a plain
    pass-through to the forward it wraps).
    """

    def __init__(self, module: nn.Module, route) -> None:
        self.module, self.route = module, route
        self.had_own = "forward" in module.__dict__  # e.g. a forward patched by another library
        self.previous = module.forward
        module.forward = route

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is not self.route:
            self.route.inert = True
        elif self.had_own:
            self.module.forward = self.previous
        else:
            del self.module.forward


def _rows_index(rows: list[int], device: torch.device) -> torch.Tensor | slice:
    """A slice for contiguous rows (zero-copy views), else an index tensor on ``device``."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, dtype=torch.long, device=device)


def _scatter_rows(pieces: list[tuple[Any, torch.Tensor]], batch: int) -> torch.Tensor:
    """One tensor from per-row-group results; trailing sizes that differ (heads of different
    widths) are padded with NaN to the widest."""
    first = pieces[0][1]
    tail = [max(p.shape[d] for _, p in pieces) for d in range(1, first.dim())]
    ragged = any(list(p.shape[1:]) != tail for _, p in pieces)
    out = first.new_full((batch, *tail), float("nan")) if ragged else first.new_empty((batch, *tail))
    for rows, piece in pieces:
        if ragged:
            out[(rows, *(slice(0, n) for n in piece.shape[1:]))] = piece
        else:
            out[rows] = piece
    return out


class AdapterSet(nn.Module):
    """Everything one task adds to the shared base.

    Attributes:
        config: the :class:`AdapterConfig` it was built from.
        adapters: ``adapters[str(layer)][slot]`` is a :class:`Bottleneck`.
        norms: task copies of the layer norms, keyed by their path with dots as dashes.
        pooler: the task's copy of the pooler (empty, or one entry keyed like ``norms``).
        head: task copies of the head modules, keyed by their attribute name on the model.
    """

    def __init__(
        self,
        config: AdapterConfig,
        hidden_size: int,
        layer_ids: list[int],
        norms: dict[str, nn.Module],
        head: dict[str, nn.Module],
        pooler: dict[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.adapters = nn.ModuleDict(
            {str(i): nn.ModuleDict({s: Bottleneck(hidden_size, config) for s in config.slots}) for i in layer_ids}
        )
        self.norms = nn.ModuleDict({_key(p): _fresh_copy(m) for p, m in norms.items()})
        self.norm_paths = {_key(p): p for p in norms}  # ModuleDict key -> path in the backbone
        self.pooler = nn.ModuleDict({_key(p): _fresh_copy(m) for p, m in (pooler or {}).items()})
        self.pooler_paths = {_key(p): p for p in pooler or {}}
        self.head = nn.ModuleDict({n: _fresh_copy(m) for n, m in head.items()})

    def bottleneck(self, layer: int, slot: str) -> Bottleneck | None:
        # Straight from the ModuleDicts' dicts: this runs for every sub-layer of every forward.
        per_layer = self._modules["adapters"]._modules.get(str(layer))
        return None if per_layer is None else per_layer._modules.get(slot)

    def num_bottleneck_params(self) -> int:
        return sum(p.numel() for p in self.adapters.parameters())


class AdapterContainer(nn.Module):
    """Holds every task's :class:`AdapterSet` and the routed forwards (and, for parallel adapters,
    pre-hooks) that run the base through the active one(s).

    ``active`` is a name, ``None`` (the plain base), or a tuple with one name (or ``None``) per
    batch row; assigning it validates the names and precomputes the row groups.
    """

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.sets = nn.ModuleDict()
        self.spec = spec
        self._active: str | tuple[str | None, ...] | None = None
        self._groups: list[tuple[str | None, list[int]]] | None = None  # per-row routing, else None
        self._index_cache: dict[tuple, torch.Tensor | slice] = {}
        # Layers whose adapters are bypassed at run time (the paper's ablation, Figure 6).
        self.skip_layers: frozenset[int] = frozenset()
        self._hooks: dict[tuple, Any] = {}
        self._stash: dict[tuple[int, str], torch.Tensor] = {}

    @property
    def active(self) -> str | tuple[str | None, ...] | None:
        return self._active

    @active.setter
    def active(self, value) -> None:
        if value is None or isinstance(value, str):
            if value is not None and value not in self.sets:
                raise ConfigError(f"no adapter named {value!r} on this model; it has {list(self.sets) or 'none'}")
            self._active, self._groups = value, None
            return
        rows = tuple(value)
        unknown = sorted({str(n) for n in rows if n is not None and n not in self.sets})
        if not rows or unknown:
            raise ConfigError(
                f"per-row adapters must be a non-empty list of names or None; unknown {unknown}, "
                f"this model has {list(self.sets) or 'none'}"
            )
        if len(set(rows)) == 1:  # one task for every row: the plain fast path
            self._active, self._groups = rows, None
            return
        groups: dict[str | None, list[int]] = {}
        for i, name in enumerate(rows):
            groups.setdefault(name, []).append(i)
        self._active, self._groups, self._index_cache = rows, list(groups.items()), {}

    def _single(self) -> str | None:
        """The adapter of every row when routing is not per row."""
        return self._active if not isinstance(self._active, tuple) else self._active[0]

    def active_names(self) -> list[str]:
        """The adapters the current routing uses (one, several for per-row routing, or none)."""
        if self._active is None:
            return []
        if isinstance(self._active, str):
            return [self._active]
        return [n for n in dict.fromkeys(self._active) if n is not None]

    def active_set(self) -> AdapterSet | None:
        """The one set every row goes through (``None`` for the base or per-row routing)."""
        if self._groups is not None:
            return None
        name = self._single()
        return self._modules["sets"]._modules[name] if name is not None else None

    # ---- hooks ----------------------------------------------------------------------------
    def _route(self, key: tuple, module: nn.Module, route) -> None:
        """Make ``route`` the ``forward`` of ``module`` (once per key)."""
        if key in self._hooks:
            return
        if isinstance(module.__dict__.get("forward"), (_Route, _AdaptedOutput)):
            # One module both an adapter's output and a copied norm (or head): the copy would
            # replace the adapted forward, or the adapter run on the base module's output.
            raise ArchitectureError(
                f"module {type(module).__name__} is both a sub-layer output and a layer norm or "
                "head that adapters copy; place the adapter on another module in the ArchSpec"
            )
        self._hooks[key] = _RoutedForward(module, route)

    def install_hooks(self, model: nn.Module, aset: AdapterSet) -> None:
        """Put the hooks this set needs on the base modules (once per module)."""
        layers = layer_list(model, self.spec)
        for layer_id, slots in aset.adapters.items():
            i = int(layer_id)
            for slot in slots:
                paths = self.spec.slot(slot)
                out_mod = get_submodule(layers[i], paths.output, f"{slot} output module")
                self._route(("out", i, slot), out_mod, _AdaptedOutput(self, out_mod, i, slot))
                if aset.config.mode == "parallel" and ("in", i, slot) not in self._hooks:
                    in_mod = get_submodule(layers[i], paths.input, f"{slot} input module")
                    self._hooks[("in", i, slot)] = in_mod.register_forward_pre_hook(
                        _InputHook(self, i, slot), with_kwargs=True
                    )
        base = backbone(model)
        for key, path in aset.norm_paths.items():
            norm = get_submodule(base, path, "layer norm")
            self._route(("norm", key), norm, _Route(self, norm.forward, "norms", key))
        for key, path in aset.pooler_paths.items():
            pooler = get_submodule(base, path, "pooler")
            self._route(("pooler", key), pooler, _Route(self, pooler.forward, "pooler", key))
        heads = head_modules(model)
        for name in aset.head:
            self._route(("head", name), heads[name], _Route(self, heads[name].forward, "head", name))

    def remove_hooks(self) -> None:
        for handle in reversed(list(self._hooks.values())):
            handle.remove()
        self._hooks.clear()
        self._stash.clear()

    def _rows(self, rows: list[int], device: torch.device) -> torch.Tensor | slice:
        key = (tuple(rows), device)
        if key not in self._index_cache:
            self._index_cache[key] = _rows_index(rows, device)
        return self._index_cache[key]

    def _check_batch(self, n: int) -> None:
        if n != len(self._active):
            raise ConfigError(
                f"per-row adapters name {len(self._active)} rows but the batch has {n}; "
                "call set_active with one name per row"
            )

    def _bottleneck(self, name: str | None, layer: int, slot: str) -> Bottleneck | None:
        if name is None or layer in self.skip_layers:
            return None
        return self._modules["sets"]._modules[name].bottleneck(layer, slot)

    def _on_output(self, layer: int, slot: str, out):
        """After a sub-layer's output module: its output with the active adapter(s) added, or None."""
        x_in = self._stash.pop((layer, slot), None) if self._stash else None
        h = out[0] if isinstance(out, tuple) else out
        if self._groups is None:
            aset = self.active_set()
            adapter = None if aset is None else self._bottleneck(self._single(), layer, slot)
            if adapter is None:
                return None
            # (B, T, d): sequential reads h (internal skip), parallel the sub-layer's input
            h = adapter.add_to(h, x_in if aset.config.mode == "parallel" else None)
        else:
            self._check_batch(h.shape[0])
            pieces = []
            for name, rows in self._groups:
                idx = self._rows(rows, h.device)
                adapter = self._bottleneck(name, layer, slot)
                if adapter is None:
                    pieces.append((idx, h[idx]))
                else:
                    par = self.sets[name].config.mode == "parallel"
                    pieces.append((idx, adapter.add_to(h[idx], x_in[idx] if par else None)))
            h = _scatter_rows(pieces, h.shape[0])
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def _on_input(self, layer: int, slot: str, args, kwargs) -> None:
        """Forward pre-hook of a sub-layer's input module: keep x for parallel adapters."""
        names = self.active_names()
        if any(self.sets[n].config.mode == "parallel" and self._bottleneck(n, layer, slot) is not None for n in names):
            x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
            self._stash[(layer, slot)] = x

    def _routed_call(self, base_forward, group: str, key: str, args, kwargs):
        """The base module's new ``forward``: the active task's copy when it has one, else the base.

        Per-row routing splits the batch (dim 0 of the first argument) by task; tasks without a
        copy of this module share one call of the base.
        """
        if self._groups is None:
            aset = self.active_set()
            copy_ = None if aset is None else aset._modules[group]._modules.get(key)
            return base_forward(*args, **kwargs) if copy_ is None else copy_(*args, **kwargs)
        x, rest = args[0], args[1:]
        self._check_batch(x.shape[0])
        by_module: dict[int, tuple[Any, list[int]]] = {}
        for name, rows in self._groups:
            table = None if name is None else getattr(self.sets[name], group)
            fn = table[key] if table is not None and key in table else base_forward
            by_module.setdefault(id(fn), (fn, []))[1].extend(rows)
        pieces = []
        for fn, rows in by_module.values():
            idx = self._rows(sorted(rows), x.device)
            pieces.append((idx, fn(x[idx], *rest, **kwargs)))
        if len(pieces) == 1:
            return pieces[0][1]
        if not all(isinstance(p, torch.Tensor) for _, p in pieces):
            raise ArchitectureError(f"per-row adapters need {group} modules that return one tensor; {key!r} does not")
        return _scatter_rows(pieces, x.shape[0])


# Hooks and routed forwards are small objects rather than closures: ``copy.deepcopy(model)`` copies
# them along with the model, so the copy's hooks call the copy's container and modules (a closure
# would be shared and keep running the original's adapters).


class _AdaptedOutput:
    """The new ``forward`` of a sub-layer's output module: its own forward, then the adapter(s).

    A routed forward rather than a forward hook: a module with hooks takes ``nn.Module``'s slow
    call path on every call, which costs more than a small adapter's arithmetic on a one-sentence
    forward. The module's own forward is its class's, looked up at each call (so a class swapped
    later, as :func:`adaptune.use_lean_kernels` does to dropouts, takes effect), unless other code
    had set one on the instance before the adapter came.
    """

    inert = False  # set when removed while wrapped by other code: then only the module's own forward

    def __init__(self, container: AdapterContainer, module: nn.Module, layer: int, slot: str) -> None:
        self.container, self.module, self.layer, self.slot = container, module, layer, slot
        self.own = module.__dict__.get("forward")

    def __call__(self, *args, **kwargs):
        m = self.module
        out = type(m).forward(m, *args, **kwargs) if self.own is None else self.own(*args, **kwargs)
        adapted = None if self.inert else self.container._on_output(self.layer, self.slot, out)
        return out if adapted is None else adapted


class _InputHook:
    def __init__(self, container: AdapterContainer, layer: int, slot: str) -> None:
        self.container, self.layer, self.slot = container, layer, slot

    def __call__(self, module, args, kwargs):
        self.container._on_input(self.layer, self.slot, args, kwargs)
        return None


class _Route:
    inert = False  # as in _AdaptedOutput

    def __init__(self, container: AdapterContainer, base_forward, group: str, key: str) -> None:
        self.container, self.base_forward, self.group, self.key = container, base_forward, group, key

    def __call__(self, *args, **kwargs):
        if self.inert:
            return self.base_forward(*args, **kwargs)
        return self.container._routed_call(self.base_forward, self.group, self.key, args, kwargs)


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


def set_active(model: nn.Module, name: str | Sequence[str | None] | None) -> None:
    """Route the model through adapter ``name``; ``None`` gives the plain base model.

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
