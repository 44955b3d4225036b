"""The training loop of one run (:class:`Run`): set-up, resume, steps, evaluation on dev, checkpoints,
and the finished run folder. :func:`adaptune.training.train.train` drives it."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from adaptune.training import checkpoint as ckpt
from adaptune.cpu import native
from adaptune.lm.causal_lm import response_index
from adaptune.data.batching import bucket_length, feature_length, split_even
from adaptune.training.run_folder import create_run_dir, write_artifacts
from adaptune.data.loading import bucket_batches, collate
from adaptune.training.distributed import Dist
from adaptune.core.inject import active_adapter, set_active
from adaptune.training.layer_cache import FrozenBelow
from adaptune.training.losses import LossLog
from adaptune.training.monitor import RunLog, early_stop_reason
from adaptune.data.metrics import single_class_warning
from adaptune.models.loading import load_tokenizer
from adaptune.training.prepared import _prepare, _Prepared
from adaptune.training.steps import (
    balanced_class_weights,
    build_model,
    make_optimizer,
    training_step,
)
from adaptune.training.config import CAUSAL_LM, HEADS, TrainConfig
from adaptune.training.scoring import score_split


def _train(
    cfg: TrainConfig, out: Path, resume: bool, quiet: bool, dd: Dist, on_step: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """One run, start to finish: checked set-up, resume, the loop, the run folder."""
    run = Run(cfg, out, dd, quiet, resume)
    run.restore(resume)
    run.loop(on_step)
    return run.finish()


class Run:
    """One training run's state and phases. Data, tokenizer and model are all checked before anything
    is written to disk; under torchrun every rank builds the same model and rank 0 writes."""

    def __init__(self, cfg: TrainConfig, out: Path, dd: Dist, quiet: bool, resume: bool) -> None:
        self.cfg, self.out, self.dd, self.device = cfg, out, dd, dd.device
        self.tokenizer = load_tokenizer(cfg.model)
        self.data = data = _prepare(cfg, self.tokenizer)
        self.enc = data.enc
        random.seed(cfg.seed)
        head, prior = HEADS.get(data.task_type, "sequence"), None
        if data.task_type == "multi-label":  # the head's biases start at the label frequencies
            prior = torch.from_numpy(np.stack([e["label"] for e in self.enc["train"]]).mean(0))
        # the same weights on every rank
        self.model, self.counts = build_model(cfg, data.num_labels, self.device, head, prior)
        if cfg.lean_on(self.device) and self.device.type == "cpu" and native.library() is None:
            data.notes.append(f"C kernels not available ({native.why_not()}): the lean kernels run in torch")
        self.model.to(self.device).train()
        self.lengths = [feature_length(e) for e in self.enc["train"]]
        # dropout off (and the optional cache) below the lowest trained layer: checked before writing anything
        self.frozen = (
            None
            if cfg.frozen_dropout
            else FrozenBelow(self.model, cache=cfg.cache_frozen_layers, lengths=self.lengths)
        )
        if self.frozen is not None:
            data.notes.append(self.frozen.describe())
        if dd.enabled:
            torch.manual_seed(cfg.seed + 7919 * dd.rank)  # own dropout masks per rank
        dd.barrier()  # every rank has checked the run folder before rank 0 creates it
        if not resume and dd.main:
            create_run_dir(out, cfg)
        dd.barrier()
        self.net = self._wrapped()
        self.quiet = quiet or not dd.main
        self.log = (lambda *a: None) if self.quiet else (lambda msg: tqdm.write(msg))
        for note in data.notes:
            self.log(f"note: {note}")
        self.pad_id = self.tokenizer.pad_token_id
        self.class_weight = self._class_weight()
        self.total = len(self.batches_for(0)) * cfg.epochs
        self.optimizer, self.scheduler = make_optimizer(self.model, cfg, self.total)
        self.ck_dir = out / "checkpoint"
        self.progress = {
            "step": 0,
            "epoch": 0,
            "batch": 0,
            "history": [],
            "best": None,
            "best_step": None,
            "train_seconds": 0.0,
        }
        self.best_state = None
        self.losses = LossLog()
        self.examples, self.since = 0, (time.perf_counter(), 0)  # for the throughput the log reports
        self.runlog = RunLog(out / "log.jsonl", cfg.log_dir) if dd.main else None

    def _wrapped(self):
        """The model as the steps run it: DistributedDataParallel under torchrun (only trained
        parameters are synchronised), then ``torch.compile`` when asked."""
        net = self.model
        if self.dd.enabled:
            from torch.nn.parallel import DistributedDataParallel

            device = self.device
            net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        if self.cfg.compile != "none":
            net = torch.compile(net, mode=None if self.cfg.compile == "default" else self.cfg.compile)
        return net

    def _class_weight(self) -> torch.Tensor | None:
        data = self.data
        if self.cfg.class_weights != "balanced" or data.task_type != "classification":
            return None
        weight = balanced_class_weights([e["label"] for e in self.enc["train"]], data.num_labels).to(self.device)
        names = data.task["label_names"]
        self.log("note: class weights " + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, weight.tolist())))
        return weight

    def batches_for(self, epoch: int) -> list[list[int]]:
        """The epoch's batches of training indices: a pure function of seed and epoch."""
        cfg = self.cfg
        if cfg.bucketed:
            return bucket_batches(self.lengths, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch)
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        return [perm[i : i + cfg.batch_size] for i in range(0, len(perm), cfg.batch_size)]

    def restore(self, resume: bool) -> None:
        """Continue from the checkpoint (``resume``), saying so, or saying that there was none; then,
        for a causal LM, the base model's scores once."""
        if resume:
            restored = ckpt.load_checkpoint(self.ck_dir, self.model, self.optimizer, self.scheduler, rank=self.dd.rank)
            if restored is not None:
                self.progress = restored
                self.log(f"resumed {self.out} at step {self.progress['step']}/{self.total}")
            else:  # said, and kept in metrics.json: the run stopped before its first checkpoint
                self.data.notes.append(
                    f"no checkpoint in {self.ck_dir}: the run stopped before its first one; started again from step 0"
                )
                self.log(f"note: {self.data.notes[-1]}")
        self.best_state = ckpt.load_best(self.ck_dir) if self.progress["best"] is not None else None
        if self.data.task_type == CAUSAL_LM and "base" not in self.progress:
            self.progress["base"] = _score_base(
                self.cfg, self.model, self.data, self.score, self.tokenizer, self.device, self.dd
            )
            base_dev = self.progress["base"]["dev"]
            self.log(
                f"base model: dev perplexity {base_dev['perplexity']:.2f}, "
                f"token accuracy {base_dev['token_accuracy']:.4f}"
            )

    def score(self, split: str, threshold: float | None = None) -> dict:
        """Metrics of ``split``; ``threshold``: a multi-label task's (None: chosen on this split)."""
        cfg, dd = self.cfg, (self.dd if self.dd.enabled else None)
        return score_split(self.model, split, self.data, cfg, self.device, self.pad_id, dd, threshold)

    def evaluate_dev(self) -> None:
        """Score dev, keep the weights when they are the best so far."""
        progress, data = self.progress, self.data
        metrics = self.score("dev")
        progress["history"].append({"step": progress["step"], "epoch": progress["epoch"], **metrics})
        value = metrics[data.metric]
        best = progress["best"]
        if best is None or (value > best if data.higher_is_better else value < best):
            progress["best"], progress["best_step"] = value, progress["step"]
            self.best_state = ckpt.trainable_state(self.model)
            if self.dd.main:
                ckpt.save_best(self.ck_dir, self.best_state)
        self.log(
            f"step {progress['step']}: dev {data.metric} {value:.4f} (best {progress['best']:.4f} at step "
            f"{progress['best_step']})"
        )
        if self.runlog is not None:
            self.runlog.write("dev", progress["step"], metrics)  # (it keeps the numbers)
            self.runlog.flush()
        reason = early_stop_reason(progress["history"], progress["best_step"], data.metric, self.cfg.early_stop)
        if reason is not None:
            progress["stopped_early"] = reason
            self.log(reason)

    def loop(self, on_step: Callable[[int], None] | None = None) -> None:
        """Epochs of steps from where the progress stands; ``on_step(step)`` after each step."""
        cfg, progress = self.cfg, self.progress
        bar = tqdm(
            total=self.total,
            initial=progress["step"],
            disable=self.quiet,
            unit="step",
            dynamic_ncols=True,
            desc=f"{cfg.strategy}",
        )
        t0 = time.perf_counter() - progress["train_seconds"]
        while progress["epoch"] < cfg.epochs:
            order = self.batches_for(progress["epoch"])
            while progress["batch"] < len(order):
                lr = self.scheduler.get_last_lr()[0]
                loss, grad_norm = self.step(order[progress["batch"]])
                self.losses.add(progress["step"] + 1, loss, lr, grad_norm)
                progress["step"] += 1
                progress["batch"] += 1
                bar.update(1)
                evaluating = cfg.eval_every and progress["step"] % cfg.eval_every == 0
                saving = progress["step"] % cfg.checkpoint_every == 0
                if evaluating or saving or self.losses.due():
                    self.report(bar)
                if on_step is not None:
                    on_step(progress["step"])
                if evaluating:
                    self.evaluate_dev()
                if progress.get("stopped_early"):
                    break
                if saving:
                    progress["train_seconds"] = time.perf_counter() - t0
                    _checkpoint(self.dd, self.ck_dir, self.model, self.optimizer, self.scheduler, progress)
            self.report(bar)
            if progress.get("stopped_early"):
                break
            progress["epoch"] += 1
            progress["batch"] = 0
            if not (cfg.eval_every and progress["step"] % cfg.eval_every == 0):
                self.evaluate_dev()
            progress["train_seconds"] = time.perf_counter() - t0
            _checkpoint(self.dd, self.ck_dir, self.model, self.optimizer, self.scheduler, progress)
        bar.close()
        self.train_seconds = time.perf_counter() - t0

    def report(self, bar) -> None:
        """Read the losses of the steps since the last report (:class:`LossLog`), show the last on
        the progress bar and note the steps that a non-finite loss skipped."""
        last, skipped = self.losses.read(self.cfg.learning_rate)
        now = time.perf_counter()
        if self.runlog is not None and self.losses.records:
            speed = (self.examples - self.since[1]) / (now - self.since[0])
            self.runlog.steps(self.losses.records, self.progress["step"], speed)
        self.since = (now, self.examples)
        if last is not None:
            bar.set_postfix(loss=f"{last:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.1e}")
        if skipped:
            self.log(f"note: step(s) {', '.join(map(str, skipped))} skipped: the loss was not finite (no update)")

    def step(self, global_batch: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimisation step on this rank's share of a global batch (in ``--grad-accum``
        micro-batches); the loss and the gradient norm (None without clipping), on the device."""
        idx = self.dd.shard(global_batch)
        # an empty shard runs one example at weight 0: every rank takes part in DDP's all-reduce
        empty = not idx
        idx = idx or global_batch[:1]
        parts = split_even(idx, 1 if empty else self.cfg.grad_accum)
        micro = [self._micro(part, empty) for part in parts]
        cfg, stats = self.cfg, {}
        with self.frozen.step(idx) if self.frozen is not None else contextlib.nullcontext():
            loss = training_step(
                self.net,
                [b for b, _, _ in micro] if len(micro) > 1 else micro[0][0],
                self.optimizer,
                self.scheduler,
                task_type=self.data.task_type,
                max_grad_norm=cfg.max_grad_norm,
                precision=cfg.precision,
                class_weight=self.class_weight,
                row_weight=[w for _, w, _ in micro] if len(micro) > 1 else micro[0][1],
                lm_index=[i for _, _, i in micro] if len(micro) > 1 else micro[0][2],
                stats=stats,
            )
        self.examples += 0 if empty else len(idx)  # a filler row trains nothing
        return loss, stats.get("grad_norm")

    def _micro(self, idx: list[int], empty: bool):
        """One (micro-)batch on the device, its row weight and (causal LMs) its response index."""
        examples = [self.enc["train"][i] for i in idx]
        pad_to = None
        if self.cfg.compile != "none":  # a few padded lengths: a few graphs (and CUDA graphs) to compile
            pad_to = bucket_length(max(feature_length(e) for e in examples), self.cfg.max_length)
        host = collate(examples, self.pad_id, pad_to=pad_to)
        lm_index = None
        if self.data.task_type == CAUSAL_LM:  # from the host's labels: the step reads nothing back
            lm_index = response_index(host["labels"], torch.zeros(1) if empty else None)
        batch = {k: v.to(self.device) for k, v in host.items()}
        return batch, (torch.zeros(1, device=self.device) if empty else None), lm_index

    def finish(self) -> dict[str, Any]:
        """Back to the best weights on dev, the final numbers, and (rank 0) the run folder."""
        progress, data, cfg, dd = self.progress, self.data, self.cfg, self.dd
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self.best_state.items():
                params[name].copy_(value)
        # the dev metrics of those weights were measured when they were kept: no second pass
        best_entry = next(h for h in progress["history"] if h["step"] == progress["best_step"])
        dev_metrics = {k: v for k, v in best_entry.items() if k not in ("step", "epoch")}
        # the threshold chosen on dev (multi-label's decision, SQuAD 2.0's no-answer) decides test and predict
        chosen = next((k for k in ("threshold", "null_threshold") if k in dev_metrics), None)
        if chosen is not None:
            data.task[chosen] = dev_metrics[chosen]
        test_metrics = self.score("test", dev_metrics.get(chosen)) if "test" in self.enc else None
        if data.task_type == CAUSAL_LM and cfg.eval_generate and test_metrics is not None:
            test_metrics["exact_match"] = _exact_match(self.model, data, self.tokenizer, cfg, self.device, dd)
        result = self._result(dev_metrics, test_metrics)
        if dd.main:
            write_artifacts(self.out, self.model, self.tokenizer, cfg, data.task)
            # last: marks the run finished
            ckpt.atomic_write_text(self.out / "metrics.json", json.dumps(result, indent=2) + "\n")
            shutil.rmtree(self.ck_dir, ignore_errors=True)
            self.runlog.close()
        dd.barrier()
        return result

    def _result(self, dev_metrics: dict, test_metrics: dict | None) -> dict[str, Any]:
        """The content of ``metrics.json``."""
        progress, data, cfg, counts = self.progress, self.data, self.cfg, self.counts
        seconds = self.train_seconds
        result = {
            "task": data.description,
            "strategy": cfg.strategy,
            "metric": data.metric,
            "dev": dev_metrics,
            "test": test_metrics,
            "best_step": progress["best_step"],
            "steps": self.total,
            "params": {"trainable": counts.trainable, "base": counts.base, "percent_trained": counts.percent},
            "train_seconds": round(seconds, 2),
            "examples_per_second": round(len(self.enc["train"]) * cfg.epochs / max(seconds, 1e-9), 2),
            "processes": self.dd.world,
            "history": progress["history"],
            "notes": data.notes,
        }
        if data.task_type in ("classification", "multi-label", "token-classification"):
            result["positive_label"] = data.task.get("positive_label")
            result["warnings"] = [
                f"{split}: {w}"
                for split, m in (("dev", dev_metrics), ("test", test_metrics))
                if m is not None and (w := single_class_warning(m)) is not None
            ]
        for key in ("base", "stopped_early"):  # a causal LM's base scores; why the run stopped early
            if key in progress:
                result[key] = progress[key]
        return result


def _checkpoint(dd: Dist, folder: Path, model, optimizer, scheduler, progress: dict) -> None:
    """Rank 0 writes the state, with every rank's RNG; the others wait until it is complete."""
    rngs = dd.gather(torch.get_rng_state())
    if dd.main:
        ckpt.save_checkpoint(folder, model, optimizer, scheduler, progress, rank_rng=rngs if dd.enabled else None)
    dd.barrier()


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
    from adaptune.lm.generate import exact_match

    convs = data.raw.test[: cfg.eval_generate]
    mine = dd.shard(list(range(len(convs))))
    share = exact_match(model, tokenizer, [convs[i] for i in mine], device=device) if mine else 0.0
    parts = dd.gather((share * len(mine), len(mine)))
    return sum(p[0] for p in parts) / max(1, sum(p[1] for p in parts))
