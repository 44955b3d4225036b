"""The optional CPU backend: the C kernels (``csrc/``), built and checked by :mod:`native`; the adapter's
fused products and the C GELU (registered with :mod:`adaptune.core.backend` on import); lean dropout and
attention; the opt-in ``malloc`` setting. ``ADAPTUNE_NATIVE=0`` or no compiler leaves pure torch."""
