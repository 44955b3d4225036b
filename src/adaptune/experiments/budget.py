"""Fitting a compare into a time budget: one timed training step, an estimate per grid point, and
the grid (then the data) shrunk until the estimate fits, each cut said in a note."""

from __future__ import annotations
from adaptune.experiments.config import ADAPTER_PLACEMENTS, CompareConfig, GridPoint

import dataclasses
import math
import random
import statistics
import time
from dataclasses import dataclass


# Cost of one training step relative to full fine-tuning, from the FLOP count: with frozen base
# weights the backward pass needs activation gradients but no weight gradients (about 2/3 of a full
# step); head-only training needs no backward through the encoder at all.
_RELATIVE_STEP = {"full": 1.0, "layernorm": 0.72, "head": 0.4, "adapters": 0.8}


def _step_cost(point: GridPoint, num_layers: int) -> float:
    if point.method == "top-k":
        return 0.4 + 0.6 * point.top_k / num_layers
    return _RELATIVE_STEP["adapters" if point.method in ADAPTER_PLACEMENTS else point.method]


@dataclass(frozen=True)
class Timing:
    """What the budget needs to know: measured seconds per padded token of a full fine-tuning
    step, the untruncated token lengths of the first task's training texts, and sizes per task."""

    seconds_per_token: float
    lengths: tuple[int, ...]
    sizes: dict[str, tuple[int, int, int]]  # task -> (train, dev, test)
    num_layers: int

    def full_step(self, batch_size: int, max_length: int, bucketed: bool = False) -> float:
        truncated = [min(n, max_length) for n in self.lengths]
        if bucketed:  # bucketing keeps padding low: about 10 % over the mean truncated length
            return self.seconds_per_token * batch_size * statistics.fmean(truncated) * 1.1
        # random batches pad to their longest example: its expected length, from seeded draws
        rng = random.Random(0)
        longest = statistics.fmean(max(rng.choices(truncated, k=batch_size)) for _ in range(200))
        return self.seconds_per_token * batch_size * longest


def estimate_minutes(cfg: CompareConfig, timing: Timing) -> float:
    """Predicted wall time of the grid.

    Evaluation (dev after every epoch, test once at the end) is a forward pass: about a third of a
    full step per batch; the ablation is one dev pass per span of layers.
    """
    t = cfg.train
    step = timing.full_step(t.batch_size, t.max_length, t.bucketed)
    total = 0.0
    for task in cfg.tasks:
        n_train, n_dev, n_test = timing.sizes[task]
        n = min(n_train, t.limit_train or n_train)
        n_dev, n_test = (min(x, t.limit_eval or x) for x in (n_dev, n_test))
        steps = math.ceil(n / t.batch_size) * t.epochs
        eval_batches = (n_dev * t.epochs + n_test) / t.batch_size
        for point in cfg.grid():
            total += step * (steps * _step_cost(point, timing.num_layers) + eval_batches / 3)
        if cfg.ablation:
            spans = timing.num_layers * (timing.num_layers + 1) / 2
            total += spans * n_dev / t.batch_size * step / 3
    return total / 60.0


def fit_budget(cfg: CompareConfig, minutes: float, timing: Timing) -> tuple[CompareConfig, list[str]]:
    """Shrink the grid, then the data, until the estimate fits ``minutes``; say what was cut."""
    notes: list[str] = []
    shrinks = [
        ("one seed", lambda c: dataclasses.replace(c, seeds=c.seeds[:1])),
        ("pfeiffer and parallel adapters at size 64 only", lambda c: dataclasses.replace(c, other_sizes=(64,))),
        (
            "init sweep 1e-3, 1e-2, 1e-1",
            lambda c: dataclasses.replace(c, init_stds=tuple(s for s in c.init_stds if s >= 1e-3)),
        ),
        (
            "top-k for k in 1 and half the layers",
            lambda c: dataclasses.replace(c, top_ks=tuple(sorted({1, max(1, timing.num_layers // 2)}))),
        ),
        (
            "the default learning rate of each strategy only (no lr grid)",
            lambda c: dataclasses.replace(c, lr_factors=(1.0,)),
        ),
        # Short runs learn from updates, not from examples: halve the batch before cutting data.
        (
            "batches of 16 (twice the updates for the same compute)",
            lambda c: dataclasses.replace(
                c, train=dataclasses.replace(c.train, batch_size=min(16, c.train.batch_size))
            ),
        ),
        (
            "texts cut to 64 tokens",
            lambda c: dataclasses.replace(
                c, train=dataclasses.replace(c.train, max_length=min(64, c.train.max_length))
            ),
        ),
        (
            "dev and test limited to 500 examples",
            lambda c: dataclasses.replace(
                c, train=dataclasses.replace(c.train, limit_eval=min(500, c.train.limit_eval or 500))
            ),
        ),
        (
            "2 epochs",
            lambda c: dataclasses.replace(c, train=dataclasses.replace(c.train, epochs=min(2, c.train.epochs))),
        ),
    ]
    for what, shrink in shrinks:
        if estimate_minutes(cfg, timing) <= minutes:
            break
        smaller = shrink(cfg)
        if smaller != cfg:
            cfg = smaller
            notes.append(f"budget: {what}")
    largest = max(timing.sizes[t][0] for t in cfg.tasks)
    limit = cfg.train.limit_train or largest
    while estimate_minutes(cfg, timing) > minutes and limit > 400:
        limit = max(400, limit * 4 // 5)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, limit_train=limit))
    if cfg.train.limit_train and cfg.train.limit_train < largest:
        notes.append(f"budget: training data limited to {cfg.train.limit_train} examples per task")
    est = estimate_minutes(cfg, timing)
    step = timing.full_step(cfg.train.batch_size, cfg.train.max_length, cfg.train.bucketed)
    notes.append(
        f"budget: {minutes:g} min; estimated {est:.0f} min for {len(cfg.grid()) * len(cfg.tasks)} runs "
        f"(from a measured full fine-tuning step of {step:.2f} s)"
    )
    return cfg, notes


def calibrate(cfg: CompareConfig) -> Timing:
    """Time a few full fine-tuning steps on real batches of the first task (the first one warms up)."""
    from adaptune.core.architectures import layer_list, spec_for
    from adaptune.data.batching import encode_split, feature_length
    from adaptune.data.loading import bucket_batches, collate
    from adaptune.training.config import HEADS
    from adaptune.models.loading import load_tokenizer
    from adaptune.training.train import _load_data, build_model, make_optimizer, training_step

    sizes = {}
    for task in cfg.tasks:
        data = _load_data(dataclasses.replace(cfg.train, data=task, limit_train=None, limit_eval=None))
        sizes[task] = (len(data.train), len(data.dev), len(data.test) if data.test is not None else 0)
        if task == cfg.tasks[0]:
            first = data
    tcfg = dataclasses.replace(cfg.train, data=cfg.tasks[0], strategy="full")
    tok = load_tokenizer(tcfg.model)
    enc_of = lambda n: encode_split(first.train, first.task_type, tok, n)
    raw_lengths = tuple(feature_length(e) for e in enc_of(100_000))
    enc = enc_of(tcfg.max_length)
    num_labels = 1 if first.task_type in ("regression", "multiple-choice") else len(first.label_names)
    model, _ = build_model(tcfg, num_labels, head=HEADS.get(first.task_type, "sequence"))
    model.train()
    lengths = [feature_length(e) for e in enc]
    batches = bucket_batches(lengths, tcfg.batch_size, shuffle=True, seed=0)
    optimizer, scheduler = make_optimizer(model, tcfg, 100)
    seconds, tokens = 0.0, 0
    for i, idx in enumerate(batches[:6]):
        t0 = time.perf_counter()
        training_step(
            model,
            collate([enc[j] for j in idx], tok.pad_token_id),
            optimizer,
            scheduler,
            task_type=first.task_type,
            max_grad_norm=tcfg.max_grad_norm,
        )
        if i:
            seconds += time.perf_counter() - t0
            tokens += max(lengths[j] for j in idx) * len(idx)  # padded tokens: what a batch really costs
    return Timing(seconds / tokens, raw_lengths, sizes, len(layer_list(model, spec_for(model))))
