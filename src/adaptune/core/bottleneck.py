"""The adapter module itself (Houlsby et al. 2019, §2.1, Figure 2).

A bottleneck: project the d-dimensional hidden state down to m dimensions, apply a nonlinearity,
project back up to d. Sequential adapters add their input back (the internal skip connection), so
``adapter(h) = h + up(act(down(h)))``; with near-zero weights a fresh adapter is close to the
identity and the adapted model starts as the base model. Parameters: 2md + d + m.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adaptune.core import backend
from adaptune.core.config import AdapterConfig

_ACTIVATIONS = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "identity": nn.Identity,
}


class Bottleneck(nn.Module):
    """down (d→m) → nonlinearity → up (m→d), scaled; the caller decides what it is added to.

    Args:
        hidden_size: d, the width of the hidden state it reads and writes.
        config: the adapter's configuration (size m, nonlinearity, init_std, scale).
    """

    # True: run torch's own operators with autograd's graph, no backend kernels and no fused node.
    # Gradient checkpointing sets it: torch's recomputation miscounts the tensors saved around
    # the C kernels' outputs (adaptune.training.steps._checkpoint_layers).
    torch_only = False

    def __init__(self, hidden_size: int, config: AdapterConfig) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, config.size)
        self.act = _ACTIVATIONS[config.nonlinearity]()
        self.up = nn.Linear(config.size, hidden_size)
        self.scale = config.scale
        self.reset_parameters(config.init_std, zero_up=config.zero_init_up)

    def reset_parameters(self, std: float, zero_up: bool = False) -> None:
        """Zero-mean truncated normal (cut at 2 std) for both weights, zero biases (§3.6).

        ``zero_up``: the up-projection starts at zero instead (He et al. 2022), so the branch
        outputs exactly zero until the first update.
        """
        for lin in (self.down, self.up):
            if std > 0 and not (zero_up and lin is self.up):
                nn.init.trunc_normal_(lin.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
            else:
                nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, d) -> (B, T, m) -> (B, T, d)
        y = self.up(self.act(self.down(x)))
        return y if self.scale == 1.0 else y * self.scale

    def add_to(self, h: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """``h + self(x)`` (``x`` defaults to ``h``: the sequential adapter), without a separate add.

        ``h`` plus the up-projection's bias is formed in one pass, and the up-projection
        accumulates onto it in place (``addmm`` with ``out`` = its input, beta = 1; FLOP counters
        see an ``addmm``, which they do not for ``addmm_``), so the adapted hidden state costs one
        (B*T, d) allocation and no separate add. When gradients are recorded (autocast and ``torch.func``
        transforms off) the whole adapter is one autograd node, :class:`_AddBottleneck`, with a
        hand-written backward. On a CPU, from 2,048 rows, the down- and up-projections and their
        input gradients run through the adapter's C kernel (:mod:`adaptune.cpu.adapter_gemm`), which
        starts the up-projection's sums from h and the bias.
        Equal to ``h + self(x)`` up to float rounding (the sum is formed in another order).

        Called twice per layer on every forward, so it reads its parts straight from the module's
        dicts and runs a known nonlinearity as a function: ``nn.Module`` attribute lookups and
        calls cost microseconds each, which is what a one-sentence forward on a CPU (or a small
        model on a GPU, waiting on its host) spends its time on.
        """
        mods = self._modules
        act, (w_down, b_down), (w_up, b_up) = mods["act"], _weight_bias(mods["down"]), _weight_bias(mods["up"])
        if self.torch_only:  # autograd's own graph of torch's operators (see torch_only)
            z = F.linear(h if x is None else x, w_down, b_down)
            return h + self.scale * F.linear(act(z), w_up, b_up)
        fns = _ACTS.get(type(act))
        plain = not torch.is_autocast_enabled(h.device.type) and not torch._C._are_functorch_transforms_active()
        if fns is not None and plain and torch.is_grad_enabled():  # (torch.func: autograd's own graph)
            return _AddBottleneck.apply(h, x, w_down, b_down, w_up, b_up, act, self.scale)
        d = h.shape[-1]
        if plain and not torch.is_grad_enabled():
            inp = (h if x is None else x).reshape(-1, d)
            fused = (
                backend.adapter_forward(inp, h.reshape(-1, d), w_down, b_down, w_up, b_up, self.scale)
                if _exact_gelu(act)
                else None
            )
            if fused is not None:  # the whole adapter in one kernel call
                return fused[1].view(h.shape)
            z = _down(inp, w_down, b_down)
            a = act(z) if fns is None else fns[0](act, z)
            return _up_onto(h.reshape(-1, d), a, w_up, b_up, self.scale).view(h.shape)
        z = torch.addmm(b_down, (h if x is None else x).reshape(-1, d), w_down.t())  # (B*T, m)
        a = act(z) if fns is None else fns[0](act, z)
        # out= records no gradient, autocast casts no out= operands, vmap cannot write batched rows into h's copy
        out = torch.addmm(h.reshape(-1, d), a, w_up.t(), alpha=self.scale)
        return out.add_(b_up, alpha=self.scale).view(h.shape)


def _down(x: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor) -> torch.Tensor:
    """``x @ w_downᵀ + b_down``, (B*T, m): the adapter kernel where it applies, else ``addmm``.
    Records no gradient."""
    z = backend.linear(x, w_down, b_down)
    return torch.addmm(b_down, x, w_down.t()) if z is None else z


def _matmul(x: torch.Tensor, w: torch.Tensor, onto: torch.Tensor | None = None) -> torch.Tensor:
    """``onto + x @ w`` (``onto`` None: ``x @ w``): the adapter kernel where it applies, else torch."""
    out = backend.matmul(x, w, onto)
    if out is not None:
        return out
    return x.mm(w) if onto is None else torch.addmm(onto, x, w)


def _up_onto(h: torch.Tensor, a: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor, scale: float) -> torch.Tensor:
    """``h + scale * (a @ w_upᵀ + b_up)`` as a new (B*T, d) tensor. The adapter kernel starts its
    sums from h and the bias where it applies; else h plus the bias is formed in one pass and the
    product accumulated into it (``addmm`` with ``out``: FLOP counters see it, unlike ``addmm_``).
    Records no gradient."""
    out = backend.linear(a, w_up, b_up, onto=h, scale=scale)
    if out is not None:
        return out
    out = torch.add(h, b_up, alpha=scale)
    return torch.addmm(out, a, w_up.t(), alpha=scale, out=out)


def _weight_bias(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear's weight and bias: from its parameter dict when they are plain parameters, else as
    attributes (``torch.nn.utils.parametrize``, pruning and weight norm compute them)."""
    p = linear._parameters
    w, b = p.get("weight"), p.get("bias")
    return (w, b) if w is not None and b is not None else (linear.weight, linear.bias)


def _gelu(z: torch.Tensor) -> torch.Tensor:
    """The exact GELU: the backend's where it applies (it records no gradient), else torch's."""
    out = backend.gelu(z)
    return F.gelu(z) if out is None else out


def _gelu_backward(grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    out = backend.gelu_backward(grad, z)
    return torch.ops.aten.gelu_backward(grad, z) if out is None else out


# Known nonlinearities (exact types only: a subclass or another module takes autograd's own graph):
# (the activation of z, the gradient at z given the gradient at the activation's output).
_ACTS = {
    nn.GELU: (
        lambda act, z: _gelu(z) if act.approximate == "none" else F.gelu(z, approximate=act.approximate),
        lambda act, grad, z: (
            _gelu_backward(grad, z)
            if act.approximate == "none"
            else torch.ops.aten.gelu_backward(grad, z, approximate=act.approximate)
        ),
    ),
    nn.ReLU: (lambda act, z: torch.relu(z), lambda act, grad, z: torch.ops.aten.threshold_backward(grad, z, 0)),
    nn.SiLU: (lambda act, z: F.silu(z), lambda act, grad, z: torch.ops.aten.silu_backward(grad, z)),
    nn.Tanh: (lambda act, z: torch.tanh(z), lambda act, grad, z: torch.ops.aten.tanh_backward(grad, torch.tanh(z))),
    nn.Identity: (lambda act, z: z, lambda act, grad, z: grad),
}


def _exact_gelu(act: nn.Module) -> bool:
    """Whether ``act`` is the exact GELU (what the fused adapter kernels compute)."""
    return type(act) is nn.GELU and act.approximate == "none"


class _AddBottleneck(torch.autograd.Function):
    """``h + scale * up(act(down(x)))`` (``x`` None: x = h) as one autograd node.

    Against autograd's graph of the same ops it keeps less (h or x, and the pre-activation; the
    activation is recomputed in backward, (B*T, m), cheap), needs no separate sum for the two
    gradients reaching a sequential adapter's h (its skip and its down-projection: one ``addmm``
    onto the incoming gradient), and skips gradients nobody asked for. The adapter's own fwd + bwd
    runs ~20 % faster on one CPU thread at (4096, 384), m = 64. Its backward is not itself
    differentiable: a second-order gradient (``create_graph=True``) through it raises instead of
    coming out wrong.
    """

    @staticmethod
    def forward(ctx, h, x, w_down, b_down, w_up, b_up, act, scale):
        d = h.shape[-1]
        inp = (h if x is None else x).reshape(-1, d)  # (B*T, d)
        fused = (
            backend.adapter_forward(inp, h.reshape(-1, d), w_down, b_down, w_up, b_up, scale)
            if _exact_gelu(act)
            else None
        )
        if fused is not None:  # the whole adapter in one kernel call
            z, out = fused
        else:
            z = _down(inp, w_down, b_down)  # (B*T, m), pre-activation
            out = _up_onto(h.reshape(-1, d), _ACTS[type(act)][0](act, z), w_up, b_up, scale)  # (B*T, d)
        ctx.save_for_backward(inp, z, w_down, w_up)
        ctx.act, ctx.scale, ctx.parallel = act, scale, x is not None
        ctx.shape, ctx.x_shape = h.shape, None if x is None else x.shape
        return out.view(h.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable  # no graph of the backward: double backward raises
    def backward(ctx, grad):
        inp, z, w_down, w_up = ctx.saved_tensors
        need = ctx.needs_input_grad  # h, x, w_down, b_down, w_up, b_up, act, scale
        g = grad.reshape(-1, grad.shape[-1])  # (B*T, d)
        grad_h = grad_x = g_wd = g_bd = g_wu = g_bu = None
        want_inp = need[1] if ctx.parallel else need[0]
        fused = (
            backend.adapter_backward(g, z, w_down, w_up, ctx.scale, want_inp, not ctx.parallel)
            if _exact_gelu(ctx.act) and (want_inp or need[2] or need[3])
            else None
        )
        if fused is not None:  # both input-side products and the GELU's gradient in one kernel call
            gz, sa, g_in = fused
            g_wu = g.t().mm(sa) if need[4] else None  # sa = scale * gelu(z)
            g_bu = g.sum(0).mul_(ctx.scale) if need[5] else None
            g_wd = gz.t().mm(inp) if need[2] else None
            g_bd = gz.sum(0) if need[3] else None
            if ctx.parallel:
                return (
                    grad if need[0] else None,
                    g_in.view(ctx.x_shape) if need[1] else None,
                    g_wd,
                    g_bd,
                    g_wu,
                    g_bu,
                    None,
                    None,
                )
            return g_in.view(ctx.shape) if need[0] else None, None, g_wd, g_bd, g_wu, g_bu, None, None
        gs = g if ctx.scale == 1.0 else g * ctx.scale
        if need[4]:
            g_wu = gs.t().mm(_ACTS[type(ctx.act)][0](ctx.act, z))  # (d, m)
        if need[5]:
            g_bu = gs.sum(0)
        if want_inp or need[2] or need[3]:
            gz = _ACTS[type(ctx.act)][1](ctx.act, _matmul(gs, w_up), z)  # (B*T, m)
            if need[2]:
                g_wd = gz.t().mm(inp)  # (m, d)
            if need[3]:
                g_bd = gz.sum(0)
            if ctx.parallel:
                grad_x = _matmul(gz, w_down).view(ctx.x_shape) if need[1] else None
            elif need[0]:
                grad_h = _matmul(gz, w_down, onto=g).view(ctx.shape)  # skip + down-projection, one op
        if ctx.parallel and need[0]:
            grad_h = grad
        return grad_h, grad_x, g_wd, g_bd, g_wu, g_bu, None, None
