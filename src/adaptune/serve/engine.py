"""The serving engine: one base model in memory, many task adapters, and a batcher thread that owns
the model.

Requests of every task wait in one queue; the batcher takes what is there (up to
``max_batch_size`` rows, waiting at most ``max_wait_ms`` for more after the first) and runs it as one
mixed-task batch (:class:`adaptune.multitask.MultiTaskPredictor`: each row through its own task's
adapter, norm and head copies, in one forward pass). Loading and unloading adapters are queued
too and run on the batcher between batches, so the model never changes under a running batch. A
causal-LM engine (:class:`adaptune.lm.generate.Generator`) runs generation requests one at a
time on the same thread, streaming text as it is decoded.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

from adaptune.core.inject import list_adapters, remove_adapter
from adaptune.core.io import fingerprint
from adaptune.errors import AdaptuneError, ConfigError, NameConflict

_STOP = object()


class QueueFull(AdaptuneError):
    """The engine's queue holds ``max_queue`` requests: try again shortly."""


class UnknownTask(AdaptuneError):
    """A request names a task the engine does not serve (or no longer serves)."""


@dataclass
class _Job:
    """One request: its task and rows (predict), or a callable to run on the batcher (generate,
    load, unload); the future it resolves."""

    task: str | None = None
    rows: list[tuple[str, str | None]] = field(default_factory=list)
    call: Callable[[], Any] | None = None
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        """Sequences it adds to a batch: a multiple-choice row is one per choice."""
        return sum(len(pair) if isinstance(pair, list) else 1 for _, pair in self.rows)


class Engine:
    """Serves finished runs of ``adaptune train`` on one shared base.

    Args:
        runs: task name -> run folder (adapter runs of one base: classification and regression
            runs, or causal-LM runs, which are served for generation).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        base: the base model to load instead of the one the runs name (classification runs).
        max_batch_size: most rows in one forward pass.
        max_wait_ms: how long the first request of a batch waits for others.
        max_queue: most requests waiting; more raise :class:`QueueFull`.
        batching: ``False`` runs each request alone (its own rows only), for comparison.
        on_batch: called on the batcher with (rows, tasks) after each batch (metrics).

    Raises:
        ConfigError, AdapterFileError: as :class:`adaptune.multitask.MultiTaskPredictor`.
    """

    def __init__(
        self,
        runs: dict[str, str | os.PathLike],
        *,
        device: str = "auto",
        base: str | None = None,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        batching: bool = True,
        on_batch: Callable[[int, list[str]], None] | None = None,
    ) -> None:
        if not runs:
            raise ConfigError("no runs to serve: pass at least one run folder")
        if max_batch_size < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ConfigError("--max-batch-size and --max-queue must be at least 1, --max-wait-ms at least 0")
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self.max_queue, self.batching, self.on_batch = max_queue, batching, on_batch
        self.generator = None
        self.predictor = None
        first = Path(next(iter(runs.values())))
        if _is_causal_run(first):
            if base is not None:
                raise ConfigError("--model is for classification runs; causal-LM runs load the base they name")
            self._start_generator(runs, device)
            self.base_name = self.generator.model.config.name_or_path
        else:
            from adaptune.multitask import MultiTaskPredictor

            self.predictor = MultiTaskPredictor(dict(runs), device=device, base=base)
            self.base_name = self.predictor.base
        self.model = self.predictor.model if self.predictor else self.generator.model
        self.base_fingerprint = fingerprint(self.model)
        self._queue: queue.Queue = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._tasks_lock = threading.Lock()  # load/unload (batcher) against tasks() (HTTP threads)
        self._described: dict | None = None  # tasks(), until the next load or unload
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="adaptune-batcher", daemon=True)
        self._thread.start()

    def _start_generator(self, runs: dict[str, str | os.PathLike], device: str) -> None:
        from adaptune.lm.generate import Generator

        items = list(runs.items())
        self.generator = Generator(items[0][1], device=device)
        self.generator.default = None
        self._tasks_lm: dict[str, dict] = {}
        loaded = self.generator.adapters[0]  # the first run's adapter, under its folder's name
        if loaded == items[0][0]:
            self._tasks_lm[loaded] = {"task_type": "causal-lm"}
            items = items[1:]
        else:  # served under the name given
            remove_adapter(self.generator.model, loaded)
        for name, folder in items:
            self.generator.add_adapter(folder, name=name)
            self._tasks_lm[name] = {"task_type": "causal-lm"}

    # ---- what is served -----------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return "generate" if self.generator is not None else "predict"

    def tasks(self) -> dict[str, dict[str, Any]]:
        """Task name -> its description (task type, labels, text pairs, adapter size); built once
        after each load or unload (every request reads it), not to be changed by the caller."""
        with self._tasks_lock:
            if self._described is None:
                self._described = self._describe()
            return self._described

    def _describe(self) -> dict[str, dict[str, Any]]:
        table = self.predictor.tasks if self.predictor else self._tasks_lm
        sizes = {r["name"]: r for r in list_adapters(self.model)}
        out = {}
        for name, task in table.items():
            row = sizes.get(name, {})
            cfg = row.get("config")
            out[name] = {
                "task_type": task["task_type"],
                "labels": task.get("label_names"),
                "text_pair": bool(task.get("text_pair")),
                "adapter": {
                    "size": getattr(cfg, "size", None),
                    "placement": getattr(cfg, "slots", None),
                    "params": row.get("params"),
                },
            }
        return out

    def has_task(self, name: str) -> bool:
        with self._tasks_lock:
            return name in (self.predictor.tasks if self.predictor else self._tasks_lm)

    @property
    def queue_depth(self) -> int:
        return self._waiting

    # ---- submitting ---------------------------------------------------------------------------
    def _submit(self, job: _Job) -> Future:
        with self._lock:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} requests are waiting (--max-queue {self.max_queue})")
            self._waiting += 1
        self._queue.put(job)
        return job.future

    def predict(self, task: str, rows: list[tuple[str, str | None]]) -> Future:
        """Queue ``rows`` (text, pair) of ``task``; the future gives one result per row, as
        :meth:`adaptune.multitask.MultiTaskPredictor.predict`."""
        if self.predictor is None:
            raise ConfigError("this server serves causal-LM tasks: use /v1/generate")
        if not self.has_task(task):
            raise UnknownTask(f"unknown task {task!r}; served: {', '.join(self.tasks()) or 'none'}")
        return self._submit(_Job(task=task, rows=rows))

    def generate(self, task: str | None, prompt, stream: Callable[[str], None] | None = None, **options) -> Future:
        """Queue a generation with adapter ``task`` (None: the plain base); the future gives the reply."""
        if self.generator is None:
            raise ConfigError("this server serves classification tasks: use /v1/predict")
        if task is not None and not self.has_task(task):
            raise UnknownTask(f"unknown task {task!r}; served: {', '.join(self.tasks()) or 'none'}")
        gen = self.generator
        return self._submit(_Job(call=lambda: gen.generate(prompt, adapter=task, stream=stream, **options)))

    def load(self, name: str, folder: Path) -> Future:
        """Queue loading the run at ``folder`` as task ``name`` (between batches)."""
        return self._submit(_Job(call=lambda: self._load(name, folder)))

    def unload(self, name: str) -> Future:
        """Queue unloading task ``name`` (between batches)."""
        return self._submit(_Job(call=lambda: self._unload(name)))

    def _load(self, name: str, folder: Path) -> dict:
        with self._tasks_lock:
            if self.predictor is not None:
                self.predictor.add_run(name, folder)
            else:
                if name in self._tasks_lm:
                    raise NameConflict(f"a task named {name!r} is already served; unload it first or pick another")
                self.generator.add_adapter(folder, name=name)
                self._tasks_lm[name] = {"task_type": "causal-lm"}
            self._described = None
        return self.tasks()[name]

    def _unload(self, name: str) -> None:
        if not self.has_task(name):
            raise UnknownTask(f"no task named {name!r}; served: {', '.join(self.tasks()) or 'none'}")
        with self._tasks_lock:
            if self.predictor is not None:
                self.predictor.remove_task(name)
            else:
                remove_adapter(self.generator.model, name)
                del self._tasks_lm[name]
            self._described = None

    # ---- the batcher --------------------------------------------------------------------------
    def _take(self) -> _Job | object:
        job = self._queue.get()
        if job is not _STOP:
            with self._lock:
                self._waiting -= 1
        return job

    def _run(self) -> None:
        held = None
        while True:
            job = held if held is not None else self._take()
            held = None
            if job is _STOP:
                return
            if job.call is not None:
                _resolve(job, job.call)
                continue
            jobs, rows = [job], job.size
            deadline = time.perf_counter() + self.max_wait
            while self.batching and rows < self.max_batch_size:
                left = deadline - time.perf_counter()
                if left <= 0 and self._queue.empty():
                    break
                try:
                    nxt = self._queue.get(timeout=max(left, 0))
                except queue.Empty:
                    break
                if nxt is not _STOP:
                    with self._lock:
                        self._waiting -= 1
                if nxt is _STOP or nxt.call is not None or rows + nxt.size > self.max_batch_size:
                    held = nxt  # after this batch
                    break
                jobs.append(nxt)
                rows += nxt.size
            self._run_batch(jobs)

    def _run_batch(self, jobs: list[_Job]) -> None:
        live = []
        for job in jobs:
            if not job.future.set_running_or_notify_cancel():
                continue  # timed out while waiting
            if not self.has_task(job.task):  # unloaded after it was queued
                job.future.set_exception(UnknownTask(f"task {job.task!r} was unloaded"))
                continue
            live.append(job)
        if not live:
            return
        texts = [text for job in live for text, _ in job.rows]
        pairs = [pair for job in live for _, pair in job.rows]
        tasks = [job.task for job in live for _ in job.rows]
        try:
            results = self.predictor.predict(texts, tasks, pairs, batch_size=self.max_batch_size)
        except Exception as e:  # a bad row fails the batch: retry each request alone
            if len(live) == 1:
                live[0].future.set_exception(e)
                return
            for job in live:
                _resolve(
                    job,
                    lambda job=job: self.predictor.predict(
                        [t for t, _ in job.rows], [job.task] * len(job.rows), [p for _, p in job.rows]
                    ),
                    running=True,
                )
            return
        if self.on_batch is not None:
            self.on_batch(len(texts), tasks)
        start = 0
        for job in live:
            job.future.set_result(results[start : start + len(job.rows)])
            start += len(job.rows)

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests, finish those queued, stop the batcher."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)


def _resolve(job: _Job, fn: Callable[[], Any], running: bool = False) -> None:
    if not running and not job.future.set_running_or_notify_cancel():
        return
    try:
        job.future.set_result(fn())
    except BaseException as e:  # handed to the request that asked
        job.future.set_exception(e)


def _is_causal_run(folder: Path) -> bool:
    """Whether ``folder`` is a finished causal-LM run (served for generation)."""
    import json

    try:
        task = json.loads((folder / "task.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(task, dict) and task.get("task_type") == "causal-lm"
