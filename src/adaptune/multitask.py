"""Several adapter runs on one shared base model in memory, each input naming its task: the
library behind ``adaptune serve`` and ``adaptune predict --also``.

Classification, multi-label and regression rows of all tasks run as one mixed batch (each row
through its own adapter and head copy: :func:`adaptune.set_active` with one name per row). Tasks of
another head (token classification, extractive QA, multiple choice) and AdapterFusion runs run
through the same backbone a task at a time, under a head of their own class
(:func:`adaptune.models.views.task_view`): still one base in memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from adaptune.answers import answer
from adaptune.core.inject import get_container
from adaptune.core.inject import _NAME, remove_adapter, set_active
from adaptune.core.io import adapter_tensors, load_adapter, read_adapter_config
from adaptune.data.loading import Split, bucket_batches, collate, encode
from adaptune.errors import ConfigError, DataError, NameConflict
from adaptune.models.loading import load_classifier, load_tokenizer
from adaptune.models.views import TaskView, task_view
from adaptune.runs import _head, _num_outputs, _row, name_runs, read_run
from adaptune.training.steps import scores
from adaptune.training.train import pick_device

__all__ = ["MultiTaskPredictor"]


class MultiTaskPredictor:
    """Several adapter runs on one shared base model: each text names its task.

    The base is loaded once; every run adds its adapter, layer-norm and head copies (heads may
    have different numbers of labels). A batch whose rows belong to different tasks runs in one
    forward pass; each row's result equals that of its own run's :class:`adaptune.predict.Predictor`
    up to float rounding. Token-classification, question-answering, multiple-choice and fusion
    runs are served too, each task's rows as a batch of their own through the shared base.

    Args:
        runs: task name -> run folder, or a list of folders (see :func:`adaptune.runs.name_runs`).
        device: ``"auto"``, ``"cpu"`` or ``"cuda[:i]"``.
        base: the base model to load instead of the one the first run names (e.g. a local copy);
            every adapter is checked against it by its weight fingerprint.

    Raises:
        ConfigError: a folder is not a finished adapter run (with a head of its own), or two
            tasks share a name.
        AdapterFileError: an adapter does not fit the base model (runs trained on another base
            are refused by its weight fingerprint).

    Example:
        >>> p = MultiTaskPredictor({"sentiment": "runs/reviews", "topic": "runs/topics"})
        >>> [r["label"] for r in p.predict(["Tasty!", "Stock prices fell"], ["sentiment", "topic"])]
        ['great', 'business']
    """

    def __init__(
        self,
        runs: dict[str, str | os.PathLike] | list[str | os.PathLike],
        device: str = "auto",
        base: str | None = None,
    ) -> None:
        if not isinstance(runs, dict):
            runs = name_runs(runs)
        if not runs:
            raise ConfigError("no runs given: pass at least one run folder")
        configs = {name: _read_servable(Path(folder))[0] for name, folder in runs.items()}
        first = next(iter(runs))
        self.device = pick_device(device)
        self.tokenizer = load_tokenizer(str(Path(runs[first]) / "tokenizer"))
        self.base = base or configs[first].model  # another copy of the base (checked by fingerprint)
        self.model = load_classifier(self.base, 2).to(self.device).eval()
        self.tasks: dict[str, dict[str, Any]] = {}
        self.views: dict[str, TaskView] = {}  # tasks that run a batch of their own
        self._sha: dict[str, str | None] = {}  # adapter on the model -> its weights' checksum
        for name, folder in runs.items():
            self.add_run(name, folder)

    def add_run(self, name: str, folder: str | os.PathLike) -> None:
        """Serve one more run as task ``name``, checked as strictly as at start (a finished adapter
        run with a head of its own, whose adapter fits this base); nothing changes if it fails.

        Raises:
            ConfigError: the name is taken or unusable, or the folder is not a finished adapter run.
            AdapterFileError: the adapter does not fit the base (another base, a damaged file).
        """
        folder = Path(folder)
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"task name {name!r} is not usable: use letters, digits, '_' and '-'")
        if name in self.tasks:
            raise NameConflict(f"a task named {name!r} is already served; unload it first or pick another name")
        _, task = _read_servable(folder)
        meta = read_adapter_config(folder / "adapter")
        if name in self._sha:  # an adapter a served fusion brought: the same one can be served as a task
            if meta.get("sha256") is None or meta.get("sha256") != self._sha[name] or _head(task) != "sequence":
                raise NameConflict(
                    f"a served fusion uses another adapter named {name!r}; "
                    "serve this run under another name (NAME=FOLDER)"
                )
            self.tasks[name] = task
            return
        fused = self._check_fused(folder / "adapter", meta["config"].fuse)
        kind = _head(task)
        own_batch = kind != "sequence" or bool(meta["config"].fuse)
        view = None
        if own_batch and kind != "sequence":  # its head is built beside the shared model (checked first)
            view = task_view(
                self.model, name, kind, _num_outputs(task), adapter_tensors(folder / "adapter"), str(folder)
            )
        load_adapter(self.model, folder / "adapter", name=name, activate=False, head=kind == "sequence")
        self.model.to(self.device)
        self.views.pop(name, None)
        if own_batch:
            self.views[name] = view or task_view(self.model, name, "sequence", 0, {}, str(folder))
        self.tasks[name] = task
        self._sha[name] = meta.get("sha256")
        for other in fused:
            self._sha[other] = read_adapter_config(folder / "adapter" / "fused" / other).get("sha256")

    def _check_fused(self, adapter: Path, fuse: tuple[str, ...]) -> list[str]:
        """The adapters a fusion run brings (to be loaded from its folder); one of the same name
        already served must be the same adapter (same weights), else the fusion is refused."""
        brought = []
        for other in fuse:
            if other not in self._sha:
                brought.append(other)
                continue
            mine = (
                read_adapter_config(adapter / "fused" / other).get("sha256")
                if (adapter / "fused" / other).is_dir()
                else None
            )
            if mine is None or mine != self._sha[other]:
                raise NameConflict(
                    f"{adapter.parent} fuses an adapter {other!r}, and another adapter of that name is already "
                    f"served; serve that task under another name (NAME=FOLDER)"
                )
        return brought

    def remove_task(self, name: str) -> None:
        """Stop serving task ``name`` (its adapter, norm and head copies leave the model, and the
        adapters only its fusion used)."""
        if name not in self.tasks:
            raise ConfigError(f"no task named {name!r}; served: {', '.join(self.tasks) or 'none'}")
        sets = get_container(self.model).sets
        users = [n for n, aset in sets.items() if name in aset.config.fuse]
        if users:
            raise NameConflict(f"task {name!r} is fused by the served {', '.join(users)}; unload {users[0]!r} first")
        fuse = sets[name].config.fuse
        remove_adapter(self.model, name)
        del self.tasks[name], self._sha[name]
        self.views.pop(name, None)
        used = {n for aset in sets.values() for n in aset.config.fuse}
        for other in fuse:
            if other not in self.tasks and other not in used:
                remove_adapter(self.model, other)
                del self._sha[other]

    @torch.no_grad()
    def predict(
        self, texts: list[str], tasks: list[str], text_pairs: list | None = None, batch_size: int = 64
    ) -> list[dict[str, Any]]:
        """Like :meth:`adaptune.predict.Predictor.predict`, with each row's task; every result also
        names it. ``text_pairs[i]``: row i's second text, context (QA) or choices (multiple choice)."""
        if len(tasks) != len(texts) or (text_pairs is not None and len(text_pairs) != len(texts)):
            raise DataError(f"{len(texts)} texts need as many task names (and pairs, if given); got {len(tasks)}")
        unknown = sorted(set(tasks) - set(self.tasks))
        if unknown:
            raise DataError(f"unknown task {unknown[0]!r}; this predictor serves {', '.join(self.tasks)}")
        pairs = list(text_pairs) if text_pairs is not None else [None] * len(texts)
        results: list[dict[str, Any] | None] = [None] * len(texts)
        for name in dict.fromkeys(t for t in tasks if t in self.views):  # each such task alone
            idx = [i for i, t in enumerate(tasks) if t == name]
            own = [pairs[i] for i in idx]
            rows = answer(
                self.views[name],
                self.tokenizer,
                self.tasks[name],
                [texts[i] for i in idx],
                None if all(p is None for p in own) else own,
                batch_size=batch_size,
                device=self.device,
            )
            for i, row in zip(idx, rows):
                results[i] = {"task": name, **row}
        seq = [i for i in range(len(texts)) if results[i] is None]
        self._mixed(seq, texts, tasks, pairs, results, batch_size)
        return results

    def _mixed(self, seq: list[int], texts, tasks, pairs, results: list, batch_size: int) -> None:
        """Rows ``seq`` (sequence heads) in mixed batches, each row through its own task."""
        encoded: dict[int, dict] = {}
        for name, task in self.tasks.items():  # each task's own max_length and pairing
            idx = [i for i in seq if tasks[i] == name]
            if not idx:
                continue
            if task["text_pair"] and any(pairs[i] is None for i in idx):
                raise DataError(f"task {name!r} takes text pairs: give a second text for each of its inputs")
            split = Split(
                [texts[i] for i in idx], [pairs[i] for i in idx] if task["text_pair"] else None, [0] * len(idx)
            )
            encoded.update(zip(idx, encode(split, self.tokenizer, task["max_length"])))
        try:
            for part in bucket_batches([len(encoded[i]["input_ids"]) for i in seq], batch_size, shuffle=False):
                batch_idx = [seq[j] for j in part]
                batch = collate([encoded[i] for i in batch_idx], self.tokenizer.pad_token_id)
                batch = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
                set_active(self.model, [tasks[i] for i in batch_idx])
                logits = self.model(**batch).logits.float().cpu()  # (B, widest head), NaN past a row's own width
                for row, i in enumerate(batch_idx):
                    task = self.tasks[tasks[i]]
                    out = scores(task["task_type"], logits[row, : _num_outputs(task)])
                    results[i] = {"task": tasks[i], **_row(task, texts[i], out.numpy())}
        finally:
            set_active(self.model, None)


def _read_servable(folder: Path):
    """A finished adapter run's configuration and task description."""
    config, task = read_run(folder)
    if not (folder / "adapter").is_dir():
        raise ConfigError(
            f"{folder} is not an adapter run (no adapter/); serve it alone with 'adaptune predict {folder}'"
        )
    return config, task
