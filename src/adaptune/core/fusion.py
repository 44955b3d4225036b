"""AdapterFusion (Pfeiffer et al. 2021): attention over the outputs of N frozen task adapters.

At every sub-layer the fused adapters cover, each fused adapter reads what it always reads (the
sub-layer's output h, or Pfeiffer's ``norm(h + x)``: call it u) and gives its branch
``a_i(u) = scale * up(act(down(u)))``. The fusion attends over the N branches with u as the query:

    scores_i = Q(u) . K(a_i(u)),   p = softmax(scores),   out = h + sum_i p_i V(a_i(u))

and ``out`` goes on to the layer's add-and-norm as an adapter's output would. Q and K are d x d
linear layers (with biases, init N(0, 0.02)), V a d x d linear layer without a bias that starts
as the identity, so that the fresh fusion returns the attention-weighted mean of the adapters'
branches; training adds ``0.01 * ||I - V||^2`` per layer to the loss, which keeps V near the
identity (the paper's "dynamic" fusion; AdapterHub's ``DynamicAdapterFusionConfig``, without its
dropout on the scores). Only the fusion layers and the task's head (and layer-norm/pooler copies,
as its config says) train; the fused adapters stay frozen, and are saved inside the fusion's
folder so that a reload needs nothing else.
"""

from __future__ import annotations

import torch
from torch import nn

REGULARIZATION = 0.01  # weight of ||I - V||^2 (AdapterHub's value)


class Fusion(nn.Module):
    """The attention of one sub-layer over the fused adapters' branches."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size, bias=False)
        for lin in (self.query, self.key):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(hidden_size))

    def forward(self, u: torch.Tensor, branches: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``u`` (B, T, d) the query, ``branches`` (B, T, N, d) the adapters' outputs, ``h`` (B, T, d)
        what they are added to; returns ``h + sum_i p_i V(branch_i)``."""
        q = self.query(u).unsqueeze(2)  # (B, T, 1, d)
        k = self.key(branches)  # (B, T, N, d)
        p = torch.softmax((q * k).sum(-1), dim=-1)  # (B, T, N)
        return h + torch.einsum("btn,btnd->btd", p, self.value(branches))

    def regularization(self) -> torch.Tensor:
        eye = torch.eye(self.value.weight.shape[0], device=self.value.weight.device, dtype=self.value.weight.dtype)
        return REGULARIZATION * (eye - self.value.weight).pow(2).sum()


def fusion_regularization(model: nn.Module) -> torch.Tensor | None:
    """The ``||I - V||^2`` term of the active fusion (None when none is active or it is frozen)."""
    container = getattr(model, "adaptune", None)
    aset = None if container is None else container.active_set()
    if aset is None or not len(getattr(aset, "fusion", ())):
        return None
    terms = [f.regularization() for f in aset.fusion_layers() if f.value.weight.requires_grad]
    return torch.stack(terms).sum() if terms else None
