"""How adapters reach a model's modules: routed ``forward`` methods (not hooks: hooks send a module
down ``nn.Module``'s slow call path) and the input hook of parallel adapters. Each calls back into
the :class:`adaptune.core.inject.AdapterContainer` it serves."""

from __future__ import annotations


from torch import nn

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adaptune.core.inject import AdapterContainer


# Hooks and routed forwards are small objects rather than closures: ``copy.deepcopy(model)`` copies
# them along with the model, so the copy's hooks call the copy's container and modules (a closure
# would be shared and keep running the original's adapters).


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
