"""One task's adapter: its bottlenecks and its own copies of the layer norms, pooler and head
(:class:`AdapterSet`), and the names it may have."""

from __future__ import annotations

import copy
import re
from typing import Any

from torch import nn

from adaptune.core.bottleneck import Bottleneck
from adaptune.core.config import AdapterConfig
from adaptune.core.fusion import Fusion
from adaptune.core.routing import _AdaptedOutput, _InputHook, _Route

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
        own = (
            {}
            if config.fuse
            else {str(i): {s: Bottleneck(hidden_size, config) for s in config.slots} for i in layer_ids}
        )
        self.adapters = nn.ModuleDict({i: nn.ModuleDict(slots) for i, slots in own.items()})
        # AdapterFusion: attention over the fused adapters' branches, per (layer, slot) (empty otherwise)
        fused = {str(i): {s: Fusion(hidden_size) for s in config.slots} for i in layer_ids} if config.fuse else {}
        self.fusion = nn.ModuleDict({i: nn.ModuleDict(slots) for i, slots in fused.items()})
        self.norms = nn.ModuleDict({_key(p): _fresh_copy(m) for p, m in norms.items()})
        self.norm_paths = {_key(p): p for p in norms}  # ModuleDict key -> path in the backbone
        self.pooler = nn.ModuleDict({_key(p): _fresh_copy(m) for p, m in (pooler or {}).items()})
        self.pooler_paths = {_key(p): p for p in pooler or {}}
        self.head = nn.ModuleDict({n: _fresh_copy(m) for n, m in head.items()})

    def bottleneck(self, layer: int, slot: str) -> Bottleneck | None:
        # Straight from the ModuleDicts' dicts: this runs for every sub-layer of every forward.
        per_layer = self._modules["adapters"]._modules.get(str(layer))
        return None if per_layer is None else per_layer._modules.get(slot)

    def fusion_layer(self, layer: int, slot: str) -> Fusion | None:
        per_layer = self._modules["fusion"]._modules.get(str(layer))
        return None if per_layer is None else per_layer._modules.get(slot)

    def fusion_layers(self) -> list[Fusion]:
        return [f for slots in self.fusion.values() for f in slots.values()]

    def num_bottleneck_params(self) -> int:
        return sum(p.numel() for p in self.adapters.parameters())
