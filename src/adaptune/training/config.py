"""A training run's configuration: :class:`TrainConfig`, written to a run folder's ``config.json``, and
the defaults it draws on (learning rates per strategy, the task adapter's name)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from adaptune.core.config import PRESETS, AdapterConfig
from adaptune.errors import ConfigError
from adaptune.data.metrics import METRICS
from adaptune.data.tasks import TASK_TYPES
from adaptune.models.loading import (
    DEFAULT_MODEL,
)
from adaptune.core.trainable import STRATEGIES
from adaptune.models.quantize import QUANTIZE

ADAPTER_NAME = "task"


CAUSAL_LM = "causal-lm"

# the kind of head a task type's model has (models.loading.load_classifier); "sequence" otherwise
HEADS = {"token-classification": "token", "multiple-choice": "choice", "question-answering": "qa"}


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
    and ``cache_frozen_layers`` then computes their outputs once (:mod:`adaptune.training.layer_cache`);
    ``lean_kernels`` applies :func:`adaptune.cpu.kernels.use_lean_kernels` whatever the strategy; ``None``
    (the default) means on for training on the CPU, off elsewhere (docs/lean-kernels.md).
    ``compile`` wraps the model for the training steps in ``torch.compile`` with that mode
    (``"default"``, ``"reduce-overhead"`` = CUDA graphs on a GPU, ``"max-autotune"``); evaluation
    runs the plain model. The first steps of each new batch shape pay for the compilation.
    ``quantize`` keeps the frozen base's linear layers in int8 or int4 and its embedding in int8
    (:mod:`adaptune.models.quantize`; with ``strategy="adapters"`` only);
    ``gradient_checkpointing`` recomputes each layer's activations in the backward pass;
    ``grad_accum`` splits each batch of ``batch_size`` into that many micro-batches, one optimiser
    step for them all; ``early_stop`` stops after that many evaluations without a better dev metric;
    ``log_dir`` writes TensorBoard event files there (``log.jsonl`` in the run folder is always written).
    """

    model: str = DEFAULT_MODEL
    data: str = "reviews"
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    task_type: str | None = None
    label_delimiter: str = ","
    doc_stride: int = 128
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
    fuse: tuple[str, ...] | None = None
    head_on: str | None = None
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
    quantize: str = "none"
    gradient_checkpointing: bool = False
    grad_accum: int = 1
    early_stop: int = 0
    log_dir: str | None = None

    def __post_init__(self) -> None:
        if self.adapter_layers is not None:
            object.__setattr__(self, "adapter_layers", tuple(self.adapter_layers))
        if self.fuse is not None:
            if isinstance(self.fuse, str) or len(self.fuse) < 2:
                raise ConfigError("fuse needs at least two adapter runs (or adapter folders) to fuse")
            object.__setattr__(self, "fuse", tuple(str(f) for f in self.fuse))
            if self.strategy != "adapters":
                raise ConfigError(
                    f"fusing adapters trains a fusion (strategy 'adapters'), not strategy {self.strategy!r}"
                )
        if self.head_on is not None and (self.fuse is not None or self.strategy != "adapters"):
            raise ConfigError(
                "head_on trains a new head on one frozen adapter: not with fuse, and with strategy 'adapters'"
            )
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.adapter not in PRESETS:
            raise ConfigError(f"unknown adapter placement {self.adapter!r}; choose one of {', '.join(PRESETS)}")
        if self.strategy == "top-k" and self.top_k is None:
            raise ConfigError("strategy 'top-k' needs --top-k K (the number of top layers to train)")
        for name in ("epochs", "batch_size", "max_length", "checkpoint_every", "doc_stride"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr is not None and not (0 < self.lr < 1):
            raise ConfigError(f"learning rate must be in (0, 1), got {self.lr}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.task_type not in (None, *TASK_TYPES, CAUSAL_LM):
            raise ConfigError(f"unknown task type {self.task_type!r}; use {', '.join(TASK_TYPES)} or {CAUSAL_LM}")
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
        if self.quantize not in QUANTIZE:
            raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.quantize != "none" and self.strategy != "adapters":
            raise ConfigError(
                f"--quantize keeps the frozen base quantised and saves only the adapter; strategy "
                f"{self.strategy!r} trains or saves base weights (use --strategy adapters)"
            )
        if self.grad_accum < 1 or self.grad_accum > self.batch_size:
            raise ConfigError(
                f"grad_accum must be between 1 and the batch size ({self.batch_size}), got {self.grad_accum}"
            )
        if self.early_stop < 0:
            raise ConfigError(f"early_stop must be 0 (off) or a number of evaluations, got {self.early_stop}")
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
        from adaptune.lm.chat import is_chat_source

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
        d["fuse"] = None if self.fuse is None else list(self.fuse)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}")
        return cls(**d)
