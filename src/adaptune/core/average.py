"""A new adapter whose parameters are the weighted average of others' (AdapterHub's
``average_adapter``, "linear" strategy; Wortsman et al. 2022's model soups for adapters).

Every tensor of the new adapter -- bottlenecks, layer-norm, pooler and head copies -- is
``sum_i w_i * p_i`` over the named adapters, which must have the same configuration (up to the
init options, which only matter before training) and the same tensor shapes. Weights are
normalised to sum to 1 by default (``normalize=True``): the average of identical adapters is then
that adapter, whatever the weights. ``normalize=False`` takes them as given (task arithmetic:
differences and sums of adapters); their sum must then be non-zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from adaptune.core.adapter_set import AdapterSet
from adaptune.core.inject import _require
from adaptune.core.io import fill_adapter
from adaptune.errors import ConfigError

_INIT_FIELDS = ("init_std", "zero_init_up")


def average_adapters(
    model: nn.Module,
    name: str,
    adapters: Sequence[str] | Mapping[str, float],
    weights: Sequence[float] | None = None,
    *,
    normalize: bool = True,
    activate: bool = True,
) -> AdapterSet:
    """Add adapter ``name``, the weighted average of ``adapters``.

    Args:
        adapters: names, or a mapping name -> weight.
        weights: one per name (default: equal); not with a mapping.
        normalize: divide the weights by their sum, so that they sum to 1.

    Raises:
        ConfigError: fewer than one adapter, unknown names, configs or shapes that differ, weights of
            the wrong count, not finite, or (normalised) summing to zero.
    """
    if isinstance(adapters, Mapping):
        if weights is not None:
            raise ConfigError("give the weights either in the mapping or as weights=, not both")
        names, weights = list(adapters), [float(w) for w in adapters.values()]
    else:
        names = list(adapters)
        weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if not names or len(weights) != len(names):
        raise ConfigError(
            f"averaging needs at least one adapter and one weight per adapter; got {names} and {weights}"
        )
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"averaging weights must be finite numbers, got {weights}")
    total = sum(weights)
    if normalize:
        if abs(total) < 1e-12:
            raise ConfigError(
                f"the weights {weights} sum to 0 and cannot be normalised; pass normalize=False to use them as given"
            )
        weights = [w / total for w in weights]
    sets = [_require(model, n).sets[n] for n in names]
    base = sets[0].config
    for n, s in zip(names[1:], sets[1:]):
        if _comparable(s.config) != _comparable(sets[0].config):
            raise ConfigError(
                f"adapters {names[0]!r} and {n!r} have different configurations; only like adapters average"
            )
    states = [s.state_dict() for s in sets]
    for n, state in zip(names[1:], states[1:]):
        wrong = sorted(k for k in states[0] if k not in state or state[k].shape != states[0][k].shape)
        if wrong or set(state) != set(states[0]):
            raise ConfigError(
                f"adapter {n!r} has other tensors or shapes than {names[0]!r} ({wrong[:3] or 'other keys'})"
            )
    averaged = {k: sum(w * st[k].to(torch.float32) for w, st in zip(weights, states)) for k in states[0]}
    return fill_adapter(model, name, base, averaged, f"the average of {names}", activate)


def _comparable(config) -> dict:
    d = config.to_dict()
    for f in _INIT_FIELDS:
        d.pop(f)
    return d
