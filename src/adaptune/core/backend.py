"""The one point where the adapter core (pure PyTorch) asks an optional backend for a faster version
of one of its operations.

Each slot below takes the operands of one operation and returns the result, or ``None`` where it
does not apply (another dtype or device, too few rows, no compiled kernel); the core then runs
torch's own operator. The defaults decline everything, so the core runs pure PyTorch until a
backend registers. The CPU backend (:mod:`adaptune.cpu.adapter_gemm`, :mod:`adaptune.cpu.lean_gelu`)
registers itself when it is imported, which ``import adaptune`` does. The core never imports a
backend (``tests/test_structure.py`` checks it).
"""

from __future__ import annotations

from collections.abc import Callable


def _declines(*args, **kwargs) -> None:
    return None


# ``onto + scale * (x @ wᵀ + bias)`` for (M, K) x and (N, K) w: see adaptune.cpu.adapter_gemm.linear
linear: Callable = _declines
# ``onto + x @ w``: adaptune.cpu.adapter_gemm.matmul
matmul: Callable = _declines
# a whole adapter with the exact GELU, forward and backward: adaptune.cpu.adapter_gemm.adapter_forward/backward
adapter_forward: Callable = _declines
adapter_backward: Callable = _declines
# the exact GELU and its gradient (no gradient recorded); None declines
gelu: Callable = _declines
gelu_backward: Callable = _declines

_SLOTS = ("linear", "matmul", "adapter_forward", "adapter_backward", "gelu", "gelu_backward")


def register(**ops: Callable) -> None:
    """Fill slots with a backend's functions (each returns None where it does not apply)."""
    unknown = sorted(set(ops) - set(_SLOTS))
    if unknown:
        raise ValueError(f"unknown backend operation(s) {', '.join(unknown)}; the slots are {', '.join(_SLOTS)}")
    globals().update(ops)
