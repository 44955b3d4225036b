"""One training loop for every strategy (Houlsby et al. 2019, §3 set-up).

Adapter tuning and the baselines (full, top-k, layer norms, head) differ only in which parameters
train (``trainable.py``); everything else — data order, optimiser, schedule, evaluation, the run
folder — is this one loop, so comparisons between them are fair.

Optimiser as in the paper: AdamW (weight decay 0.01 on matrices), linear warm-up over the first
10 % of steps then linear decay to zero, batch size 32. The best checkpoint on dev is kept.

Two objectives share the loop: classification / regression with a task head (encoders, and
decoders with a sequence-classification head), and causal language modelling on conversations
(``task_type="causal-lm"``, chosen automatically for chat data: :mod:`adaptune.lm.chat`,
:mod:`adaptune.lm.causal_lm`), where the loss covers only the response tokens and the base model's
held-out perplexity is measured before training for comparison.

A run folder holds ``config.json`` (the resolved configuration: enough to reproduce the run),
``metrics.json``, ``task.json`` (labels), ``tokenizer/`` and ``adapter/`` (or ``model/`` for the
baselines that change base weights). ``checkpoint/`` exists while the run is unfinished; ``resume``
continues from it and ends with bit-identical weights and metrics on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


from adaptune.training import checkpoint as ckpt
from adaptune.training.distributed import setup, teardown
from adaptune.errors import ConfigError
from adaptune.training.loop import _train

# The names callers import from here (the loop's parts live in their own modules).
from adaptune.models.loading import pick_device
from adaptune.training.prepared import _load_data
from adaptune.training.steps import (
    _loss,
    autocast,
    balanced_class_weights,
    build_model,
    evaluate,
    job_mean,
    loss_sum,
    make_optimizer,
    training_step,
)
from adaptune.training.config import ADAPTER_NAME, CAUSAL_LM, CLASS_WEIGHTS, COMPILE_MODES, DEFAULT_LR, TrainConfig

__all__ = [
    "ADAPTER_NAME",
    "CAUSAL_LM",
    "CLASS_WEIGHTS",
    "COMPILE_MODES",
    "DEFAULT_LR",
    "TrainConfig",
    "_load_data",
    "_loss",
    "autocast",
    "balanced_class_weights",
    "build_model",
    "evaluate",
    "job_mean",
    "loss_sum",
    "make_optimizer",
    "pick_device",
    "read_metrics",
    "train",
    "training_step",
]


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


def train(
    cfg: TrainConfig,
    output_dir: str | os.PathLike,
    *,
    resume: bool = False,
    quiet: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train one task on ``cfg`` and write the run folder ``output_dir``.

    Args:
        cfg: the run's configuration.
        output_dir: run folder; must not exist (or be empty) unless ``resume``.
        resume: continue the unfinished run in ``output_dir`` with its saved configuration.
        quiet: no progress bar or log lines.
        on_step: called with the step number after each optimisation step (progress reports, or a
            test that stops the process at a given step).

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
        return _train(cfg, out, resume, quiet, dd, on_step)
    finally:
        if dd.enabled:
            teardown()


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no metrics.json: it is not a finished run (resume it with --resume)")
    return ckpt.read_json(path)
