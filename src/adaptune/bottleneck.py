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

from adaptune.config import AdapterConfig

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

        The up-projection accumulates straight onto ``h`` in one ``addmm`` (C = h, beta = 1), and
        its bias is added in place to that fresh result, so the adapted hidden state costs one
        (B*T, d) allocation instead of two. ``addmm``'s backward needs neither its output nor
        ``h``, so the in-place bias add is safe under autograd. Equal to ``h + self(x)`` up to
        float rounding (the sum is formed in another order).
        """
        x = h if x is None else x
        a = self.act(F.linear(x, self.down.weight, self.down.bias))  # (B, T, d) -> (B, T, m)
        a2 = a.reshape(-1, a.shape[-1])  # (B*T, m)
        out = torch.addmm(h.reshape(-1, h.shape[-1]), a2, self.up.weight.t(), alpha=self.scale)  # (B*T, d)
        out.add_(self.up.bias, alpha=self.scale)
        return out.view(h.shape)
