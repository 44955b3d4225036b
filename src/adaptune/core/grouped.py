"""Rows of several tasks in one forward pass as grouped products over stacked adapter weights.

The routing of a batch is a tensor, ``route``: one task index per row (shape (B,)), or one for every
row (shape ()). Index ``i`` is the i-th adapter of the container, ``len(sets)`` the plain base. What
a compiled graph sees of it is tensor data, so a new assignment of rows to tasks (or another active
adapter) runs the same graph: nothing the compiler guards on changes.

- Bottlenecks (:class:`BottleneckBank`): the adapters of one (layer, slot) with the same shape and
  nonlinearity are stacked, with one all-zero adapter appended, into (K+1, m, d) tensors; each row
  gathers its task's weights (a row of another bank, or of the base, gathers the zeros and gets an
  exact 0 added) and the adapter runs as batched products (``baddbmm``), as multi-LoRA servers do.
  Adapters of other sizes or nonlinearities form further banks, each added in turn.
- Task copies of layer norms, poolers and heads (:class:`ModuleBank`): the copies of one module (and
  the base module itself, for rows without a copy) with the same parameter shapes are stacked per
  parameter; each row runs the module with its own parameters under ``torch.func.vmap``. Copies of
  other shapes (heads of another width) form further banks; each row keeps the output of its bank,
  padded with NaN to the widest.

The weights are stacked at each call (the gradient reaches each task's own parameters) and are never
copied out of the :class:`adaptune.core.adapter_set.AdapterSet` modules that own them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from adaptune.core.bottleneck import Bottleneck
from adaptune.errors import ArchitectureError


def _lookup(tasks: Sequence[int], rows: Sequence[int], num_tasks: int, missing: int, device) -> torch.Tensor:
    """(num_tasks + 1,) long: ``rows[k]`` at task index ``tasks[k]``, ``missing`` for the others."""
    table = torch.full((num_tasks + 1,), missing, dtype=torch.long, device=device)
    table[list(tasks)] = torch.tensor(list(rows), dtype=torch.long, device=device)
    return table


def _detach_absent(ts: list[torch.Tensor], served: list[set[int]], present: frozenset[int] | None) -> list:
    """``ts`` with those whose tasks (``served``) are all absent from the batch detached, so their
    gradients stay None (not zero, which AdamW would still act on); ``present`` None: known only
    to the data (a compiled graph), none detached."""
    if present is None:
        return ts
    return [t if tasks & present else t.detach() for t, tasks in zip(ts, served)]


class BottleneckBank:
    """The adapters of one (layer, slot) that share a shape, a nonlinearity and a mode.

    Attributes:
        adapters: the member bottlenecks, in container order.
        table: (T+1,) long, task index -> row of the stacked weights (K, the zero row, for others).
        scales: (K+1,) float, each member's output scale (0 for the zero row).
        reads: what the members read (:attr:`adaptune.core.config.AdapterConfig.reads`): the
            sub-layer's output, its input (parallel adapters) or the normed sum (Pfeiffer's).
    """

    def __init__(self, members: list[tuple[int, Bottleneck]], num_tasks: int, reads: str, device) -> None:
        self.adapters = [a for _, a in members]
        self.served = [{i} for i, _ in members]  # the task of each adapter
        self.act = self.adapters[0].act
        self.reads = reads
        self.table = _lookup([i for i, _ in members], range(len(members)), num_tasks, len(members), device)
        self.scales = torch.tensor([float(a.scale) for a in self.adapters] + [0.0], device=device)

    def stacked(self, present: frozenset[int] | None = None) -> list[torch.Tensor]:
        """down weight (K+1, m, d), down bias (K+1, m), up weight (K+1, d, m), up bias (K+1, d).

        ``present``: the tasks the batch has, where known (eager runs): see :func:`_detach_absent`."""
        out = []
        for part in ("down", "up"):
            for attr in ("weight", "bias"):
                ts = [getattr(getattr(a, part), attr) for a in self.adapters]
                ts = _detach_absent(ts, self.served, present)
                out.append(torch.stack([*ts, torch.zeros_like(ts[0])]))
        return out

    def add_rows(
        self, route: torch.Tensor, h: torch.Tensor, x: torch.Tensor | None, present: frozenset[int] | None = None
    ) -> torch.Tensor:
        """``h`` plus each row's adapter of ``x`` (``x`` None: of ``h``, the sequential adapter)."""
        sel = self.table.index_select(0, route.reshape(-1))  # (B,) or (1,)
        w_down, b_down, w_up, b_up = (t.index_select(0, sel) for t in self.stacked(present))
        scale = self.scales.index_select(0, sel).to(h.dtype)
        inp = h if x is None else x
        if route.dim() == 0:  # one task for every row: plain products
            z = F.linear(inp, w_down[0], b_down[0])
            return h + scale[0] * F.linear(self.act(z), w_up[0], b_up[0])
        b, d = h.shape[0], h.shape[-1]
        flat_in, flat_h = inp.reshape(b, -1, d), h.reshape(b, -1, d)  # (B, T, d)
        z = torch.baddbmm(b_down.unsqueeze(1), flat_in, w_down.transpose(1, 2))  # (B, T, m)
        up = torch.baddbmm(b_up.unsqueeze(1), self.act(z), w_up.transpose(1, 2))  # (B, T, d)
        return torch.addcmul(flat_h, up, scale.view(b, 1, 1)).view(h.shape)


class ModuleBank:
    """Copies of one base module (a layer norm, the pooler, a head) with the same parameter shapes;
    the base module itself is a member for the tasks that have no copy of it.

    Attributes:
        template: a module of the members' class without our routed forward (a task's copy), run
            with each row's parameters.
        modules: the members, in the order of their rows in the stacked parameters.
        table: (T+1,) long, task index -> member row (0 for tasks of other banks).
        member: (T+1,) bool, whether a task's rows take this bank's output.
    """

    def __init__(self, template: nn.Module, members: list[tuple[int, nn.Module]], num_tasks: int, device) -> None:
        self.template = template
        self.modules = list(dict.fromkeys(m for _, m in members))  # the base module may serve several tasks
        tasks = [i for i, _ in members]
        self.table = _lookup(tasks, [self.modules.index(m) for _, m in members], num_tasks, 0, device)
        self.member = _lookup(tasks, [1] * len(tasks), num_tasks, 0, device).bool()
        self.names = [n for n, _ in template.named_parameters()]
        self.tasks = {i for i, _ in members}
        # the task indices each member module serves (the base module: every task without a copy)
        self.served = [{i for i, m in members if m is module} for module in self.modules]

    def params(self, sel: torch.Tensor, present: frozenset[int] | None = None) -> dict[str, torch.Tensor]:
        """Each parameter of the members stacked and gathered at the rows ``sel`` (members that
        serve no task in ``present`` detached, as in :meth:`BottleneckBank.stacked`)."""
        out = {}
        for name in self.names:
            ts = _detach_absent([m.get_parameter(name) for m in self.modules], self.served, present)
            out[name] = torch.stack(ts).index_select(0, sel)
        return out

    def run(
        self, route: torch.Tensor, args: tuple, kwargs: dict, present: frozenset[int] | None = None
    ) -> torch.Tensor:
        sel = self.table.index_select(0, route.reshape(-1))
        params = self.params(sel, present)
        if route.dim() == 0:
            return functional_call(self.template, {n: p[0] for n, p in params.items()}, args, kwargs)
        x, rest = args[0], args[1:]
        if _plain_layer_norm(self.template) and not rest and not kwargs:
            # normalise once, then each row's own gain and bias (what vmap would do, without its overhead)
            t = self.template
            shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
            normed = F.layer_norm(x, t.normalized_shape, None, None, t.eps)
            return torch.addcmul(params["bias"].view(shape), normed, params["weight"].view(shape))

        def one_row(p: dict[str, torch.Tensor], row: torch.Tensor) -> torch.Tensor:
            return functional_call(self.template, p, (row.unsqueeze(0), *rest), kwargs).squeeze(0)

        return vmap(one_row, randomness="different")(params, x)


def _plain_layer_norm(module: nn.Module) -> bool:
    """A ``torch.nn.LayerNorm`` itself (not a subclass) over the last dimension, with gain and bias."""
    return (
        type(module) is nn.LayerNorm
        and module.elementwise_affine
        and module.bias is not None
        and len(module.normalized_shape) == 1
    )


def run_module_banks(
    banks: list[ModuleBank], route: torch.Tensor, args: tuple, kwargs: dict, what: str, present=None
) -> torch.Tensor:
    """Each row through its task's module; outputs of banks of other widths padded with NaN."""
    if len(banks) == 1:
        return banks[0].run(route, args, kwargs, present)
    outs = [bank.run(route, args, kwargs, present) for bank in banks]
    if not all(isinstance(o, torch.Tensor) for o in outs):
        raise ArchitectureError(f"per-row adapters need {what} to return one tensor; it does not")
    tail = [max(o.shape[d] for o in outs) for d in range(1, outs[0].dim())]
    result = outs[0].new_full((outs[0].shape[0], *tail), float("nan"))
    for bank, out in zip(banks, outs):
        pad = [p for d in reversed(range(1, out.dim())) for p in (0, tail[d - 1] - out.shape[d])]
        padded = F.pad(out, pad, value=float("nan")) if any(pad) else out
        keep = bank.member.index_select(0, route.reshape(-1)).view(-1, *([1] * (out.dim() - 1)))
        result = torch.where(keep, padded, result)
    return result


def bottleneck_key(adapter: Bottleneck, reads: str) -> tuple:
    """Adapters with the same key stack into one bank (the last element: what they read)."""
    act = adapter.act
    return (tuple(adapter.down.weight.shape), type(act), getattr(act, "approximate", None), reads)


def module_key(module: nn.Module) -> tuple:
    """Modules with the same key stack into one bank."""
    return (type(module), tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters()))
