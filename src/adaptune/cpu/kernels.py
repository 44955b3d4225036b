"""Lean dropout, attention and GELU for training on CPU: fewer random draws, less kept for backward.

:func:`use_lean_kernels` turns a model's dropout modules into :class:`LeanDropout`, routes its
``transformers`` exact GELU modules through :func:`adaptune.cpu.lean_gelu.lean_gelu` and (on the
``sdpa`` attention interface) its attention through :func:`lean_sdpa_attention`. Dropout keeps a
1-byte mask; attention with dropout keeps q, k, v, the softmax and that mask, and runs in
``csrc/attention.c`` where the C kernels load (fp32, head size a multiple of 16). The dropout rate
is rounded to a multiple of 1/65536; the masks come from the kernels' own stream, seeded from
torch's generator (``torch.manual_seed`` repeats a run, but the masks are not torch's). Outside
training, at p = 0, or on other devices, the plain modules and SDPA run unchanged. What this changes
and what it costs: docs/lean-kernels.md and docs/performance.md.
"""

from __future__ import annotations

import ctypes
import math

import torch
from torch import nn

from adaptune.cpu import lean_gelu as lean_gelu_module
from adaptune.cpu import native
from adaptune.cpu.lean_gelu import gelu, gelu_backward, lean_gelu

_ATTN_NAME = "adaptune_lean_sdpa"
_native = True


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """A bool tensor, each element True with probability 1 - p (p rounded to a multiple of 1/65536)."""
    n = math.prod(shape)
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    lanes = draws.view(torch.int16)[:n]  # four independent uniform 16-bit lanes per 64-bit draw
    return (lanes >= -32768 + round(p * 65536)).view(shape)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return torch.where(keep, x, 0.0).mul_(ctx.scale)  # where: no float copy of the bool mask, as mul makes

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0.0).mul_(ctx.scale), None


def _seed() -> int:
    """A 64-bit seed for a C kernel's random stream, drawn from torch's generator."""
    return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, device="cpu")) % 2**64


class _NativeDropout(torch.autograd.Function):
    """:class:`_Dropout` through the C kernel (``csrc/dropout.c``): the mask drawn and applied in one pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        lib = native.library()
        out, keep = torch.empty_like(x), torch.empty(x.shape, dtype=torch.bool, device=x.device)
        lib.adaptune_dropout(x.numel(), x.data_ptr(), out.data_ptr(), keep.data_ptr(), p, _seed(), native.threads(lib))
        ctx.save_for_backward(keep)
        ctx.p = p
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        lib = native.library()
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        lib.adaptune_dropout_backward(
            grad.numel(), grad.data_ptr(), keep.data_ptr(), ctx.p, out.data_ptr(), native.threads(lib)
        )
        return out, None


def native_dropout_agrees(lib: ctypes.CDLL) -> bool:
    """The C dropout on a tail-sized input: kept entries scaled, the rest 0, the rate about 1 - p,
    and its gradient masked the same way."""
    x = torch.randn(8195, generator=torch.Generator().manual_seed(0), dtype=torch.float32, device="cpu")
    out, keep, grad = torch.empty_like(x), torch.empty(x.shape, dtype=torch.bool, device="cpu"), torch.empty_like(x)
    lib.adaptune_dropout(x.numel(), x.data_ptr(), out.data_ptr(), keep.data_ptr(), 0.25, 7, 1)
    lib.adaptune_dropout_backward(x.numel(), x.data_ptr(), keep.data_ptr(), 0.25, grad.data_ptr(), 1)
    want = torch.where(keep, x / 0.75, 0.0)
    return abs(float(keep.float().mean()) - 0.75) < 0.03 and torch.allclose(out, want) and torch.allclose(grad, want)


def lean_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with a 1-byte kept mask (CPU; drawn and applied in C where the
    C kernels load); elsewhere, and under a ``torch.func`` transform, ``F.dropout`` itself."""
    if not training or p == 0.0 or x.device.type != "cpu" or torch._C._are_functorch_transforms_active():
        return nn.functional.dropout(x, p, training)
    if p == 1.0:
        return x * 0.0
    if _native and x.dtype == torch.float32 and x.is_contiguous() and native.usable() is not None:
        return _NativeDropout.apply(x, p)
    return _Dropout.apply(x, p)


class _AttentionDropout(torch.autograd.Function):
    """softmax(q kᵀ · scale + bias) with dropout, times v; keeps q · scale, k, v, the softmax and the mask.

    The scale multiplies q (B·H·T·dh) rather than the scores (B·H·T²), and the backward pass gets
    the softmax gradient from one product with the dropped probabilities instead of masking the
    probabilities' gradient and calling the softmax backward: with P the softmax, D = keep ⊙ P and
    G = dO·Vᵀ / (1 - p), dS = D ⊙ G - P ⊙ rowsum(D ⊙ G). Two fewer passes over a B·H·T² tensor
    forward and backward, and one mask application instead of two. q, k, v and the incoming
    gradient are laid out contiguously once, so no product copies them again.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, dead, scale: float, p: float):
        # contiguous (B, H, T, dh) once: transformers hands over transposed views, which every
        # matmul below (and in backward) would otherwise copy again
        q = torch.mul(q, scale, out=torch.empty_like(q, memory_format=torch.contiguous_format))
        k, v = k.contiguous(), v.contiguous()
        s = torch.matmul(q, k.transpose(-1, -2))  # (B, H, Tq, Tk)
        if bias is not None:
            s.add_(bias)
        probs = torch.softmax(s, dim=-1)
        del s
        if dead is not None:  # rows with every key masked attend to nothing (as SDPA does)
            probs.masked_fill_(dead, 0.0)
        keep = keep_mask(probs.shape, p, probs.device)
        out = torch.matmul(torch.where(keep, probs, 0.0), v).mul_(1.0 / (1.0 - p))  # (B, H, Tq, dh)
        ctx.save_for_backward(q, k, v, probs, keep)
        ctx.scale, ctx.keep_scale = scale, 1.0 / (1.0 - p)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs, keep = ctx.saved_tensors  # q already scaled
        g = torch.mul(grad_out, ctx.keep_scale, out=torch.empty_like(grad_out, memory_format=torch.contiguous_format))
        dropped = torch.where(keep, probs, 0.0)
        grad_v = torch.matmul(dropped.transpose(-1, -2), g)
        grad_s = torch.matmul(g, v.transpose(-1, -2)).mul_(dropped)  # P ⊙ dL/dP
        del dropped
        grad_s.addcmul_(probs, grad_s.sum(-1, keepdim=True), value=-1.0)  # the softmax's Jacobian
        grad_q = torch.matmul(grad_s, k).mul_(ctx.scale)
        grad_k = torch.matmul(grad_s.transpose(-1, -2), q)
        return grad_q, grad_k, grad_v, None, None, None, None


def _strides(t: torch.Tensor) -> list:
    """A (B, H, T, dh) tensor as the C kernel takes it: base pointer, strides over B, H and T."""
    return [t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)]


def _transposed_like(t: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, T, dh) tensor laid out (B, T, H, dh), as projections hand q, k and v over."""
    b, h, n, dh = t.shape
    return torch.empty(b, n, h, dh, dtype=t.dtype, device=t.device).transpose(1, 2)


def _attention_forward(lib, q, k, v, bias, scale: float, p: float, seed: int):
    """The C kernel's forward: the output as (B, Tq, H, dh), the softmax and the kept mask; None
    if it could not get memory."""
    b, h, tq, dh = q.shape
    tk = k.shape[2]
    out = torch.empty(b, tq, h, dh, dtype=q.dtype, device=q.device)
    probs = torch.empty(b, h, tq, tk, dtype=q.dtype, device=q.device)
    keep = torch.empty(b, h, tq, tk, dtype=torch.bool, device=q.device)
    mask = [None, 0, 0, 0] if bias is None else _strides(bias.expand(b, h, tq, tk))
    failed = lib.adaptune_attention_forward(
        b,
        h,
        tq,
        tk,
        dh,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *mask,
        scale,
        p,
        seed,
        *_strides(out.transpose(1, 2)),
        probs.data_ptr(),
        keep.data_ptr(),
        native.threads(lib),
    )
    return None if failed else (out, probs, keep)


def _attention_backward(lib, q, k, v, probs, keep, scale: float, p: float, grad_out):
    """The C kernel's gradients of q, k and v (each laid out as projections hand them over)."""
    gq, gk, gv = _transposed_like(q), _transposed_like(k), _transposed_like(v)
    b, h, tq, dh = q.shape
    failed = lib.adaptune_attention_backward(
        b,
        h,
        tq,
        k.shape[2],
        dh,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        probs.data_ptr(),
        keep.data_ptr(),
        scale,
        p,
        *_strides(grad_out),
        *_strides(gq),
        *_strides(gk),
        *_strides(gv),
        native.threads(lib),
    )
    if failed:
        raise MemoryError("attention kernel: out of memory for its scratch space")
    return gq, gk, gv


class _NativeAttention(torch.autograd.Function):
    """:class:`_AttentionDropout` through the C kernel (``csrc/attention.c``): each (batch, head)
    pair's scores, softmax, dropout and products in cache, one pass over memory. Keeps q, k, v
    (the caller's views, no copies), the softmax and a 1-byte mask, as the torch version does;
    returns (B, Tq, H, dh), the layout the output projection reads."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float, p: float):
        lib = native.library()
        result = _attention_forward(lib, q, k, v, bias, scale, p, _seed())
        if result is None:
            raise MemoryError("attention kernel: out of memory for its scratch space")
        out, probs, keep = result
        ctx.save_for_backward(q, k, v, probs, keep)
        ctx.scale, ctx.p = scale, p
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs, keep = ctx.saved_tensors
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        gq, gk, gv = _attention_backward(
            native.library(), q, k, v, probs, keep, ctx.scale, ctx.p, grad_out.transpose(1, 2)
        )
        return gq, gk, gv, None, None, None


def set_native(enabled: bool) -> bool:
    """Use the C kernels for attention and dropout where they apply (the default), or always the
    torch versions; returns the previous setting."""
    global _native
    previous, _native = _native, bool(enabled)
    lean_gelu_module._native = _native
    return previous


def _native_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """fp32 CPU tensors, rows contiguous, head size a multiple of 16, the C kernels usable now."""
    ts = [q, k, v] + ([] if bias is None else [bias])
    return (
        _native
        and q.shape[-1] % 16 == 0
        and k.shape[2] == v.shape[2]
        and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.stride(-1) == 1 for t in ts)
        and native.usable() is not None
    )


def native_attention_agrees(lib: ctypes.CDLL) -> bool:
    """The C kernel's forward and gradients on a small masked case (tail rows and columns, a row
    with every key masked) against torch's operators with the same kept mask."""
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (
        torch.randn(2, 19, 3, 16, generator=g, dtype=torch.float32, device="cpu").transpose(1, 2) for _ in range(4)
    )
    bias = torch.zeros(2, 1, 19, 19, dtype=torch.float32, device="cpu")
    bias[0, :, :, 11:] = float("-inf")
    bias[1, :, 4] = float("-inf")
    scale, p = 0.3, 0.25
    result = _attention_forward(lib, q, k, v, bias, scale, p, seed=7)
    if result is None:
        return False
    out, probs, keep = result
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    alive = (bias > float("-inf")).any(-1, keepdim=True)  # a row with every key masked attends to nothing
    want_probs = torch.softmax(scale * q @ k.transpose(-1, -2) + bias.masked_fill(~alive, 0.0), dim=-1) * alive
    want = (torch.where(keep, want_probs, 0.0) @ v / (1 - p)).transpose(1, 2)
    want_grads = torch.autograd.grad(want, (q, k, v), grad.transpose(1, 2))
    got_grads = _attention_backward(lib, q.detach(), k.detach(), v.detach(), probs, keep, scale, p, grad)
    pairs = [(out, want), (probs, want_probs), *zip(got_grads, want_grads)]
    return abs(float(keep.float().mean()) - (1 - p)) < 0.05 and all(
        torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in pairs
    )


def lean_sdpa_attention(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs
):
    """A ``transformers`` attention function: when training with dropout on CPU, the C kernel
    (:class:`_NativeAttention`) where it applies, else :class:`_AttentionDropout`; otherwise
    ``transformers``' own ``sdpa_attention_forward`` unchanged."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    plain = (
        not module.training
        or dropout == 0.0
        or query.device.type != "cpu"
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
    )
    if plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    tq, tk = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask = attention_mask
    if mask is None and is_causal and tq > 1:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril(tk - tq)
    bias, dead = None, None
    if mask is not None and mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~mask, float("-inf"))
    elif mask is not None:
        bias = mask[..., :tk]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if dropout < 1.0 and _native_applies(query, key, value, bias):  # rows with every key masked give 0 there
        return _NativeAttention.apply(query, key, value, bias, scale, dropout), None
    if mask is not None and mask.dtype == torch.bool:
        dead = ~mask.any(dim=-1, keepdim=True)
        dead = dead if bool(dead.any()) else None
    out = _AttentionDropout.apply(query, key, value, bias, dead, scale, dropout)
    return out.transpose(1, 2).contiguous(), None  # (B, Tq, H, dh), no attention weights


class LeanDropout(nn.Dropout):
    """``nn.Dropout`` running :func:`lean_dropout`. :func:`use_lean_kernels` swaps a plain dropout's
    class to this one and back: no new module, no state, no ``forward`` set on the instance (where
    it would collide with adapters' routed forwards on the same module), and ``copy.deepcopy`` of
    the model keeps it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lean_dropout(x, self.p, self.training)


def use_lean_kernels(model: nn.Module, enable: bool = True) -> int:
    """Route ``model``'s dropout modules, ``transformers``' exact GELU modules and sdpa attention
    through the lean kernels (or back).

    Args:
        model: any ``nn.Module``; ``transformers`` models on the ``sdpa`` attention
            implementation also get the lean attention.
        enable: ``False`` restores the plain modules and attention.

    Returns:
        How many modules (dropouts, GELUs, plus 1 for the attention switch) were changed.

    Example:
        >>> use_lean_kernels(model)   # before training; adapters or full fine-tuning alike
    """
    from transformers.activations import GELUActivation

    changed = 0
    for m in model.modules():
        if enable and type(m) is nn.Dropout:
            m.__class__ = LeanDropout
            changed += 1
        elif not enable and type(m) is LeanDropout:
            m.__class__ = nn.Dropout
            changed += 1
        elif type(m) is GELUActivation and m.act is (nn.functional.gelu if enable else lean_gelu):
            m.act = lean_gelu if enable else nn.functional.gelu  # an attribute GELUActivation.forward calls
            changed += 1
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if hasattr(model, "set_attn_implementation") and current in ("sdpa", _ATTN_NAME):
        target = _ATTN_NAME if enable else "sdpa"
        if current != target:
            from transformers import AttentionInterface
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

            AttentionInterface.register(_ATTN_NAME, lean_sdpa_attention)
            ALL_MASK_ATTENTION_FUNCTIONS.register(_ATTN_NAME, sdpa_mask)  # the masks sdpa gets
            model.set_attn_implementation(target)
            changed += 1
    return changed


for _check in (native_attention_agrees, native_dropout_agrees):
    native.register_check(_check)

__all__ = [
    "LeanDropout",
    "gelu",
    "gelu_backward",
    "keep_mask",
    "lean_dropout",
    "lean_gelu",
    "lean_sdpa_attention",
    "set_native",
    "use_lean_kernels",
]
