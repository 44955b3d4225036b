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
from adaptune.core import grouped
from adaptune.core.adapter_set import AdapterSet, _fresh_copy
from adaptune.core.bottleneck import Bottleneck
from adaptune.core.grouped import BottleneckBank, ModuleBank
from adaptune.core.routing import _AdaptedOutput, _InputHook, _Route, _RoutedForward
from adaptune.core.stack import Stack
from adaptune.errors import ArchitectureError, ConfigError


class AdapterContainer(nn.Module):
    """Holds every task's :class:`AdapterSet` and the routed forwards (and, for parallel adapters,
    pre-hooks) that run the base through the active one(s).

    ``active`` is a name, ``None`` (the plain base), or a tuple with one name (or ``None``) per
    batch row; assigning it validates the names and sets the route, the tensor of task indices
    that mixed-task batches and compiled graphs read (:mod:`adaptune.core.grouped`).
    """

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.sets = nn.ModuleDict()
        self.spec = spec
        self._active: str | tuple[str | None, ...] | None = None
        self._mixed = False  # rows of several tasks (or of tasks and the base) in one batch
        self._eager = False  # a Stack or a fusion is active (see _eager_only)
        # The routing as tensor data (see adaptune.core.grouped): one task index, or one per row.
        self._task_route: torch.Tensor | None = None
        self._route_index: int | None = None  # the index of a one-task route, for heads of other widths
        self._present: frozenset[int] = frozenset()  # the task indices the route holds
        self._banks: dict[tuple[int, str], list[BottleneckBank]] = {}
        self._module_banks: dict[tuple[str, str], list[ModuleBank]] = {}
        # Layers whose adapters are bypassed at run time (the paper's ablation, Figure 6).
        self._skip_layers: frozenset[int] = frozenset()
        self._hooks: dict[tuple, Any] = {}
        self._stash: dict[tuple[int, str], torch.Tensor] = {}
        # The layer norm of each (layer, slot) whose adapters read norm(h + x) (Pfeiffer's placement);
        # called as a module, so it runs the active task's copy.
        self._slot_norms: dict[tuple[int, str], nn.Module] = {}

    @property
    def skip_layers(self) -> frozenset[int]:
        return self._skip_layers

    @skip_layers.setter
    def skip_layers(self, layers) -> None:
        self._skip_layers = frozenset(layers)
        self._rebuild()

    @property
    def active(self) -> str | tuple[str | None, ...] | None:
        return self._active

    @active.setter
    def active(self, value) -> None:
        if isinstance(value, Stack):
            unknown = [n for n in value if n not in self.sets]
            if unknown:
                raise ConfigError(
                    f"the Stack names {unknown}, which this model does not have; it has {list(self.sets)}"
                )
            fused = [n for n in value if self.sets[n].config.fuse]
            if fused:
                raise ConfigError(
                    f"{fused} {'is a fusion' if len(fused) == 1 else 'are fusions'}: a Stack runs adapters"
                )
            self._active, self._mixed = value, False
        elif value is None or isinstance(value, str):
            if value is not None and value not in self.sets:
                raise ConfigError(f"no adapter named {value!r} on this model; it has {list(self.sets) or 'none'}")
            self._active, self._mixed = value, False
        else:
            rows = tuple(value)
            unknown = sorted({str(n) for n in rows if n is not None and n not in self.sets})
            if not rows or unknown:
                raise ConfigError(
                    f"per-row adapters must be a non-empty list of names or None; unknown {unknown}, "
                    f"this model has {list(self.sets) or 'none'}"
                )
            fused = sorted({n for n in rows if n is not None and self.sets[n].config.fuse})
            if fused and len(set(rows)) > 1:
                raise ConfigError(f"fusion adapters {fused} run for a whole batch, not in per-row routing")
            # one task for every row: eager runs take the plain one-task path
            self._active, self._mixed = rows, len(set(rows)) > 1
        self._set_route()

    def _set_route(self) -> None:
        """``_task_route`` from ``_active``: the tensor a compiled graph reads (so no recompilation)."""
        self._eager = self._eager_only()
        names, device = {n: i for i, n in enumerate(self.sets)}, self._device()
        value = self._active
        if isinstance(value, Stack):  # the top adapter's copies; the stack itself runs eagerly
            value = value.top
        if value is None or isinstance(value, str):
            self._route_index = len(names) if value is None else names[value]
            self._task_route = _on(torch.tensor(self._route_index), device)
            self._present = frozenset([self._route_index])
        else:
            self._route_index = None
            rows = [len(names) if n is None else names[n] for n in value]
            self._task_route, self._present = _on(torch.tensor(rows), device), frozenset(rows)

    def _device(self) -> torch.device | None:
        """Where the adapters' parameters are (None: there are none yet)."""
        ref = next(self.parameters(), None)
        return None if ref is None else ref.device

    def _single(self) -> str | None:
        """The adapter of every row when routing is not per row (a Stack's top one)."""
        if isinstance(self._active, Stack):
            return self._active.top
        return self._active if not isinstance(self._active, tuple) else self._active[0]

    def _chain(self) -> tuple[str, ...]:
        """The adapters each sub-layer runs in turn when routing is not per row."""
        if isinstance(self._active, Stack):
            return self._active.names
        name = self._single()
        return () if name is None else (name,)

    def _eager_only(self) -> bool:
        """A Stack or a fusion: runs its adapters in turn, also when compiled (no tensor routing)."""
        if isinstance(self._active, Stack):
            return True
        name = self._single()
        return name is not None and name in self.sets and bool(self.sets[name].config.fuse)

    def active_names(self) -> list[str]:
        """The adapters the current routing uses (one, several for per-row routing, or none)."""
        if self._active is None:
            return []
        if isinstance(self._active, (str, Stack)):
            return list(self._chain())
        return [n for n in dict.fromkeys(self._active) if n is not None]

    def active_set(self) -> AdapterSet | None:
        """The one set every row goes through (``None`` for the base or per-row routing)."""
        if self._mixed:
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
                if aset.config.reads != "output" and ("in", i, slot) not in self._hooks:
                    in_mod = get_submodule(layers[i], paths.input, f"{slot} input module")
                    self._hooks[("in", i, slot)] = in_mod.register_forward_pre_hook(
                        _InputHook(self, i, slot), with_kwargs=True
                    )
                if aset.config.reads == "normed":  # post-norm families only (add_adapter checks)
                    self._slot_norms[(i, slot)] = get_submodule(layers[i], paths.norm, f"{slot} layer norm")
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
        self._rebuild()

    def remove_hooks(self) -> None:
        for handle in reversed(list(self._hooks.values())):
            handle.remove()
        self._hooks.clear()
        self._stash.clear()
        self._slot_norms.clear()
        self._banks, self._module_banks = {}, {}

    # ---- the routing as tensor data (adaptune.core.grouped) ---------------------------------
    def _rebuild(self) -> None:
        """The banks of stacked adapters and module copies, and the route, for the current sets,
        skipped layers and device. Called whenever one of them changes, never during a forward
        (a compiled graph then only reads what it guards on)."""
        device, names = self._device(), list(self.sets)
        banks: dict[tuple[int, str], dict[tuple, list]] = {}
        for i, name in enumerate(names):
            aset = self.sets[name]
            for layer_id, slots in aset.adapters.items():
                if int(layer_id) in self._skip_layers:
                    continue
                for slot, adapter in slots.items():
                    key = grouped.bottleneck_key(adapter, aset.config.reads)
                    banks.setdefault((int(layer_id), slot), {}).setdefault(key, []).append((i, adapter))
        self._banks = {
            where: [grouped.BottleneckBank(m, len(names), key[-1], device) for key, m in by_key.items()]
            for where, by_key in banks.items()
        }
        self._module_banks = {}
        for hook_key, handle in self._hooks.items():
            if hook_key[0] in _GROUPS:
                group, key = _GROUPS[hook_key[0]], hook_key[1]
                self._module_banks[(group, key)] = self._module_bank(group, key, handle.module, names, device)
        if not set(self.active_names()) <= set(names):
            self._active, self._mixed = None, False
        if names:
            self._set_route()
        else:
            self._task_route = self._route_index = None
            self._eager = False

    def _module_bank(self, group: str, key: str, base: nn.Module, names: list[str], device) -> list[ModuleBank]:
        """The banks of one routed module: each task's copy (or the base module), grouped by shapes."""
        by_key: dict[tuple, list[tuple[int, nn.Module]]] = {}
        for i, name in enumerate([*names, None]):
            copy_ = None if name is None else self.sets[name]._modules[group]._modules.get(key)
            module = base if copy_ is None else copy_
            by_key.setdefault(grouped.module_key(module), []).append((i, module))
        out = []
        for members in by_key.values():
            copies = [m for _, m in members if m is not base]
            template = copies[0] if copies else _fresh_copy(base)
            out.append(ModuleBank(template, members, len(names), device))
        return out

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self._rebuild()  # the tables and the route on the parameters' new device
        return self

    def _tensor_routing(self) -> bool:
        """Rows of several tasks, or a compiled graph: the route is read as tensor data (a Stack
        runs its adapters in turn, also when compiled)."""
        # _eager is a plain bool kept with the routing: a compiled graph guards on it, not on names
        return (torch.compiler.is_compiling() and not self._eager) or self._mixed

    def _known_present(self) -> frozenset[int] | None:
        """The tasks of the batch's rows in an eager run (their weights alone get gradients), or
        None in a compiled graph (which must not guard on them: absent tasks get zero gradients)."""
        return None if torch.compiler.is_compiling() else self._present

    def _route_for(self, n: int) -> torch.Tensor:
        route = self._task_route
        if route.dim() == 1 and route.shape[0] != n:
            raise ConfigError(
                f"per-row adapters name {route.shape[0]} rows but the batch has {n}; "
                "call set_active with one name per row"
            )
        return route

    def _bottleneck(self, name: str | None, layer: int, slot: str) -> Bottleneck | None:
        if name is None or layer in self._skip_layers:
            return None
        return self._modules["sets"]._modules[name].bottleneck(layer, slot)

    def _on_output(self, layer: int, slot: str, out):
        """After a sub-layer's output module: its output with the active adapter(s) added, or None."""
        x_in = self._stash.pop((layer, slot), None) if self._stash else None
        h = out[0] if isinstance(out, tuple) else out
        if self._tensor_routing():
            banks = self._banks.get((layer, slot))
            if not banks:
                return None
            route, present = self._route_for(h.shape[0]), self._known_present()
            reads = {"output": None, "input": x_in}
            if any(bank.reads == "normed" for bank in banks):  # from h before any bank adds to it
                reads["normed"] = self._adapter_input("normed", layer, slot, h, x_in)
            for bank in banks:  # rows of other banks get an exact zero added
                h = bank.add_rows(route, h, reads[bank.reads], present)
        else:
            applied = False
            fusion = self._fusion(layer, slot)
            if fusion is not None:
                return self._fused(fusion, layer, slot, h, x_in, out)
            for name in self._chain():  # one adapter, or a Stack's in turn
                adapter = self._bottleneck(name, layer, slot)
                if adapter is None:
                    continue
                # (B, T, d): sequential reads h (internal skip), parallel the sub-layer's input,
                # Pfeiffer's the layer norm of both
                reads = self._modules["sets"]._modules[name].config.reads
                h, applied = adapter.add_to(h, self._adapter_input(reads, layer, slot, h, x_in)), True
            if not applied:
                return None
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def _fusion(self, layer: int, slot: str):
        """The active fusion's layer at (layer, slot), or None."""
        name = self._single()
        if name is None or isinstance(self._active, Stack) or layer in self._skip_layers:
            return None
        aset = self._modules["sets"]._modules[name]
        return aset.fusion_layer(layer, slot) if aset.config.fuse else None

    def _fused(self, fusion, layer: int, slot: str, h: torch.Tensor, x_in, out):
        """h plus the fusion's attention over the fused adapters' branches (adaptune.core.fusion)."""
        names = self._modules["sets"]._modules[self._single()].config.fuse
        first = self._modules["sets"]._modules[names[0]]
        u = self._adapter_input(first.config.reads, layer, slot, h, x_in)
        u = h if u is None else u
        branches = torch.stack([self.sets[n].bottleneck(layer, slot)(u) for n in names], dim=2)  # (B, T, N, d)
        h = fusion(u, branches, h)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def _adapter_input(self, reads: str, layer: int, slot: str, h: torch.Tensor, x_in) -> torch.Tensor | None:
        """What a bottleneck reads (None: h itself): the sub-layer's input, or norm(h + input)."""
        if reads == "output":
            return None
        return x_in if reads == "input" else self._slot_norms[(layer, slot)](h + x_in)

    def _on_input(self, layer: int, slot: str, args, kwargs) -> None:
        """Forward pre-hook of a sub-layer's input module: keep x for adapters that read it."""
        if self._tensor_routing():
            need = any(bank.reads != "output" for bank in self._banks.get((layer, slot), ()))
        else:
            chain = self._chain()
            if chain and self.sets[chain[0]].config.fuse:  # a fusion reads what its adapters read
                chain = self.sets[chain[0]].config.fuse[:1]
            need = any(
                self.sets[n].config.reads != "output" and self._bottleneck(n, layer, slot) is not None for n in chain
            )
        if need:
            x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
            self._stash[(layer, slot)] = x

    def _routed_call(self, base_forward, group: str, key: str, args, kwargs):
        """The base module's new ``forward``: the active task's copy when it has one, else the base.

        Rows of several tasks run through :mod:`adaptune.core.grouped` (each row with its task's
        copy, or the base module's own parameters), as one batched call per bank of equal shapes.
        """
        if not self._tensor_routing():
            aset = self.active_set()
            copy_ = None if aset is None else aset._modules[group]._modules.get(key)
            return base_forward(*args, **kwargs) if copy_ is None else copy_(*args, **kwargs)
        banks = self._module_banks[(group, key)]
        route = self._route_for(args[0].shape[0])
        if route.dim() == 0 and len(banks) > 1:  # copies of other shapes (heads of other widths)
            index = len(self.sets) if self._route_index is None else self._route_index
            banks = [b for b in banks if index in b.tasks]
        return grouped.run_module_banks(banks, route, args, kwargs, f"{group} module {key!r}", self._known_present())


_GROUPS = {"norm": "norms", "pooler": "pooler", "head": "head"}


def _on(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """``t`` (on the CPU) on ``device``; to a GPU from pinned memory without waiting for its queue."""
    if device is None or device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
