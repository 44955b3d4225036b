"""Stack: adapters applied one after another in every sub-layer (AdapterHub's ``Stack``).

``set_active(model, Stack("lang", "task"))`` runs, at each adapted sub-layer, the first adapter on
the sub-layer's output and each next one on the result before it (a language adapter under a task
adapter, Pfeiffer et al. 2020's MAD-X). Each member keeps its own placement: a Pfeiffer adapter reads
``norm(h + x)`` of the hidden state the member below it returned. The layer-norm, pooler and head
copies are the top (last) adapter's. Training with the ``adapters`` strategy trains every member,
or only the top one with ``Stack(..., train="top")``. A stack is one routing for the whole batch:
it does not mix with per-row routing.
"""

from __future__ import annotations

from adaptune.errors import ConfigError


class Stack:
    """Adapters by name, bottom first; ``train``: ``"all"`` members or only the ``"top"`` one."""

    __slots__ = ("names", "train")

    def __init__(self, *names: str, train: str = "all") -> None:
        if len(names) < 2 or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"a Stack needs at least two adapter names, got {names!r}")
        if len(set(names)) != len(names):
            raise ConfigError(f"a Stack names each adapter once, got {list(names)}")
        if train not in ("all", "top"):
            raise ConfigError(f"Stack(train=...) is 'all' or 'top', got {train!r}")
        self.names, self.train = tuple(names), train

    @property
    def top(self) -> str:
        return self.names[-1]

    def __iter__(self):
        return iter(self.names)

    def __eq__(self, other) -> bool:
        return isinstance(other, Stack) and (self.names, self.train) == (other.names, other.train)

    def __hash__(self) -> int:
        return hash((self.names, self.train))

    def __repr__(self) -> str:
        extra = ", train='top'" if self.train == "top" else ""
        return f"Stack({', '.join(map(repr, self.names))}{extra})"
