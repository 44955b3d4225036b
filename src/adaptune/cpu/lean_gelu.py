"""The exact GELU through the C kernel (``csrc/gelu.c``): one pass each way, equal to torch's exact
GELU within 1e-6. The adapter's own GELU uses :func:`gelu` / :func:`gelu_backward` from
``GELU_MIN_ENTRIES`` activations up; :func:`lean_gelu` is what ``transformers``' GELU modules run
under :func:`adaptune.cpu.kernels.use_lean_kernels`."""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from adaptune.core import backend
from adaptune.cpu import native

_native = True  # set by adaptune.cpu.kernels.set_native


# Below this many entries torch's GELU costs no more than the foreign call into the C one.
GELU_MIN_ENTRIES = 16384


def _gelu_library(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The C kernels where the GELU may run there on these tensors now: fp32, CPU, contiguous, at
    least ``GELU_MIN_ENTRIES``, no ``torch.func`` transform active; else None."""
    if not _native or tensors[0].numel() < GELU_MIN_ENTRIES or torch._C._are_functorch_transforms_active():
        return None
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return None
    return native.usable()


def gelu(z: torch.Tensor) -> torch.Tensor:
    """The exact GELU, ``F.gelu(z)``, through the C kernel (``csrc/gelu.c``) where it applies; records
    no gradient there, so a caller recording one (``z.requires_grad``) gets ``F.gelu``."""
    lib = None if torch.is_grad_enabled() and z.requires_grad else _gelu_library(z)
    if lib is None:
        return nn.functional.gelu(z)
    out = torch.empty_like(z)
    lib.adaptune_gelu(z.numel(), z.data_ptr(), out.data_ptr(), native.threads(lib))
    return out


def gelu_backward(grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The gradient at z of the exact GELU given ``grad`` at its output, through the C kernel where it
    applies (``torch.ops.aten.gelu_backward`` elsewhere)."""
    lib = _gelu_library(z, grad) if z.shape == grad.shape else None
    if lib is None:
        return torch.ops.aten.gelu_backward(grad, z)
    out = torch.empty_like(z)
    lib.adaptune_gelu_backward(z.numel(), z.data_ptr(), grad.data_ptr(), out.data_ptr(), native.threads(lib))
    return out


class _NativeGELU(torch.autograd.Function):
    """The exact GELU, forward and gradient through the C kernel: one pass each, keeps its input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return gelu(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return gelu_backward(grad.contiguous(), x)


def lean_gelu(x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x)`` (exact) for a ``transformers`` GELU module under :func:`use_lean_kernels`: when
    a gradient is recorded through it and the C kernel applies, :class:`_NativeGELU`; otherwise (no
    gradient: inference stays the plain model's, bit for bit) ``F.gelu`` itself."""
    if torch.is_grad_enabled() and x.requires_grad and _gelu_library(x) is not None:
        return _NativeGELU.apply(x)
    return nn.functional.gelu(x)


def native_gelu_agrees(lib: ctypes.CDLL) -> bool:
    """The C GELU and its gradient against torch's over a tail-sized range of inputs."""
    x = torch.linspace(-9.0, 9.0, 1003, dtype=torch.float32, device="cpu")
    grad = torch.randn(1003, generator=torch.Generator().manual_seed(0), dtype=torch.float32, device="cpu")
    out, grad_in = torch.empty_like(x), torch.empty_like(x)
    lib.adaptune_gelu(x.numel(), x.data_ptr(), out.data_ptr(), 1)
    lib.adaptune_gelu_backward(x.numel(), x.data_ptr(), grad.data_ptr(), grad_in.data_ptr(), 1)
    return torch.allclose(out, nn.functional.gelu(x), rtol=1e-5, atol=1e-6) and torch.allclose(
        grad_in, torch.ops.aten.gelu_backward(grad, x), rtol=1e-5, atol=1e-6
    )


native.register_check(native_gelu_agrees)
backend.register(gelu=gelu, gelu_backward=gelu_backward)
