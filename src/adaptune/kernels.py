"""Lean dropout and attention for training on CPU: fewer random draws, less kept for backward.

Two costs of a training step that no FLOP count shows, and that weigh most on adapter training
(whose matrix products are about 2/3 of full fine-tuning's, so fixed costs are a larger share):

- ``nn.Dropout`` on CPU draws a float mask with ``bernoulli_`` (~10 ns per element) and keeps it,
  4 bytes per element, for backward.
- The fused SDPA kernels refuse dropout, so attention with dropout falls back to the math path,
  which keeps the softmax, the float dropout mask and the dropped probabilities: three
  B·H·T² float tensors per layer (72 MiB at batch 32 × 128 on all-MiniLM-L6-v2).

:func:`use_lean_kernels` turns a model's dropout modules into :class:`LeanDropout` and routes
(where the model uses the ``sdpa`` attention interface of ``transformers``) its attention through
functions that draw 16-bit random numbers four at a time from 64-bit draws and keep a 1-byte
mask; attention keeps q, k, v, the softmax and that mask, and recomputes the dropped
probabilities in backward (one elementwise pass). Dropout's rate is rounded to a multiple of
1/65536 (0.1 -> 0.100006). The distribution is dropout's, but the random stream is not torch's,
so a seeded run differs from one without these kernels. Outside training, at p = 0, or on other
devices, the plain modules and SDPA run unchanged. It applies to any model, adapter tuning and
full fine-tuning alike, so comparisons between strategies stay fair when both use it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_ATTN_NAME = "adaptune_lean_sdpa"


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


def lean_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with a 1-byte kept mask (CPU); elsewhere ``F.dropout`` itself."""
    if not training or p == 0.0 or x.device.type != "cpu":
        return nn.functional.dropout(x, p, training)
    if p == 1.0:
        return x * 0.0
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


def lean_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, **kwargs):
    """A ``transformers`` attention function: :class:`_AttentionDropout` when training with dropout
    on CPU, else ``transformers``' own ``sdpa_attention_forward`` unchanged."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    plain = (not module.training or dropout == 0.0 or query.device.type != "cpu"
             or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None)
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
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
        dead = ~mask.any(dim=-1, keepdim=True)
        dead = dead if bool(dead.any()) else None
    elif mask is not None:
        bias = mask[..., :tk]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
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
    """Route ``model``'s dropout modules and sdpa attention through the lean kernels (or back).

    Args:
        model: any ``nn.Module``; ``transformers`` models on the ``sdpa`` attention
            implementation also get the lean attention.
        enable: ``False`` restores the plain modules and attention.

    Returns:
        How many modules (dropouts, plus 1 for the attention switch) were changed.

    Example:
        >>> use_lean_kernels(model)   # before training; adapters or full fine-tuning alike
    """
    changed = 0
    for m in model.modules():
        if enable and type(m) is nn.Dropout:
            m.__class__ = LeanDropout
            changed += 1
        elif not enable and type(m) is LeanDropout:
            m.__class__ = nn.Dropout
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


__all__ = ["LeanDropout", "keep_mask", "lean_dropout", "lean_sdpa_attention", "use_lean_kernels"]
