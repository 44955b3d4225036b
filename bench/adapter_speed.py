"""Adapter speed and memory as ratios measured in one run: training step, inference, memory, mixed tasks.

All on all-MiniLM-L6-v2 (the shipped model), Houlsby adapters (size --size, default 64, with
layer-norm and head copies), random token batches of --batch x --length (default 32 x 128, every
token real), fp32 on CPU. On a shared machine only ratios within one run mean anything: the
variants of each figure alternate step by step in one process and the median CPU time
(time.process_time) per step is compared; --threads 1 (default) keeps other processes' load from
leaking into it.

- train:  one optimisation step (forward, backward, clip, AdamW, scheduler) through the library's
          own ``training_step``, adapters vs full fine-tuning, with torch's dropout and attention
          ("plain") and with :func:`adaptune.cpu.kernels.use_lean_kernels` on both ("lean"). Two
          estimates: the ratio of the median step times, and the median of each round's ratio
          (adapter step over the full step right after it). The FLOP ideal is counted on the same
          model and batch by torch's ``FlopCounterMode``. ``--embedding-norm frozen`` keeps BERT's
          embedding LayerNorm frozen, so backward stops at the first adapter.
- infer:  forward pass in eval mode under no_grad, the same model with the adapter active vs
          ``set_active(model, None)`` (the plain base); where the adapter's C kernel runs
          (:mod:`adaptune.cpu.adapter_gemm`: a C compiler, AVX2), also the adapter with torch's
          products instead. ``ADAPTUNE_NATIVE=0`` turns the kernel off for every section.
- mixed:  --tasks adapters (each with its own norms and head); one batch whose rows cycle through
          the tasks vs the same batch all on one task; reported as throughput mixed / single.
- small:  one short sentence (--small-batch x --small-length, default 1 x 16): inference overhead of
          the active adapter and the training step adapters / full. At this size every operator is
          tiny and the time goes to Python and per-operator dispatch, not arithmetic: what single-text
          serving on a CPU pays, and what a small model on a GPU pays in kernel launches.
- host:   a random LLaMA as deep as SmolLM2 (30 layers) but 64 wide, batch 2 x 8: forward with the
          adapter vs the plain base, and the training step adapters vs full. The arithmetic is
          negligible, so this is the host-side work per step, what a small model on a GPU waits on.
- memory: peak RSS of a fresh subprocess per strategy over --mem-steps training steps (VmHWM,
          reset after the model is built), adapters vs full, plain and lean; once with the heap as
          ``train`` runs it (:func:`adaptune.keep_freed_memory`: freed blocks kept for reuse) and
          once with every allocation of 128 KiB or more in its own mapping
          (MALLOC_MMAP_THRESHOLD_), where the peak RSS is the peak of live tensors plus the process.
- heap:   what :func:`adaptune.keep_freed_memory` buys: fresh subprocesses with it and without it
          (glibc's default), back to back, --heap-repeats pairs; the training step of both
          strategies in one process, the adapter's inference forward in another (as a serving
          process runs it), with page faults per call.

Every other section runs inside ``keep_freed_memory``, as the library's training loop and command
line do.

--processes N runs each speed section (train, infer, mixed, small, host) in N fresh processes, one
after another, and computes its figures from all their rounds. A process settles into a speed of
its own (the plain base forward is fast in some processes and slow in others, throughout), which
more rounds in one process never average out; the pooled 90 % intervals resample whole processes
first, then rounds within them, so that effect shows in their width. Each process's paired median
is printed as it finishes.

Run:  .venv/bin/python bench/adapter_speed.py [--only train,infer,mixed,small,host,memory,heap] [--rounds 5]
      [--processes 1] [--size 64] [--batch 32] [--length 128] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch

SECTIONS = ("train", "infer", "mixed", "small", "host", "memory", "heap")


def make_batch(batch: int, length: int, vocab: int, seed: int = 0, labels: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {
        "input_ids": torch.randint(1000, vocab, (batch, length), generator=g),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "token_type_ids": torch.zeros(batch, length, dtype=torch.long),
    }
    if labels:
        out["labels"] = torch.randint(0, 2, (batch,), generator=g)
    return out


def build(strategy: str, size: int, lean: bool, steps: int, embedding_norm: bool = True):
    """Model, optimizer and scheduler through the library's own training path."""
    from adaptune.cpu.kernels import use_lean_kernels
    from adaptune.models.loading import quiet_transformers
    from adaptune.training.train import TrainConfig, build_model, make_optimizer

    if strategy == "adapters":
        cfg = TrainConfig(strategy=strategy, adapter_size=size, train_embedding_norm=embedding_norm)
    else:
        cfg = TrainConfig(strategy=strategy)
    with quiet_transformers():
        model, _ = build_model(cfg, 2)
    if lean:
        use_lean_kernels(model)
    model.train()
    optimizer, scheduler = make_optimizer(model, cfg, steps)
    return model, optimizer, scheduler, cfg


def alternate_times(fns: dict, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Every timed call's CPU seconds, per fn, calling the fns in turn, round after round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + rounds):
        for k, fn in fns.items():
            c = time.process_time()
            fn()
            if r >= warmup:
                times[k].append(time.process_time() - c)
    return times


def bootstrap_interval(
    values: list[float], level: float = 0.9, draws: int = 4000, groups: list[int] | None = None
) -> list[float]:
    """A ``level`` bootstrap interval of the median of ``values`` (percentiles of resampled medians).

    ``groups``: ``values`` came from consecutive processes with these many rounds each. Then whole
    processes are resampled first and rounds within each (a cluster bootstrap), so a process-level
    effect (a process whose base forward is fast throughout) widens the interval instead of hiding.
    On a noisy shared machine this says whether a goal is met or merely touched by one run.
    """
    rng = random.Random(0)
    clusters, start = [], 0
    for n in groups or [len(values)]:
        clusters.append(values[start : start + n])
        start += n
    meds = []
    for _ in range(draws):
        picked = rng.choices(clusters, k=len(clusters)) if groups else clusters
        meds.append(statistics.median(v for c in picked for v in rng.choices(c, k=len(c))))
    meds.sort()
    lo = int((1 - level) / 2 * draws)
    return [meds[lo], meds[draws - 1 - lo]]


def paired_ratio(
    times: dict[str, list[float]], a: str, b: str, groups: list[int] | None = None
) -> tuple[float, list[float]]:
    """Median of each round's a/b (the pair ran back to back, under the same load) and its interval."""
    ratios = [x / y for x, y in zip(times[a], times[b])]
    return statistics.median(ratios), bootstrap_interval(ratios, groups=groups)


def step_flops(model, batch: dict) -> int:
    """FLOPs of one forward + backward, counted by torch's FlopCounterMode (matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode

    from adaptune.training.train import _loss

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with FlopCounterMode(display=False) as counter:
        _loss(model(**inputs).logits, batch["labels"], "classification").backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def section_train(args) -> dict:
    from adaptune.training.train import training_step

    batch = make_batch(args.batch, args.length, 30000)
    steps = args.rounds + 2
    fns, flops = {}, {}
    for lean in (False, True):
        for strategy in ("adapters", "full"):
            model, opt, sched, cfg = build(strategy, args.size, lean, steps, args.embedding_norm == "train")
            if not lean:
                flops[strategy] = step_flops(model, batch)

            def fn(model=model, opt=opt, sched=sched, cfg=cfg):
                training_step(model, batch, opt, sched, task_type="classification", max_grad_norm=cfg.max_grad_norm)

            fns[f"{'lean' if lean else 'plain'}-{strategy}"] = fn
    times = alternate_times(fns, args.rounds)
    del fns
    return {"times": times, "flops": flops, "flop_ideal": flops["adapters"] / flops["full"], **train_figures(times)}


def train_figures(times: dict[str, list[float]], groups: list[int] | None = None) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    plain_paired, plain_interval = paired_ratio(times, "plain-adapters", "plain-full", groups)
    lean_paired, lean_interval = paired_ratio(times, "lean-adapters", "lean-full", groups)
    return {
        "seconds": med,
        "ratio_plain": med["plain-adapters"] / med["plain-full"],
        "ratio_lean": med["lean-adapters"] / med["lean-full"],
        "ratio_plain_paired": plain_paired,
        "ratio_plain_paired_interval": plain_interval,
        "ratio_lean_paired": lean_paired,
        "ratio_lean_paired_interval": lean_interval,
        "ratio_lean_adapters_vs_plain_full": med["lean-adapters"] / med["plain-full"],
    }


def _adapted_model(size: int, tasks: int):
    """The shipped model with ``tasks`` perturbed Houlsby adapters (norm and head copies each)."""
    from adaptune import AdapterConfig, add_adapter
    from adaptune.models.loading import load_classifier

    torch.manual_seed(0)
    model = load_classifier("minilm", 2).eval()
    for t in range(tasks):
        aset = add_adapter(model, f"task{t}", AdapterConfig.preset("houlsby", size=size))
        with torch.no_grad():  # trained-looking weights, so every task really differs
            for p in aset.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return model


def forward_fn(model, batch: dict, adapters):
    """A call that runs one no-grad forward of ``batch`` through ``adapters`` (a name, a per-row list, None)."""
    from adaptune import set_active

    def fn():
        set_active(model, adapters)
        with torch.no_grad():
            model(**batch)

    return fn


def without_adapter_kernel(fn):
    """``fn`` run with the adapter's C kernel off (torch's products for the adapter instead)."""
    from adaptune.cpu import adapter_gemm

    def off():
        previous = adapter_gemm.set_enabled(False)
        try:
            fn()
        finally:
            adapter_gemm.set_enabled(previous)

    return off


def section_infer(args) -> dict:
    from adaptune.cpu import adapter_gemm

    model = _adapted_model(args.size, 1)
    batch = make_batch(args.batch, args.length, 30000, labels=False)
    fns = {"base": forward_fn(model, batch, None), "adapter": forward_fn(model, batch, "task0")}
    if adapter_gemm.available():  # the kernel runs here: also time the adapter without it
        fns["adapter-torch"] = without_adapter_kernel(fns["adapter"])
    times = alternate_times(fns, args.rounds * 2)
    return {"times": times, "flop_ideal": args.size / (3 * 384), **infer_figures(times)}


def infer_figures(times: dict[str, list[float]], groups: list[int] | None = None) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    paired, interval = paired_ratio(times, "adapter", "base", groups)
    out = {
        "seconds": med,
        "overhead": med["adapter"] / med["base"] - 1.0,
        "overhead_paired": paired - 1.0,
        "overhead_paired_interval": [r - 1.0 for r in interval],
    }
    if "adapter-torch" in times:  # the same adapter with torch's products instead of the C kernel
        paired, interval = paired_ratio(times, "adapter-torch", "base", groups)
        out.update(
            overhead_torch=med["adapter-torch"] / med["base"] - 1.0,
            overhead_torch_paired=paired - 1.0,
            overhead_torch_paired_interval=[r - 1.0 for r in interval],
        )
    return out


def section_mixed(args) -> dict:
    from adaptune import set_active

    model = _adapted_model(args.size, args.tasks)
    batch = make_batch(args.batch, args.length, 30000, labels=False)
    rows = [f"task{i % args.tasks}" for i in range(args.batch)]

    times = alternate_times(
        {"single": forward_fn(model, batch, "task0"), "mixed": forward_fn(model, batch, rows)}, args.rounds * 2
    )
    # Equality: each row of the mixed batch against the same rows run on their own task.
    set_active(model, rows)
    with torch.no_grad():
        mixed = model(**batch).logits
    worst = 0.0
    for t in range(args.tasks):
        idx = [i for i, n in enumerate(rows) if n == f"task{t}"]
        set_active(model, f"task{t}")
        with torch.no_grad():
            alone = model(**{k: v[idx] for k, v in batch.items()}).logits
        worst = max(worst, (mixed[idx] - alone).abs().max().item())
    return {"times": times, "tasks": args.tasks, "max_abs_diff_vs_separate": worst, **mixed_figures(times)}


def mixed_figures(times: dict[str, list[float]], groups: list[int] | None = None) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    paired, interval = paired_ratio(times, "single", "mixed", groups)
    return {
        "seconds": med,
        "throughput_ratio": med["single"] / med["mixed"],
        "throughput_ratio_paired": paired,
        "throughput_ratio_paired_interval": interval,
    }


def section_small(args) -> dict:
    from adaptune.training.train import training_step

    model = _adapted_model(args.size, 1)
    batch = make_batch(args.small_batch, args.small_length, 30000, labels=False)

    fns = {"infer-base": forward_fn(model, batch, None), "infer-adapter": forward_fn(model, batch, "task0")}
    train_batch = make_batch(args.small_batch, args.small_length, 30000)
    rounds = args.rounds * 40
    for strategy in ("adapters", "full"):
        m, opt, sched, cfg = build(strategy, args.size, False, rounds + 10, args.embedding_norm == "train")

        def step(m=m, opt=opt, sched=sched, cfg=cfg):
            training_step(m, train_batch, opt, sched, task_type="classification", max_grad_norm=cfg.max_grad_norm)

        fns[f"train-{strategy}"] = step
    return _infer_and_train(fns, rounds, f"{args.small_batch}x{args.small_length} tokens")


def _infer_and_train(fns: dict, rounds: int, what: str) -> dict:
    """Time ``infer-base``/``infer-adapter`` and ``train-adapters``/``train-full`` in turn; both ratios."""
    times = alternate_times(fns, rounds, warmup=5)
    return {"what": what, "times": times, **infer_and_train_figures(times)}


def infer_and_train_figures(times: dict[str, list[float]], groups: list[int] | None = None) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    infer_paired, infer_interval = paired_ratio(times, "infer-adapter", "infer-base", groups)
    train_paired, train_interval = paired_ratio(times, "train-adapters", "train-full", groups)
    return {
        "seconds": med,
        "rounds": len(times["infer-base"]),
        "infer_ratio": med["infer-adapter"] / med["infer-base"],
        "infer_ratio_paired": infer_paired,
        "infer_ratio_paired_interval": infer_interval,
        "train_ratio": med["train-adapters"] / med["train-full"],
        "train_ratio_paired": train_paired,
        "train_ratio_paired_interval": train_interval,
    }


def section_host(args) -> dict:
    import transformers as T

    from adaptune import AdapterConfig, add_adapter
    from adaptune.training.train import TrainConfig, make_optimizer, training_step
    from adaptune.core.trainable import train_strategy

    def model_for(strategy: str):
        torch.manual_seed(0)
        cfg = T.LlamaConfig(
            hidden_size=64,
            num_hidden_layers=30,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=100,
            pad_token_id=0,
            num_labels=2,
        )
        m = T.AutoModelForSequenceClassification.from_config(cfg)
        if strategy == "adapters":
            add_adapter(m, "task", AdapterConfig.preset("houlsby", size=16))
        train_strategy(m, strategy)
        return m

    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(3, 100, (2, 8), generator=g),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
    }
    labels = torch.tensor([0, 1])
    served = model_for("adapters").eval()

    fns = {"infer-base": forward_fn(served, batch, None), "infer-adapter": forward_fn(served, batch, "task")}
    for strategy in ("adapters", "full"):
        m = model_for(strategy).train()
        opt, sched = make_optimizer(m, TrainConfig(strategy=strategy), 10**6)
        fns[f"train-{strategy}"] = lambda m=m, opt=opt, sched=sched: training_step(
            m, {**batch, "labels": labels}, opt, sched, task_type="classification", max_grad_norm=1.0
        )
    return _infer_and_train(fns, args.rounds * 20, "30-layer 64-wide LLaMA, 2x8 tokens")


# ---- memory: one subprocess per variant --------------------------------------------------------


def _forwarded(args, *names: str) -> list[str]:
    """``--name value`` for each of ``args``' options ``names``, for a worker process of this script."""
    return [x for n in names for x in (f"--{n.replace('_', '-')}", str(getattr(args, n)))]


def _run_worker(argv: list[str], what: str, env: dict[str, str] | None = None) -> dict:
    """This script in a fresh process with ``argv`` (and ``env`` added to the environment): the JSON
    its last line prints. Exits with the worker's error output, named ``what``, if it fails."""
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if out.returncode != 0:
        sys.exit(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_worker(args) -> dict:
    from adaptune import keep_freed_memory
    from adaptune.training.train import training_step

    for module in ("transformers.models.bert.modeling_bert", "adaptune.training.train", "adaptune.cpu.kernels"):
        importlib.import_module(module)  # the runtime: Python and the libraries, before any weights

    strategy, lean = args.worker.split(":")
    runtime = _status_kib("VmRSS") * 1024
    model, opt, sched, cfg = build(
        strategy, args.size, lean == "lean", args.mem_steps + 1, args.embedding_norm == "train"
    )
    batch = make_batch(args.batch, args.length, 30000)
    before = _status_kib("VmRSS") * 1024
    try:  # "5" resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    with keep_freed_memory():  # as train() runs (does nothing under MALLOC_MMAP_THRESHOLD_)
        for _ in range(args.mem_steps):
            training_step(model, batch, opt, sched, task_type="classification", max_grad_norm=cfg.max_grad_norm)
    return {"runtime": runtime, "before": before, "peak": _status_kib("VmHWM") * 1024, "hwm_reset": reset}


def section_memory(args) -> dict:
    passed = _forwarded(args, "size", "embedding_norm", "batch", "length", "threads", "mem_steps")
    runs: dict[str, list[dict]] = {}
    # "exact": every allocation of 128 KiB or more gets its own mapping and goes back to the OS when
    # freed, so the peak RSS is the peak of live tensors (plus the process), free of how glibc's heap
    # happens to fragment; slower (page faults), so it is measured apart from the speed figures.
    allocators = {"default": {}, "exact": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
    for _ in range(args.mem_repeats):
        for alloc, env in allocators.items():
            for variant in ("adapters:plain", "full:plain", "adapters:lean", "full:lean"):
                runs.setdefault(f"{variant}:{alloc}", []).append(
                    _run_worker(["--worker", variant, *passed], f"memory worker {variant}", env)
                )
    med = {
        v: {k: statistics.median(r[k] for r in rs) for k in ("runtime", "before", "peak")} for v, rs in runs.items()
    }
    res = {"bytes": med}
    for alloc in allocators:
        for lean in ("plain", "lean"):
            a, f = med[f"adapters:{lean}:{alloc}"], med[f"full:{lean}:{alloc}"]
            res[f"peak_ratio_{lean}_{alloc}"] = a["peak"] / f["peak"]
            res[f"increment_ratio_{lean}_{alloc}"] = (a["peak"] - a["before"]) / (f["peak"] - f["before"])
            # what the job holds beyond Python and the libraries: weights, activations, gradients,
            # optimizer state (what torch.cuda.max_memory_allocated counts on a GPU)
            res[f"training_ratio_{lean}_{alloc}"] = (a["peak"] - a["runtime"]) / (f["peak"] - f["runtime"])
    return res


# ---- heap: keep_freed_memory on and off, one subprocess each ---------------------------------------


def heap_worker(args) -> dict:
    """Median CPU seconds and page faults per call of each variant, in this (fresh) process: the
    training steps of both strategies (``--heap-worker train``) or the adapter's forward alone, as a
    serving process runs it (``--heap-worker infer``)."""
    import resource

    from adaptune import keep_freed_memory
    from adaptune.training.train import training_step

    fns = {}
    if args.heap_worker == "train":
        batch = make_batch(args.batch, args.length, 30000)
        for strategy in ("adapters", "full"):
            model, opt, sched, cfg = build(
                strategy, args.size, False, 2 * args.rounds + 2, args.embedding_norm == "train"
            )
            fns[f"train-{strategy}"] = lambda m=model, o=opt, s=sched, c=cfg: training_step(
                m, batch, o, s, task_type="classification", max_grad_norm=c.max_grad_norm
            )
    else:
        served = _adapted_model(args.size, 1)
        fns["infer-adapter"] = forward_fn(served, make_batch(args.batch, args.length, 30000, labels=False), "task0")
    times: dict[str, list[float]] = {k: [] for k in fns}
    faults: dict[str, list[int]] = {k: [] for k in fns}
    with keep_freed_memory() as applied:
        for r in range(args.rounds + 1):
            for k, fn in fns.items():
                f0, c = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
                fn()
                if r:  # the first round warms up
                    times[k].append(time.process_time() - c)
                    faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {
        "kept": applied,
        "seconds": {k: statistics.median(v) for k, v in times.items()},
        "faults": {k: statistics.median(v) for k, v in faults.items()},
        "peak_rss": _status_kib("VmHWM") * 1024,
    }


def section_heap(args) -> dict:
    passed = _forwarded(args, "size", "embedding_norm", "batch", "length", "threads", "rounds")
    runs: dict[str, list[dict]] = {"kept": [], "default": []}
    for _ in range(args.heap_repeats):
        pair: dict[str, dict] = {"kept": {}, "default": {}}
        for what in ("train", "infer"):
            for label, flag in (("default", "0"), ("kept", "1")):
                res = _run_worker(
                    ["--heap-worker", what, *passed],
                    f"heap worker ({what}, {label})",
                    {"ADAPTUNE_KEEP_FREED_MEMORY": flag},
                )
                if res["kept"] != (label == "kept"):
                    sys.exit(
                        f"keep_freed_memory {'did not apply' if label == 'kept' else 'applied unasked'} in the "
                        f"{label} worker (not glibc, or MALLOC_* set in the environment?)"
                    )
                for key in ("seconds", "faults"):
                    pair[label].setdefault(key, {}).update(res[key])
                pair[label].setdefault("peak_rss", {})[what] = res["peak_rss"]
        for label in runs:
            runs[label].append(pair[label])
    variants = list(runs["kept"][0]["seconds"])
    # each repeat ran a default and a kept process back to back: the ratio of that pair, median over repeats
    ratios = {
        v: statistics.median(k["seconds"][v] / d["seconds"][v] for k, d in zip(runs["kept"], runs["default"]))
        for v in variants
    }

    def medians(key: str, names) -> dict:  # per label and name, the median over the repeats
        return {lab: {n: statistics.median(r[key][n] for r in rs) for n in names} for lab, rs in runs.items()}

    return {
        "runs": runs,
        "kept_over_default": ratios,
        "seconds": medians("seconds", variants),
        "faults": medians("faults", variants),
        "peak_rss": medians("peak_rss", ("train", "infer")),
    }


# ---- speed sections in several fresh processes ----------------------------------------------------

# Per speed section: its figures from the rounds' times, and the paired figures each process shows.
SPEED_FIGURES = {
    "train": (train_figures, ("ratio_plain_paired", "ratio_lean_paired")),
    "infer": (infer_figures, ("overhead_paired",)),
    "mixed": (mixed_figures, ("throughput_ratio_paired",)),
    "small": (infer_and_train_figures, ("infer_ratio_paired", "train_ratio_paired")),
    "host": (infer_and_train_figures, ("infer_ratio_paired", "train_ratio_paired")),
}


def _fmt(key: str, value: float) -> str:
    return f"{100 * value:+.1f} %" if key.startswith("overhead") else f"{value:.3f}"


def section_in_processes(name: str, args) -> dict:
    """Section ``name`` run in ``--processes`` fresh processes one after another, its figures computed
    from all their rounds (intervals by a cluster bootstrap over processes).

    A process settles into a speed of its own (the plain base forward is fast in some processes and
    slow in others, throughout), so one process's figure is one draw of a process-level effect,
    which more rounds in the same process do not average out.
    """
    figures, headline = SPEED_FIGURES[name]
    passed = _forwarded(
        args, "rounds", "size", "embedding_norm", "batch", "length", "small_batch", "small_length", "tasks", "threads"
    )
    runs = []
    for i in range(args.processes):
        runs.append(_run_worker(["--section-worker", name, *passed], f"{name} process {i + 1}"))
        print(
            f"       process {i + 1}/{args.processes}: " + ", ".join(f"{k} {_fmt(k, runs[-1][k])}" for k in headline),
            flush=True,
        )
    times = {k: [t for r in runs for t in r["times"][k]] for k in runs[0]["times"]}
    groups = [len(next(iter(r["times"].values()))) for r in runs]
    res = {
        **runs[0],
        "times": times,
        **figures(times, groups),
        "per_process": {k: [r[k] for r in runs] for k in headline},
    }
    if name == "mixed":
        res["max_abs_diff_vs_separate"] = max(r["max_abs_diff_vs_separate"] for r in runs)
    return res


def report(name: str, res: dict, args) -> None:
    mib = 2**20
    if "per_process" in res:
        print(
            f"{name:<6} pooled over {len(next(iter(res['per_process'].values())))} processes (intervals resample "
            "processes, then rounds); each process's paired median: "
            + " | ".join(f"{k} " + " ".join(_fmt(k, v) for v in vs) for k, vs in res["per_process"].items())
        )
    if name == "train":
        s = res["seconds"]
        print(
            f"train  step CPU s: plain adapters {s['plain-adapters']:.3f} full {s['plain-full']:.3f} | "
            f"lean adapters {s['lean-adapters']:.3f} full {s['lean-full']:.3f}"
        )
        print(
            f"train  ratio adapters/full (median): plain {res['ratio_plain']:.3f} | lean (both) "
            f"{res['ratio_lean']:.3f} | "
            f"lean adapters / plain full {res['ratio_lean_adapters_vs_plain_full']:.3f}"
        )
        lo_p, hi_p = res["ratio_plain_paired_interval"]
        lo_l, hi_l = res["ratio_lean_paired_interval"]
        print(
            f"train  ratio adapters/full (median of each round's pair, 90 % bootstrap interval): "
            f"plain {res['ratio_plain_paired']:.3f} ({lo_p:.3f}-{hi_p:.3f}) | "
            f"lean (both) {res['ratio_lean_paired']:.3f} ({lo_l:.3f}-{hi_l:.3f})"
        )
        print(
            f"train  FLOP ideal, counted (FlopCounterMode, forward + backward): {res['flop_ideal']:.3f} "
            f"({res['flops']['adapters'] / 1e9:.1f} / {res['flops']['full'] / 1e9:.1f} GFLOP); "
            f"plain median is {100 * (res['ratio_plain'] / res['flop_ideal'] - 1):+.1f} % of it"
        )
    elif name == "infer":
        print(
            f"infer  forward CPU s: base {res['seconds']['base']:.3f} adapter {res['seconds']['adapter']:.3f} | "
            f"overhead {100 * res['overhead']:+.1f} % (FLOP ideal {100 * res['flop_ideal']:.1f} %) | median of each "
            f"round's pair {100 * res['overhead_paired']:+.1f} % (90 % interval "
            f"{100 * res['overhead_paired_interval'][0]:+.1f} to {100 * res['overhead_paired_interval'][1]:+.1f} %)"
        )
        if "overhead_torch" in res:
            lo, hi = res["overhead_torch_paired_interval"]
            print(
                "infer  the adapter with torch's products instead of its C kernel: "
                f"{res['seconds']['adapter-torch']:.3f} s"
                f" | overhead {100 * res['overhead_torch']:+.1f} %, paired {100 * res['overhead_torch_paired']:+.1f} "
                "% "
                f"({100 * lo:+.1f} to {100 * hi:+.1f} %)"
            )
    elif name == "mixed":
        print(
            f"mixed  forward CPU s: single task {res['seconds']['single']:.3f} {res['tasks']} tasks "
            f"{res['seconds']['mixed']:.3f} | throughput mixed/single {res['throughput_ratio']:.3f}, paired "
            f"{res['throughput_ratio_paired']:.3f} ({res['throughput_ratio_paired_interval'][0]:.3f}-"
            f"{res['throughput_ratio_paired_interval'][1]:.3f}) | "
            f"max |diff| vs separate runs {res['max_abs_diff_vs_separate']:.2e}"
        )
    elif name in ("small", "host"):
        s, (lo, hi), (tlo, thi) = (
            res["seconds"],
            res["infer_ratio_paired_interval"],
            res["train_ratio_paired_interval"],
        )
        print(
            f"{name:<6} {res['what']}, {res['rounds']} rounds, CPU ms: forward base {1e3 * s['infer-base']:.1f} "
            "adapter "
            f"{1e3 * s['infer-adapter']:.1f} (overhead {100 * (res['infer_ratio'] - 1):+.1f} %, paired "
            f"{100 * (res['infer_ratio_paired'] - 1):+.1f} %, {100 * (lo - 1):+.1f} to {100 * (hi - 1):+.1f} %) | "
            f"train step adapters {1e3 * s['train-adapters']:.1f} full {1e3 * s['train-full']:.1f} "
            f"(ratio {res['train_ratio']:.3f}, paired {res['train_ratio_paired']:.3f}, {tlo:.3f}-{thi:.3f})"
        )
    elif name == "memory":
        b = res["bytes"]
        print(
            "memory peak RSS MiB: "
            + ", ".join(
                f"{v} {b[v]['peak'] / mib:.0f} (runtime {b[v]['runtime'] / mib:.0f}, "
                f"model built {b[v]['before'] / mib:.0f})"
                for v in b
            )
        )
        for alloc, what in (
            ("default", "heap as train() runs it"),
            ("exact", "live tensors (each large one mapped apart)"),
        ):
            print(
                f"memory ratio adapters/full peak, {what}: plain {res[f'peak_ratio_plain_{alloc}']:.3f} | "
                f"lean (both) {res[f'peak_ratio_lean_{alloc}']:.3f} | above the runtime (Python + libraries): "
                f"plain {res[f'training_ratio_plain_{alloc}']:.3f} lean {res[f'training_ratio_lean_{alloc}']:.3f} | "
                f"increment over the loaded model: plain {res[f'increment_ratio_plain_{alloc}']:.3f} "
                f"lean {res[f'increment_ratio_lean_{alloc}']:.3f}"
            )
    elif name == "heap":
        s, f = res["seconds"], res["faults"]
        print(
            f"heap   {args.heap_repeats} process pairs x {args.rounds} rounds, kept / glibc default: "
            + " | ".join(
                f"{v} {s['kept'][v]:.3f} / {s['default'][v]:.3f} s (paired {res['kept_over_default'][v]:.3f}), "
                f"page faults {f['kept'][v]:.0f} / {f['default'][v]:.0f}"
                for v in s["kept"]
            )
        )
        print(
            "heap   peak RSS MiB, kept / default: "
            + " | ".join(
                f"{w} process {res['peak_rss']['kept'][w] / mib:.0f} / {res['peak_rss']['default'][w] / mib:.0f}"
                for w in ("train", "infer")
            )
        )


def run_section(name: str, args) -> dict:
    """Section ``name`` in this process, inside ``keep_freed_memory`` as the library's training loop
    and command line run."""
    from adaptune import keep_freed_memory

    with keep_freed_memory():
        return globals()[f"section_{name}"](args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per figure (inference: twice as many)")
    p.add_argument("--size", type=int, default=64, help="adapter size m")
    p.add_argument(
        "--embedding-norm",
        choices=("train", "frozen"),
        default="train",
        help="adapters: train a copy of the embedding LayerNorm (the released code) or keep it frozen "
        "(backward stops at the first adapter; the configuration of the issue's FLOP ideal 0.713)",
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--small-batch", type=int, default=1, help="rows of the 'small' section's batch")
    p.add_argument("--small-length", type=int, default=16, help="tokens per row in the 'small' section")
    p.add_argument("--tasks", type=int, default=4, help="tasks in the mixed batch")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mem-steps", type=int, default=3)
    p.add_argument("--mem-repeats", type=int, default=1)
    p.add_argument(
        "--heap-repeats", type=int, default=3, help="process pairs (default heap, kept) of the heap section"
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run each speed section (train, infer, mixed, small, host) in this many fresh processes "
        "and pool their rounds (default 1: in this process)",
    )
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--heap-worker", choices=("train", "infer"), help=argparse.SUPPRESS)
    p.add_argument("--section-worker", choices=tuple(SPEED_FIGURES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if min(args.rounds, args.processes, args.threads) < 1:
        p.error("--rounds, --processes and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(memory_worker(args)), flush=True)
        return
    if args.heap_worker:
        print(json.dumps(heap_worker(args)), flush=True)
        return
    if args.section_worker:
        print(json.dumps(run_section(args.section_worker, args)), flush=True)
        return
    print(
        f"model all-MiniLM-L6-v2 | Houlsby m={args.size} (+ norm and head copies; embedding norm "
        f"{args.embedding_norm}) | random {args.batch}x{args.length} | "
        f"torch {torch.__version__} cpu, {torch.get_num_threads()} threads | median CPU time of {args.rounds} rounds, "
        "variants alternating" + (f", in each of {args.processes} fresh processes" if args.processes > 1 else ""),
        flush=True,
    )
    results = {}
    for name in args.only.split(","):
        if name not in SECTIONS:
            sys.exit(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
        t0 = time.perf_counter()
        if args.processes > 1 and name in SPEED_FIGURES:
            results[name] = section_in_processes(name, args)
        else:
            results[name] = run_section(name, args)
        report(name, results[name], args)
        print(f"       ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"config": vars(args), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
