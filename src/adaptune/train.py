"""One training loop for every strategy (Houlsby et al. 2019, §3 set-up).

Adapter tuning and the baselines (full, top-k, layer norms, head) differ only in which parameters
train (``trainable.py``); everything else — data order, optimiser, schedule, evaluation, the run
folder — is this one loop, so comparisons between them are fair.

Optimiser as in the paper: AdamW (weight decay 0.01 on matrices), linear warm-up over the first
10 % of steps then linear decay to zero, batch size 32. The best checkpoint on dev is kept.

Two objectives share the loop: classification / regression with a task head (encoders, and
decoders with a sequence-classification head), and causal language modelling on conversations
(``task_type="causal-lm"``, chosen automatically for chat data: :mod:`adaptune.chat`,
:mod:`adaptune.causal_lm`), where the loss covers only the response tokens and the base model's
held-out perplexity is measured before training for comparison.

A run folder holds ``config.json`` (the resolved configuration: enough to reproduce the run),
``metrics.json``, ``task.json`` (labels), ``tokenizer/`` and ``adapter/`` (or ``model/`` for the
baselines that change base weights). ``checkpoint/`` exists while the run is unfinished; ``resume``
continues from it and ends with bit-identical weights and metrics on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from adaptune import checkpoint as ckpt
from adaptune import native
from adaptune.causal_lm import evaluate_lm, lm_loss_sum
from adaptune.config import PRESETS, AdapterConfig
from adaptune.data import bucket_batches, collate, encode, load_task_data
from adaptune.distributed import Dist, setup, teardown
from adaptune.errors import ConfigError, TrainingError
from adaptune.inject import active_adapter, add_adapter, set_active
from adaptune.io import atomic_write_dir, save_adapter
from adaptune.kernels import use_lean_kernels
from adaptune.layer_cache import FrozenBelow
from adaptune.metrics import METRICS, compute_metrics, default_positive, single_class_warning
from adaptune.models import (
    DEFAULT_MODEL,
    load_causal_lm,
    load_classifier,
    load_tokenizer,
    pick_device,
    quiet_transformers,
)
from adaptune.trainable import STRATEGIES, train_strategy

ADAPTER_NAME = "task"
CAUSAL_LM = "causal-lm"

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")  # TrainConfig.compile
CLASS_WEIGHTS = ("none", "balanced")  # TrainConfig.class_weights
# Learning rates that worked on the embedded reviews task with all-MiniLM-L6-v2 (see README):
# adapters and the small-parameter baselines want a much higher rate than full fine-tuning.
DEFAULT_LR = {"adapters": 1e-3, "full": 5e-5, "top-k": 1e-4, "layernorm": 1e-3, "head": 1e-3}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; written to ``config.json`` so the folder reproduces it.

    Data fields mirror :func:`adaptune.data.load_task_data`; adapter fields mirror
    :class:`adaptune.AdapterConfig`; ``lr=None`` takes the strategy's default from ``DEFAULT_LR``.
    ``frozen_dropout=False`` runs the frozen layers below the lowest trained one without dropout,
    and ``cache_frozen_layers`` then computes their outputs once (:mod:`adaptune.layer_cache`);
    ``lean_kernels`` applies :func:`adaptune.kernels.use_lean_kernels` whatever the strategy; ``None``
    (the default) means on for training on the CPU, off elsewhere (docs/lean-kernels.md).
    ``compile`` wraps the model for the training steps in ``torch.compile`` with that mode
    (``"default"``, ``"reduce-overhead"`` = CUDA graphs on a GPU, ``"max-autotune"``); evaluation
    runs the plain model. The first steps of each new batch shape pay for the compilation.
    """

    model: str = DEFAULT_MODEL
    data: str = "reviews"
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    task_type: str | None = None
    dev_file: str | None = None
    test_file: str | None = None
    glue_task: str | None = None
    dev_fraction: float = 0.1
    limit_train: int | None = None
    limit_eval: int | None = None
    strategy: str = "adapters"
    adapter: str = "houlsby"
    adapter_size: int = 64
    init_std: float = 1e-2
    adapter_layers: tuple[int, ...] | None = None
    train_layer_norms: bool = True
    train_embedding_norm: bool = True
    train_head: bool = True
    train_pooler: bool = True
    top_k: int | None = None
    epochs: int = 3
    batch_size: int = 32
    lr: float | None = None
    weight_decay: float = 0.01
    warmup: float = 0.1
    max_grad_norm: float = 1.0
    max_length: int = 128
    bucket: bool | None = None
    seed: int = 0
    eval_every: int | None = None
    checkpoint_every: int = 50
    device: str = "auto"
    precision: str = "fp32"
    eval_generate: int = 32
    frozen_dropout: bool = True
    cache_frozen_layers: bool = False
    lean_kernels: bool | None = None
    compile: str = "none"
    class_weights: str = "none"
    positive_label: str | None = None
    metric: str | None = None

    def __post_init__(self) -> None:
        if self.adapter_layers is not None:
            object.__setattr__(self, "adapter_layers", tuple(self.adapter_layers))
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.adapter not in PRESETS:
            raise ConfigError(f"unknown adapter placement {self.adapter!r}; choose one of {', '.join(PRESETS)}")
        if self.strategy == "top-k" and self.top_k is None:
            raise ConfigError("strategy 'top-k' needs --top-k K (the number of top layers to train)")
        for name in ("epochs", "batch_size", "max_length", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr is not None and not (0 < self.lr < 1):
            raise ConfigError(f"learning rate must be in (0, 1), got {self.lr}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.task_type not in (None, "classification", "regression", CAUSAL_LM):
            raise ConfigError(f"unknown task type {self.task_type!r}; use classification, regression or {CAUSAL_LM}")
        if self.eval_every is not None and self.eval_every < 0:
            raise ConfigError(f"eval_every must be 0 (after each epoch) or more, got {self.eval_every}")
        if self.eval_generate < 0:
            raise ConfigError(f"eval_generate must be 0 or more, got {self.eval_generate}")
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        if self.compile != "none" and self.cache_frozen_layers:
            raise ConfigError(
                "--compile and --cache-frozen-layers do not combine (the cache swaps modules per step); "
                "drop one of them"
            )
        if self.class_weights not in CLASS_WEIGHTS:
            raise ConfigError(f"class_weights must be one of {', '.join(CLASS_WEIGHTS)}, got {self.class_weights!r}")
        if self.metric is not None and self.metric not in {m for ms in METRICS.values() for m in ms}:
            known = ", ".join(f"{t}: {', '.join(ms)}" for t, ms in METRICS.items())
            raise ConfigError(f"unknown selection metric {self.metric!r}; choose one of ({known})")
        if self.cache_frozen_layers and self.frozen_dropout:
            raise ConfigError(
                "--cache-frozen-layers needs --no-frozen-dropout: kept outputs of the frozen lower layers "
                "equal recomputed ones only when those layers run without dropout"
            )

    @property
    def causal(self) -> bool:
        """Language modelling on conversations: asked for, or implied by chat data."""
        from adaptune.chat import is_chat_source

        return self.task_type == CAUSAL_LM or (self.task_type is None and is_chat_source(self.data))

    @property
    def bucketed(self) -> bool:
        """Length-bucketed training batches: ``bucket``, else on for causal LMs only. Batches sorted by
        length hold one class where length tells the class apart (plot summaries among review
        snippets), and adapters then left the majority class an epoch later (docs/quality.md)."""
        return self.bucket if self.bucket is not None else self.causal

    def lean_on(self, device: torch.device) -> bool:
        """Whether training on ``device`` uses the lean kernels: ``lean_kernels``, else on for the CPU
        (where they are the fastest path whose self-check passes) and off on other devices."""
        return self.lean_kernels if self.lean_kernels is not None else torch.device(device).type == "cpu"

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.strategy]

    def adapter_config(self) -> AdapterConfig:
        # A language model's output layer is pretrained vocabulary, not a task head: never copied.
        return AdapterConfig.preset(
            self.adapter,
            size=self.adapter_size,
            init_std=self.init_std,
            layers=self.adapter_layers,
            train_layer_norms=self.train_layer_norms,
            train_embedding_norm=self.train_embedding_norm,
            train_head=self.train_head and not self.causal,
            train_pooler=self.train_pooler,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adapter_layers"] = None if self.adapter_layers is None else list(self.adapter_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}")
        return cls(**d)


def build_model(cfg: TrainConfig, num_labels: int, device: torch.device | None = None):
    """The model for ``cfg``: base + fresh head, or the causal LM (+ the task adapter), with the strategy
    applied and, where :meth:`TrainConfig.lean_on` says so for ``device`` (default: ``cfg.device``),
    the lean kernels."""
    torch.manual_seed(cfg.seed)  # head and adapter init depend on the seed only
    if cfg.causal and cfg.strategy == "head":
        raise ConfigError(
            "strategy 'head' needs a task head; a causal LM has none (use adapters, full, top-k or layernorm)"
        )
    model = load_causal_lm(cfg.model) if cfg.causal else load_classifier(cfg.model, num_labels)
    if cfg.strategy == "adapters":
        add_adapter(model, ADAPTER_NAME, cfg.adapter_config())
    counts = train_strategy(model, cfg.strategy, k=cfg.top_k, train_pooler=cfg.train_pooler)
    if cfg.lean_on(pick_device(cfg.device) if device is None else device):  # every strategy alike (fair comparisons)
        use_lean_kernels(model)
    return model, counts


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
    if task_type == "regression":
        each = F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction="none")
    else:
        each = F.cross_entropy(logits.float(), labels, weight=class_weight, reduction="none")
    if row_weight is None:
        return each.sum(), torch.tensor(float(each.numel()), device=each.device)
    return (each * row_weight).sum(), (row_weight != 0).sum().float()


def job_mean(total: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The one reduction of the training loss: ``total`` over ``count`` summed over every process of
    a torchrun job, times their number (DDP averages the processes' gradients, so the job follows
    the gradient of Σ total / Σ count, the mean over every example or token of the global batch
    however unevenly the processes share it); and whether every process's loss is finite. One
    all-reduce; without torchrun, ``total / count``."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    stats = torch.stack([count.to(total.device, torch.float32).reshape(()), (~torch.isfinite(total.detach())).float()])
    if world > 1:
        torch.distributed.all_reduce(stats)  # every rank must agree to skip, or DDP's all-reduce would hang
    return total / stats[0].clamp(min=1) * world, bool(stats[1] == 0)


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


def autocast(device: torch.device, precision: str):
    """bf16 autocast for ``precision="bf16"`` (weights stay fp32); a no-op context for fp32."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bf16; use --precision fp32")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def training_step(
    model,
    batch: dict[str, torch.Tensor],
    optimizer,
    scheduler,
    *,
    task_type: str,
    max_grad_norm: float,
    precision: str = "fp32",
    class_weight: torch.Tensor | None = None,
    row_weight: torch.Tensor | None = None,
) -> float:
    """One optimisation step on ``batch`` (which holds ``labels``); returns the loss.

    ``class_weight`` weighs the cross-entropy of each class (e.g. :func:`balanced_class_weights`);
    ``row_weight`` (B,) each row, 0 for a filler row of an otherwise empty shard. Under torchrun
    the loss is the mean over the whole global batch (:func:`job_mean`).
    A non-finite loss is returned without touching the weights, for the caller to report.
    """
    batch = dict(batch)
    labels = batch.pop("labels")
    with autocast(labels.device, precision):
        if task_type == CAUSAL_LM:
            total, count = lm_loss_sum(model, batch, labels, row_weight)
        else:
            total, count = loss_sum(model(**batch).logits, labels, task_type, class_weight, row_weight)
    loss, finite = job_mean(total, count)
    if not finite:
        return loss.item() if not torch.isfinite(loss) else float("nan")
    loss.backward()
    if max_grad_norm > 0:  # the optimizer's tensors are the trained ones (no walk over every module)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


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


@torch.no_grad()
def evaluate(
    model,
    encoded: list[dict],
    *,
    task_type: str,
    num_labels: int,
    batch_size: int,
    pad_id: int,
    device,
    dd: Dist | None = None,
    precision: str = "fp32",
    positive: int = 1,
) -> tuple[dict, np.ndarray]:
    """Metrics on an encoded split, and the raw outputs (probabilities, or scores for regression).

    ``positive`` is the class whose F1 a two-class task reports (see :mod:`adaptune.metrics`).

    Under torchrun (``dd``) each rank scores every N-th example and the outputs are gathered, so
    every rank returns the same metrics.
    """
    was_training = model.training
    model.eval()
    mine = list(range(len(encoded))) if dd is None else dd.shard(list(range(len(encoded))))
    order = bucket_batches([len(encoded[i]["input_ids"]) for i in mine], batch_size, shuffle=False)
    scored: list[tuple[int, np.ndarray]] = []
    for idx in order:
        idx = [mine[i] for i in idx]
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad_id).items()}
        batch.pop("labels")
        with autocast(torch.device(device), precision):
            logits = model(**batch).logits.float()
        out = logits.squeeze(-1) if task_type == "regression" else logits.softmax(-1)
        scored += zip(idx, out.cpu().numpy())
    if dd is not None:
        scored = [pair for part in dd.gather(scored) for pair in part]
    outputs: list[np.ndarray | None] = [None] * len(encoded)
    for i, row in scored:
        outputs[i] = row
    model.train(was_training)
    outs = np.stack(outputs) if outputs else np.zeros((0,))
    labels = np.array([e["label"] for e in encoded])
    preds = outs if task_type == "regression" else outs.argmax(-1)
    return compute_metrics(task_type, preds, labels, num_labels, positive), outs


def _check_run_dir(out: Path, cfg: TrainConfig, resume: bool) -> TrainConfig:
    """The configuration to run: ``cfg``, or the saved one when resuming. Writes nothing."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder; choose another --output")
    saved = out / "config.json"
    if resume:
        if not saved.is_file():
            raise ConfigError(f"nothing to resume in {out}: it has no config.json; start the run without --resume")
        return TrainConfig.from_dict(ckpt.read_json(saved, "train"))
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"run folder {out} already exists; pass --resume to continue it or choose another --output")
    return cfg


def _create_run_dir(out: Path, cfg: TrainConfig) -> None:
    import adaptune
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "train": cfg.to_dict(),
        "versions": {
            "adaptune": adaptune.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    ckpt.atomic_write_text(out / "config.json", json.dumps(meta, indent=2) + "\n")


def train(
    cfg: TrainConfig, output_dir: str | os.PathLike, *, resume: bool = False, quiet: bool = False
) -> dict[str, Any]:
    """Train one task on ``cfg`` and write the run folder ``output_dir``.

    Args:
        cfg: the run's configuration.
        output_dir: run folder; must not exist (or be empty) unless ``resume``.
        resume: continue the unfinished run in ``output_dir`` with its saved configuration.
        quiet: no progress bar or log lines.

    Returns:
        The content of ``metrics.json``: best dev and test metrics, parameter counts, history.

    Raises:
        ConfigError, DataError: bad options or data (nothing is written for bad data).
        TrainingError: the loss became NaN/inf (the last checkpoint stays for inspection).
    """
    out = Path(output_dir)
    cfg = _check_run_dir(out, cfg, resume)
    if resume and (out / "metrics.json").is_file():
        return ckpt.read_json(out / "metrics.json")
    dd = setup(cfg.device)
    try:
        return _train(cfg, out, resume, quiet, dd)
    finally:
        if dd.enabled:
            teardown()


def _train(cfg: TrainConfig, out: Path, resume: bool, quiet: bool, dd: Dist) -> dict[str, Any]:
    # Data, tokenizer and model are all checked before anything is written to disk.
    tokenizer = load_tokenizer(cfg.model)
    data = _prepare(cfg, tokenizer)
    enc = data.enc
    device = dd.device
    random.seed(cfg.seed)
    model, counts = build_model(cfg, data.num_labels, device)  # the same initial weights on every rank
    if cfg.lean_on(device) and device.type == "cpu" and native.library() is None:
        data.notes.append(f"C kernels not available ({native.why_not()}): the lean kernels run in torch")
    model.to(device).train()
    lengths = [len(e["input_ids"]) for e in enc["train"]]
    # dropout off (and the optional cache) below the lowest trained layer: checked before writing anything
    frozen = None if cfg.frozen_dropout else FrozenBelow(model, cache=cfg.cache_frozen_layers, lengths=lengths)
    if frozen is not None:
        data.notes.append(frozen.describe())
    if dd.enabled:
        torch.manual_seed(cfg.seed + 7919 * dd.rank)  # own dropout masks per rank
    dd.barrier()  # every rank has checked the run folder before rank 0 creates it
    if not resume and dd.main:
        _create_run_dir(out, cfg)
    dd.barrier()
    net = model
    if dd.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # only parameters that train are synchronised; the frozen base is never all-reduced
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile != "none":
        net = torch.compile(net, mode=None if cfg.compile == "default" else cfg.compile)
    quiet = quiet or not dd.main
    log = (lambda *a: None) if quiet else (lambda msg: tqdm.write(msg))
    for note in data.notes:
        log(f"note: {note}")
    pad_id = tokenizer.pad_token_id
    class_weight = None
    if cfg.class_weights == "balanced" and data.task_type == "classification":
        class_weight = balanced_class_weights([e["label"] for e in enc["train"]], data.num_labels).to(device)
        log(
            "note: class weights "
            + ", ".join(f"{n} {w:.3f}" for n, w in zip(data.task["label_names"], class_weight.tolist()))
        )

    def batches_for(epoch: int) -> list[list[int]]:
        if cfg.bucketed:
            return bucket_batches(lengths, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch)
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        perm = torch.randperm(len(lengths), generator=g).tolist()
        return [perm[i : i + cfg.batch_size] for i in range(0, len(perm), cfg.batch_size)]

    per_epoch = len(batches_for(0))
    total = per_epoch * cfg.epochs
    optimizer, scheduler = make_optimizer(model, cfg, total)
    ck_dir = out / "checkpoint"
    progress = {
        "step": 0,
        "epoch": 0,
        "batch": 0,
        "history": [],
        "best": None,
        "best_step": None,
        "train_seconds": 0.0,
    }
    if resume:
        restored = ckpt.load_checkpoint(ck_dir, model, optimizer, scheduler, rank=dd.rank)
        if restored is not None:
            progress = restored
            log(f"resumed {out} at step {progress['step']}/{total}")
        else:  # said, and kept in metrics.json: the run stopped before its first checkpoint
            data.notes.append(
                f"no checkpoint in {ck_dir}: the run stopped before its first one; started again from step 0"
            )
            log(f"note: {data.notes[-1]}")
    best_state = ckpt.load_best(ck_dir) if progress["best"] is not None else None
    dd_or_none = dd if dd.enabled else None

    def score(split: str) -> dict:
        if data.task_type == CAUSAL_LM:
            return evaluate_lm(
                model,
                enc[split],
                batch_size=cfg.batch_size * 2,
                pad_id=pad_id,
                device=device,
                dd=dd_or_none,
                autocast_ctx=lambda: autocast(device, cfg.precision),
            )
        return evaluate(
            model,
            enc[split],
            task_type=data.task_type,
            num_labels=data.num_labels,
            batch_size=cfg.batch_size * 2,
            pad_id=pad_id,
            device=device,
            dd=dd_or_none,
            precision=cfg.precision,
            positive=data.positive,
        )[0]

    if data.task_type == CAUSAL_LM and "base" not in progress:
        progress["base"] = _score_base(cfg, model, data, score, tokenizer, device, dd)
        base_dev = progress["base"]["dev"]
        log(
            f"base model: dev perplexity {base_dev['perplexity']:.2f}, token accuracy {base_dev['token_accuracy']:.4f}"
        )

    def run_eval() -> None:
        nonlocal best_state
        metrics = score("dev")
        progress["history"].append({"step": progress["step"], "epoch": progress["epoch"], **metrics})
        value = metrics[data.metric]
        if progress["best"] is None or (
            value > progress["best"] if data.higher_is_better else value < progress["best"]
        ):
            progress["best"], progress["best_step"] = value, progress["step"]
            best_state = ckpt.trainable_state(model)
            if dd.main:
                ckpt.save_best(ck_dir, best_state)
        log(
            f"step {progress['step']}: dev {data.metric} {value:.4f} (best {progress['best']:.4f} at step "
            f"{progress['best_step']})"
        )

    kill_at = int(os.environ.get("ADAPTUNE_DEBUG_SIGKILL_AT_STEP", "0"))  # for the resume tests only
    if os.environ.get("ADAPTUNE_DEBUG_SIGKILL_RANK", str(dd.rank)) != str(dd.rank):
        kill_at = 0
    bar = tqdm(
        total=total, initial=progress["step"], disable=quiet, unit="step", dynamic_ncols=True, desc=f"{cfg.strategy}"
    )
    t0 = time.perf_counter() - progress["train_seconds"]
    while progress["epoch"] < cfg.epochs:
        order = batches_for(progress["epoch"])
        while progress["batch"] < len(order):
            idx = dd.shard(order[progress["batch"]])
            # an empty shard runs one example at weight 0: every rank takes part in DDP's all-reduce
            row_weight = None if idx else torch.zeros(1, device=device)
            idx = idx or order[progress["batch"]][:1]
            batch = {k: v.to(device) for k, v in collate([enc["train"][i] for i in idx], pad_id).items()}
            with frozen.step(idx) if frozen is not None else contextlib.nullcontext():
                loss = training_step(
                    net,
                    batch,
                    optimizer,
                    scheduler,
                    task_type=data.task_type,
                    max_grad_norm=cfg.max_grad_norm,
                    precision=cfg.precision,
                    class_weight=class_weight,
                    row_weight=row_weight,
                )
            if not math.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss} at step {progress['step'] + 1}; lower the learning rate "
                    f"(now {cfg.learning_rate:g}) or check the labels"
                )
            progress["step"] += 1
            progress["batch"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
            if kill_at and progress["step"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if cfg.eval_every and progress["step"] % cfg.eval_every == 0:
                run_eval()
            if progress["step"] % cfg.checkpoint_every == 0:
                progress["train_seconds"] = time.perf_counter() - t0
                _checkpoint(dd, ck_dir, model, optimizer, scheduler, progress)
        progress["epoch"] += 1
        progress["batch"] = 0
        if not (cfg.eval_every and progress["step"] % cfg.eval_every == 0):
            run_eval()
        progress["train_seconds"] = time.perf_counter() - t0
        _checkpoint(dd, ck_dir, model, optimizer, scheduler, progress)
    bar.close()
    train_seconds = time.perf_counter() - t0

    # Back to the best weights on dev, then the final numbers.
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in best_state.items():
            params[name].copy_(value)
    # the dev metrics of those weights were measured when they were kept: no second pass
    best_entry = next(h for h in progress["history"] if h["step"] == progress["best_step"])
    dev_metrics = {k: v for k, v in best_entry.items() if k not in ("step", "epoch")}
    test_metrics = score("test") if "test" in enc else None
    if data.task_type == CAUSAL_LM and cfg.eval_generate and test_metrics is not None:
        test_metrics["exact_match"] = _exact_match(model, data, tokenizer, cfg, device, dd)
    result = {
        "task": data.description,
        "strategy": cfg.strategy,
        "metric": data.metric,
        "dev": dev_metrics,
        "test": test_metrics,
        "best_step": progress["best_step"],
        "steps": total,
        "params": {"trainable": counts.trainable, "base": counts.base, "percent_trained": counts.percent},
        "train_seconds": round(train_seconds, 2),
        "examples_per_second": round(len(enc["train"]) * cfg.epochs / max(train_seconds, 1e-9), 2),
        "processes": dd.world,
        "history": progress["history"],
        "notes": data.notes,
    }
    if data.task_type == "classification":
        result["positive_label"] = data.task.get("positive_label")
        result["warnings"] = [
            f"{split}: {w}"
            for split, m in (("dev", dev_metrics), ("test", test_metrics))
            if m is not None and (w := single_class_warning(m)) is not None
        ]
    if "base" in progress:
        result["base"] = progress["base"]
    task = data.task
    if dd.main:
        _write_artifacts(out, model, tokenizer, cfg, task)
        ckpt.atomic_write_text(out / "task.json", json.dumps(task, indent=2) + "\n")
        ckpt.atomic_write_text(
            out / "metrics.json", json.dumps(result, indent=2) + "\n"
        )  # last: marks the run finished
        shutil.rmtree(ck_dir, ignore_errors=True)
    dd.barrier()
    return result


def _checkpoint(dd: Dist, folder: Path, model, optimizer, scheduler, progress: dict) -> None:
    """Rank 0 writes the state, with every rank's RNG; the others wait until it is complete."""
    rngs = dd.gather(torch.get_rng_state())
    if dd.main:
        ckpt.save_checkpoint(folder, model, optimizer, scheduler, progress, rank_rng=rngs if dd.enabled else None)
    dd.barrier()


@dataclass
class _Prepared:
    """A task ready for the loop: encoded splits and how to judge them."""

    enc: dict[str, list[dict]]
    task_type: str
    metric: str
    higher_is_better: bool
    num_labels: int
    description: str
    notes: list[str]
    task: dict[str, Any]  # written to task.json (and beside the adapter)
    raw: Any = None
    positive: int = 1  # the class a two-class task reports the F1 of


def _prepare(cfg: TrainConfig, tokenizer) -> _Prepared:
    """Load and encode the data of ``cfg`` for its objective (classification/regression or causal LM)."""
    if cfg.causal:
        from adaptune.chat import encode_conversations, has_chat_template

        if cfg.metric is not None or cfg.positive_label is not None or cfg.class_weights != "none":
            raise ConfigError(
                "--metric, --positive-label and --class-weights apply to classification and regression "
                "tasks; a causal LM is selected on its dev loss"
            )

        chat = _load_data(cfg)
        enc, notes = {}, list(chat.notes)
        for name in ("train", "dev", "test"):
            enc[name], dropped = encode_conversations(getattr(chat, name), tokenizer, cfg.max_length)
            if dropped:
                notes.append(
                    f"{name}: dropped {dropped} conversations with no response token left within {cfg.max_length} "
                    "tokens"
                )
            if not enc[name]:
                raise ConfigError(f"no {name} conversation fits in --max-length {cfg.max_length}; raise it")
        template = (
            "the model's chat template"
            if has_chat_template(tokenizer)
            else "a plain User:/Assistant: layout (no chat template)"
        )
        notes.append(f"conversations rendered with {template}; loss on response tokens only")
        task = {
            "task_type": CAUSAL_LM,
            "metric": "loss",
            "max_length": cfg.max_length,
            "chat_template": has_chat_template(tokenizer),
        }
        return _Prepared(enc, CAUSAL_LM, "loss", False, 0, chat.description, notes, task, raw=chat)
    data = _load_data(cfg)
    enc = {
        name: encode(split, tokenizer, cfg.max_length)
        for name, split in (("train", data.train), ("dev", data.dev), ("test", data.test))
        if split is not None
    }
    num_labels = 1 if data.task_type == "regression" else len(data.label_names)
    metric = _selection_metric(cfg, data.task_type, data.metric, num_labels)
    positive = _positive_class(cfg, data, num_labels)
    task = {
        "task_type": data.task_type,
        "label_names": data.label_names,
        "metric": metric,
        "max_length": cfg.max_length,
        "text_pair": data.train.text_pairs is not None,
    }
    if num_labels == 2:
        task["positive_label"] = data.label_names[positive]
    return _Prepared(
        enc,
        data.task_type,
        metric,
        metric != "mse",
        num_labels,
        data.description,
        data.notes,
        task,
        raw=data,
        positive=positive,
    )


def _selection_metric(cfg: TrainConfig, task_type: str, default: str, num_labels: int) -> str:
    """The dev metric that picks the best checkpoint: ``cfg.metric``, else the task's own (GLUE's
    official one, else macro-F1 for classification)."""
    if cfg.metric is None:
        return default
    if cfg.metric not in METRICS[task_type] or (cfg.metric == "f1" and num_labels != 2):
        allowed = [m for m in METRICS[task_type] if m != "f1" or num_labels == 2]
        raise ConfigError(
            f"--metric {cfg.metric} does not apply to this {task_type} task; choose one of {', '.join(allowed)}"
        )
    return cfg.metric


def _positive_class(cfg: TrainConfig, data, num_labels: int) -> int:
    """Index of the positive class of a two-class task: ``--positive-label``, else the source's own
    (GLUE: class 1), else the minority class of the training labels."""
    if cfg.positive_label is not None:
        if num_labels != 2:
            raise ConfigError(
                f"--positive-label applies to two-class tasks; this one has {num_labels} "
                f"{'classes' if data.task_type == 'classification' else '(a regression)'}"
            )
        if cfg.positive_label not in data.label_names:
            raise ConfigError(
                f"--positive-label {cfg.positive_label!r} is not a label of this task; "
                f"its labels are {', '.join(data.label_names)}"
            )
        return data.label_names.index(cfg.positive_label)
    if num_labels != 2:
        return 1
    if data.positive is not None and data.positive in data.label_names:
        return data.label_names.index(data.positive)
    return default_positive(data.train.labels, 2)


def _score_base(cfg: TrainConfig, model, data: _Prepared, score, tokenizer, device, dd: Dist) -> dict:
    """The untrained model's dev and test numbers (for adapter tuning: with the adapter switched off)."""
    name = active_adapter(model)
    set_active(model, None)
    try:
        out = {"dev": score("dev"), "test": score("test")}
        if cfg.eval_generate:
            out["test"]["exact_match"] = _exact_match(model, data, tokenizer, cfg, device, dd)
    finally:
        if name is not None:
            set_active(model, name)
    return out


def _exact_match(model, data: _Prepared, tokenizer, cfg: TrainConfig, device, dd: Dist) -> float:
    """Greedy replies to the first ``eval_generate`` test conversations, compared with the references."""
    from adaptune.generate import exact_match

    convs = data.raw.test[: cfg.eval_generate]
    mine = dd.shard(list(range(len(convs))))
    share = exact_match(model, tokenizer, [convs[i] for i in mine], device=device) if mine else 0.0
    parts = dd.gather((share * len(mine), len(mine)))
    return sum(p[0] for p in parts) / max(1, sum(p[1] for p in parts))


def _load_data(cfg: TrainConfig):
    if cfg.causal:
        from adaptune.chat import load_chat_data

        return load_chat_data(
            cfg.data,
            dev_file=cfg.dev_file,
            test_file=cfg.test_file,
            dev_fraction=cfg.dev_fraction,
            seed=cfg.seed,
            limit_train=cfg.limit_train,
            limit_eval=cfg.limit_eval,
        )
    return load_task_data(
        cfg.data,
        text_column=cfg.text_column,
        text_pair_column=cfg.text_pair_column,
        label_column=cfg.label_column,
        task_type=cfg.task_type,
        dev_file=cfg.dev_file,
        test_file=cfg.test_file,
        glue_task=cfg.glue_task,
        dev_fraction=cfg.dev_fraction,
        seed=cfg.seed,
        limit_train=cfg.limit_train,
        limit_eval=cfg.limit_eval,
    )


def _write_artifacts(out: Path, model, tokenizer, cfg: TrainConfig, task: dict) -> None:
    """Adapter (or full model) and tokenizer, each written atomically; an earlier copy is replaced."""
    with quiet_transformers():  # no "Writing model shards" bars
        if cfg.strategy == "adapters":
            save_adapter(model, ADAPTER_NAME, out / "adapter", overwrite=True, extra=task)
        else:
            atomic_write_dir(out / "model", lambda p: model.save_pretrained(str(p)), overwrite=True)
        atomic_write_dir(out / "tokenizer", lambda p: tokenizer.save_pretrained(str(p)), overwrite=True)


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no metrics.json: it is not a finished run (resume it with --resume)")
    return ckpt.read_json(path)
