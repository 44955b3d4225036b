"""The files of a run folder that the loop writes: ``config.json`` when the run starts, the adapter
(or the whole model) and the tokenizer when it ends."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adaptune.core.io import atomic_write_dir, save_adapter
from adaptune.env import quiet_transformers
from adaptune.training import checkpoint as ckpt
from adaptune.training.config import ADAPTER_NAME, TrainConfig


def write_artifacts(out: Path, model, tokenizer, cfg: TrainConfig, task: dict, adapter: str = ADAPTER_NAME) -> None:
    """Adapter ``adapter`` (or the full model), tokenizer and ``task.json``, each written atomically;
    an earlier copy is replaced."""
    with quiet_transformers():  # no "Writing model shards" bars
        if cfg.strategy == "adapters":
            save_adapter(model, adapter, out / "adapter", overwrite=True, extra=task)
        else:
            atomic_write_dir(out / "model", lambda p: model.save_pretrained(str(p)), overwrite=True)
        atomic_write_dir(out / "tokenizer", lambda p: tokenizer.save_pretrained(str(p)), overwrite=True)
    ckpt.atomic_write_text(out / "task.json", json.dumps(task, indent=2) + "\n")


def create_run_dir(out: Path, cfg: TrainConfig, **extra) -> None:
    """The run folder and its ``config.json``: the training options, the versions, and ``extra``."""
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
        **extra,
    }
    ckpt.atomic_write_text(out / "config.json", json.dumps(meta, indent=2) + "\n")
