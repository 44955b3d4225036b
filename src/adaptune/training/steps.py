"""The pieces of one optimisation step and of an evaluation pass, shared by the loop, ``compare``
and the benchmarks: the model of a config, the loss and its one job-wide reduction, the optimiser
and schedule (the paper's AdamW with linear warm-up and decay), and :func:`evaluate`."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from adaptune.lm.causal_lm import ResponseIndex, lm_loss_sum, response_index
from adaptune.errors import ConfigError
from adaptune.core.bottleneck import Bottleneck
from adaptune.core.architectures import head_modules
from adaptune.core.fusion import fusion_regularization
from adaptune.core.inject import add_adapter, add_fusion
from adaptune.core.io import load_adapter
from adaptune.cpu.kernels import use_lean_kernels
from adaptune.models.loading import (
    load_causal_lm,
    load_classifier,
    pick_device,
)
from adaptune.core.adapter_set import _fresh_copy
from adaptune.core.trainable import count_parameters, train_strategy
from adaptune.models.quantize import quantize_base
from adaptune.training.config import ADAPTER_NAME, CAUSAL_LM, TrainConfig
from adaptune.training.evaluation import autocast, evaluate, forward_logits, scores

__all__ = [
    "autocast",
    "build_model",
    "evaluate",
    "forward_logits",
    "loss_sum",
    "make_optimizer",
    "scores",
    "training_step",
]


def build_model(
    cfg: TrainConfig,
    num_labels: int,
    device: torch.device | None = None,
    head: str = "sequence",
    prior: torch.Tensor | None = None,
):
    """The model for ``cfg``: base + fresh head (``head``: ``"sequence"``, ``"token"`` for token
    classification, ``"choice"`` for multiple choice), or the causal LM (+ the task adapter), with
    the strategy applied and, where :meth:`TrainConfig.lean_on` says so for ``device`` (default:
    ``cfg.device``), the lean kernels. ``prior``: a multi-label task's label frequencies in training,
    which set the head's output biases (:func:`prior_bias`)."""
    torch.manual_seed(cfg.seed)  # head and adapter init depend on the seed only
    if cfg.causal and cfg.strategy == "head":
        raise ConfigError(
            "strategy 'head' needs a task head; a causal LM has none (use adapters, full, top-k or layernorm)"
        )
    model = load_causal_lm(cfg.model) if cfg.causal else load_classifier(cfg.model, num_labels, head=head)
    if prior is not None:
        prior_bias(model, prior)
    if cfg.strategy == "adapters" and cfg.fuse:
        add_fusion(model, ADAPTER_NAME, load_fused(model, cfg.fuse), cfg.adapter_config())
    elif cfg.strategy == "adapters" and cfg.head_on:
        head_on_adapter(model, cfg.head_on)
    elif cfg.strategy == "adapters":
        add_adapter(model, ADAPTER_NAME, cfg.adapter_config())
    counts = train_strategy(model, cfg.strategy, k=cfg.top_k, train_pooler=cfg.train_pooler)
    if cfg.head_on:  # the loaded adapter's bottlenecks and layer norms stay frozen
        aset = model.adaptune.sets[ADAPTER_NAME]
        aset.adapters.requires_grad_(False)
        aset.norms.requires_grad_(False)
        counts = count_parameters(model)
    quantize_base(model, cfg.quantize)  # the frozen linear layers only, after the strategy froze them
    if cfg.gradient_checkpointing:
        _checkpoint_layers(model)
    if cfg.lean_on(pick_device(cfg.device) if device is None else device):  # every strategy alike (fair comparisons)
        use_lean_kernels(model)
    return model, counts


def _adapter_folder(source: str) -> Path:
    path = Path(source)
    folder = path / "adapter" if (path / "adapter").is_dir() else path
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"{source} is neither an adapter run nor an adapter folder")
    return folder


def head_on_adapter(model, source: str) -> None:
    """The adapter of ``source`` as the task adapter, with a fresh copy of the model's head (this
    task's labels) in place of the one it was trained with."""
    load_adapter(model, _adapter_folder(source), name=ADAPTER_NAME)
    aset = model.adaptune.sets[ADAPTER_NAME]
    if not len(aset.head):
        raise ConfigError(f"the adapter of {source} has no head copy to replace (trained with train_head off)")
    for key, module in head_modules(model).items():
        aset.head[key] = _fresh_copy(module)
    model.adaptune._rebuild()


def load_fused(model, sources: tuple[str, ...]) -> list[str]:
    """Load the adapters a fusion fuses (run folders or adapter folders), frozen, each named after
    its folder; returns the names."""
    names = []
    for source in sources:
        path, folder = Path(source), _adapter_folder(source)
        name = re.sub(r"[^A-Za-z0-9_-]", "_", path.resolve().name)
        name = name if re.match(r"[A-Za-z_]", name) and name != ADAPTER_NAME else f"fused_{name}"
        if name in names:
            raise ConfigError(f"two adapters to fuse are both named {name!r} (their folders' names); rename one")
        names.append(load_adapter(model, folder, name=name, activate=False))
    return names


def prior_bias(model, frequency: torch.Tensor) -> None:
    """Start each sigmoid output at its label's frequency: the bias of the head's output layer set to
    log(p / (1 - p)) (Lin et al. 2017). With a bias of 0 every label starts at probability 0.5, and
    with many rare labels the first steps go into pushing every output down, which drags the
    representation towards the label prior; from the prior, training starts where that would end."""
    out = [m for m in head_modules(model).values() for m in m.modules() if isinstance(m, torch.nn.Linear)][-1:]
    if not out or out[0].out_features != frequency.numel() or out[0].bias is None:
        return
    p = frequency.double().clamp(1e-4, 1 - 1e-4)
    with torch.no_grad():
        out[0].bias.copy_((p / (1 - p)).log().to(out[0].bias.dtype))


def _checkpoint_layers(model) -> None:
    """transformers' gradient checkpointing of the layers (non-reentrant: frozen inputs are fine, and
    torch's RNG state is restored on recompute, so dropout masks repeat).

    The adapters then run torch's own operators (``Bottleneck.torch_only``): around the adapter's
    C kernels torch's recomputation saved another number of tensors than the forward, for some
    batch shapes, and stopped the run."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():
        if isinstance(module, Bottleneck):
            module.torch_only = True
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # no KV cache while training (transformers would turn it off anyway)


def _loss(
    logits: torch.Tensor, labels: torch.Tensor, task_type: str, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """The mean loss of a batch on one process (:func:`loss_sum` divided by its count)."""
    total, count = loss_sum(logits, labels, task_type, weight)
    return total / count.clamp(min=1)


def loss_sum(
    logits: torch.Tensor,
    labels: torch.Tensor,
    task_type: str,
    class_weight: torch.Tensor | None = None,
    row_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's summed loss and the count it is a sum over (the examples), for :func:`job_mean`.

    ``class_weight`` (K,) weighs each example's cross-entropy by its class; ``row_weight`` (B,) by
    its row, 0 for a row that only fills a shard (it then counts for nothing). The count is that of
    the examples, not their total weight: torch's ``"mean"`` with a weight divides by the weights'
    sum, which cancels the weights in a batch of one class.
    """
    if task_type == "question-answering":  # the mean of the start and the end token's cross-entropy
        each = sum(F.cross_entropy(logits[..., k].float(), labels[:, k], reduction="none") for k in (0, 1)) / 2
        total = each.sum() if row_weight is None else (each * row_weight).sum()
        return total, example_count(labels, row_weight)
    if task_type == "token-classification":  # a tag per word: positions labelled -100 are not trained
        each = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view(labels.shape)
        if row_weight is not None:
            each = each * row_weight.view(-1, 1)
        return each.sum(), loss_count(labels, task_type, row_weight)
    if task_type == "regression":
        each = F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction="none")
    elif task_type == "multi-label":  # a sigmoid per label; an example's loss is the mean over its labels
        each = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none").mean(-1)
    else:
        each = F.cross_entropy(logits.float(), labels, weight=class_weight, reduction="none")
    total = each.sum() if row_weight is None else (each * row_weight).sum()
    return total, example_count(labels, row_weight)


def loss_count(labels: torch.Tensor, task_type: str, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """What a batch's loss sums over: its labelled words for token classification (rows of weight
    0 left out), else its examples (:func:`example_count`)."""
    if task_type != "token-classification":
        return example_count(labels, row_weight)
    labelled = labels != -100
    if row_weight is not None:
        labelled = labelled & (row_weight.view(-1, 1) != 0)
    return labelled.sum().float()


def example_count(labels: torch.Tensor, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """How many examples a batch's loss sums over: its rows, less those of ``row_weight`` 0."""
    if row_weight is None:
        return torch.tensor(float(labels.shape[0]), device=labels.device)
    return (row_weight != 0).sum().float()


def job_mean(total: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one reduction of the training loss: ``total`` over ``count`` summed over every process of
    a torchrun job, times their number (DDP averages the processes' gradients, so the job follows
    the gradient of Σ total / Σ count, the mean over every example or token of the global batch
    however unevenly the processes share it); and whether every process's loss is finite, as a
    0-dim bool tensor on the device (nothing is read back). One all-reduce; without torchrun,
    ``total / count``."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    stats = torch.stack([count.to(total.device, torch.float32).reshape(()), (~torch.isfinite(total.detach())).float()])
    if world > 1:
        torch.distributed.all_reduce(stats)  # every rank must agree to skip, or DDP's all-reduce would hang
    return total / stats[0].clamp(min=1) * world, stats[1] == 0


def balanced_class_weights(labels, num_labels: int) -> torch.Tensor:
    """scikit-learn's "balanced" weights, n / (k · count_c): every class carries the same total weight
    in the loss. A class absent from ``labels`` gets weight 0 (nothing of it to weigh)."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=num_labels).double()
    present = int((counts > 0).sum())
    weights = torch.where(counts > 0, counts.sum() / (present * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights.float()


def _lr_lambda(total: int, warmup_frac: float):
    warm = max(1, int(round(total * warmup_frac))) if warmup_frac > 0 else 0

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return f


def training_step(
    model,
    batch: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]],
    optimizer,
    scheduler,
    *,
    task_type: str,
    max_grad_norm: float,
    precision: str = "fp32",
    class_weight: torch.Tensor | None = None,
    row_weight: torch.Tensor | list | None = None,
    lm_index: ResponseIndex | list | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """One optimisation step on ``batch`` (which holds ``labels``); returns the loss as a 0-dim
    tensor on the device, for the caller to read when it reports (reading it waits for the step).

    ``batch`` may be a list of micro-batches (gradient accumulation): one step for them all, each
    one's activations freed after its backward, and ``row_weight``/``lm_index`` then lists of
    theirs. The loss is normalised by the example (or response-token) count of the whole step, so
    the step equals one on the concatenated batch (dropout off) up to float rounding.

    ``class_weight`` weighs the cross-entropy of each class (e.g. :func:`balanced_class_weights`);
    ``row_weight`` (B,) each row, 0 for a filler row of an otherwise empty shard. Under torchrun
    the loss is the mean over the whole global batch (:func:`job_mean`). ``lm_index``: for a causal
    LM, :func:`adaptune.lm.causal_lm.response_index` of the labels, computed on the host.
    ``stats``: a dict that receives ``grad_norm`` (a device tensor) when clipping is on.

    Nothing in the step reads a device value back: a non-finite loss skips the update on the
    device (the fused AdamW's ``found_inf``, as with a gradient scaler: no weight, moment or step
    count changes; the schedule still advances), and the returned loss is that non-finite value.
    An optimizer without ``found_inf`` support reads the flag and skips the update on the host.
    """
    if isinstance(batch, list):
        loss, finite = _accumulate(model, batch, task_type, precision, class_weight, row_weight, lm_index)
    else:
        batch = dict(batch)
        labels = batch.pop("labels")
        loss, finite = job_mean(
            *_micro_loss(model, batch, labels, task_type, precision, class_weight, row_weight, lm_index)
        )
        if _skips_on_device(optimizer) or bool(finite):
            loss.backward()
    return _update(optimizer, scheduler, loss.detach(), finite, max_grad_norm, stats)


def _micro_loss(model, batch, labels, task_type, precision, class_weight, row_weight, lm_index):
    """The summed loss of one (micro-)batch (``labels`` popped from it) and what it sums over."""
    with autocast(labels.device, precision):
        if task_type == CAUSAL_LM:
            return lm_loss_sum(model, batch, labels, row_weight, lm_index)
        return loss_sum(forward_logits(model, batch), labels, task_type, class_weight, row_weight)


def _accumulate(model, micro, task_type, precision, class_weight, row_weights, lm_indexes):
    """Backward of every micro-batch, each divided by the whole step's count (summed over the
    micro-batches, and over torchrun's processes before the first backward); under DDP the
    gradients are all-reduced once, with the last. Returns the step's loss and finite flag."""
    n = len(micro)
    row_weights = row_weights if isinstance(row_weights, list) else [row_weights] * n
    lm_indexes = lm_indexes if isinstance(lm_indexes, list) else [None] * n
    # what the whole step sums over, before any backward: the examples, or the response tokens
    if task_type == CAUSAL_LM:
        lm_indexes = [
            i if i is not None else response_index(b["labels"], w) for b, w, i in zip(micro, row_weights, lm_indexes)
        ]
        counts = [i.count(b["labels"].device) for b, i in zip(micro, lm_indexes)]
    else:
        counts = [loss_count(b["labels"], task_type, w) for b, w in zip(micro, row_weights)]
    count = torch.stack(counts).sum()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world > 1:
        torch.distributed.all_reduce(count)
    bad = loss = torch.zeros((), device=count.device)
    for k, (batch, weight, index) in enumerate(zip(micro, row_weights, lm_indexes)):
        batch = dict(batch)
        labels = batch.pop("labels")
        sync = model.no_sync() if k < n - 1 and hasattr(model, "no_sync") else contextlib.nullcontext()
        with sync:
            total, _ = _micro_loss(model, batch, labels, task_type, precision, class_weight, weight, index)
            part = total / count.clamp(min=1) * world
            part.backward()
        bad = bad + (~torch.isfinite(total.detach())).float()
        loss = loss + part.detach()
    reg = fusion_regularization(getattr(model, "module", model))  # AdapterFusion's ||I - V||^2, once a step
    if reg is not None:
        reg.backward()
    if world > 1:
        torch.distributed.all_reduce(bad)
    return loss, bad == 0


def _update(optimizer, scheduler, loss, finite, max_grad_norm: float, stats: dict | None) -> torch.Tensor:
    """Clip, step (skipped on the device when ``finite`` is false), schedule, clear the gradients."""
    on_device = _skips_on_device(optimizer)
    if not on_device and not bool(finite):
        optimizer.zero_grad(set_to_none=True)
        return loss
    if max_grad_norm > 0:  # the optimizer's tensors are the trained ones (no walk over every module)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if stats is not None:
            stats["grad_norm"] = norm.detach()
    if on_device:
        before = optimizer.__dict__.get("found_inf")
        optimizer.found_inf = (~finite).float()
        try:
            optimizer.step()
        finally:
            if before is None:
                del optimizer.found_inf
            else:
                optimizer.found_inf = before
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _skips_on_device(optimizer) -> bool:
    """Whether ``optimizer.step`` honours ``found_inf`` (torch's fused Adam and AdamW do)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        g.get("fused") for g in optimizer.param_groups
    )


def make_optimizer(model, cfg: TrainConfig, total_steps: int):
    """AdamW over the trainable parameters and the paper's warm-up/linear-decay schedule."""
    optimizer = _optimizer(model, cfg)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, cfg.warmup))


def _optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # Decay matrices, not biases or norm gains (standard for BERT-style training).
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # torch's fused AdamW (one kernel over all tensors) where it exists: on a CPU torch otherwise
    # runs a Python loop over the tensors, 5-6 x slower for full fine-tuning of MiniLM and ~4 x for
    # an adapter set's hundred small tensors. Same update, up to float rounding.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_DTYPES for p in params) or None
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=fused)


_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
