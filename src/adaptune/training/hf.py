"""Training an adapter with the Hugging Face ``Trainer``, for pipelines built on it.

Add the adapter and pick what trains as usual (:func:`adaptune.add_adapter`,
:func:`adaptune.train_strategy`), give the model to ``transformers.Trainer`` (with
``save_strategy="no"``, or its checkpoints hold the whole base), and add
:class:`AdapterRunCallback`: when training ends it writes a run folder of its own kind, the
adapter (a few MB) with the files ``adaptune predict``, ``eval``, ``serve`` and ``info`` read.

Example::

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    add_adapter(model, "adapter", "houlsby")
    train_strategy(model, "adapters")
    callback = AdapterRunCallback("runs/sst2-trainer", base=base, tokenizer=tok, label_names=["neg", "pos"])
    Trainer(model=model, args=TrainingArguments("tmp", save_strategy="no"), train_dataset=ds,
            data_collator=DataCollatorWithPadding(tok), callbacks=[callback]).train()
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from transformers import TrainerCallback

from adaptune.errors import ConfigError
from adaptune.training.config import TrainConfig
from adaptune.training.run_folder import create_run_dir, write_artifacts


class AdapterRunCallback(TrainerCallback):
    """Writes ``out`` as an adaptune run folder when ``Trainer.train`` ends (on the main process).

    Args:
        out: the run folder to write (must not exist yet).
        base: the base model's name or folder (what the adapter is loaded onto).
        tokenizer: the tokenizer the model was trained with.
        label_names: class names in label-id order, or None for regression (one output).
        max_length: the inputs' truncation length at prediction time.
        text_pair: whether inputs are pairs of texts.
        adapter: the name the adapter has on the model (default: the active one, or the only one).
    """

    def __init__(
        self,
        out: str | os.PathLike,
        *,
        base: str,
        tokenizer,
        label_names: list[str] | None,
        max_length: int = 128,
        text_pair: bool = False,
        adapter: str | None = None,
    ) -> None:
        self.out = Path(out)
        if self.out.exists():
            raise ConfigError(f"{self.out} already exists; pass another folder for the run")
        self.base, self.tokenizer, self.adapter = base, tokenizer, adapter
        regression = label_names is None
        self.task = {
            "task_type": "regression" if regression else "classification",
            "label_names": None if regression else list(label_names),
            "metric": "spearman" if regression else "macro_f1",
            "max_length": max_length,
            "text_pair": text_pair,
        }

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        unwrapped = getattr(model, "module", model)
        sets = unwrapped.adaptune.sets
        name = self.adapter or unwrapped.adaptune.active
        if not isinstance(name, str):
            if len(sets) != 1:
                raise ConfigError(f"the model has adapters {list(sets)}: name the one to save with adapter=")
            name = next(iter(sets))
        aset = sets[name]
        cfg = TrainConfig(model=self.base, adapter_size=aset.config.size, epochs=max(1, round(args.num_train_epochs)))
        trainer = {"global_step": state.global_step, "adapter_config": dataclasses.asdict(aset.config)}
        create_run_dir(self.out, cfg, trainer=trainer)
        write_artifacts(self.out, unwrapped, self.tokenizer, cfg, self.task, adapter=name)
