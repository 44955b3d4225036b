"""The container of a model's adapters (``model.adaptune``): which task is active (one, none, or one
per batch row), the routes into the base model's modules, and what each routed call runs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adaptune.core.architectures import (
    ArchSpec,
    backbone,
    get_submodule,
    head_modules,
    layer_list,
)
from adaptune.core.bottleneck import Bottleneck
from adaptune.core.adapter_set import AdapterSet
from adaptune.core.routing import _AdaptedOutput, _InputHook, _Route, _RoutedForward, _rows_index, _scatter_rows
from adaptune.errors import ArchitectureError, ConfigError


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
