"""Adapter speed and memory as ratios measured in one run: training step, inference, memory, mixed tasks.

All on all-MiniLM-L6-v2 (the shipped model), Houlsby adapters (size --size, default 64, with
layer-norm and head copies), random token batches of --batch x --length (default 32 x 128, every
token real), fp32 on CPU. On a shared machine only ratios within one run mean anything: the
variants of each figure alternate step by step in one process and the median CPU time
(time.process_time) per step is compared; --threads 1 (default) keeps other processes' load from
leaking into it.

- train:  one optimisation step (forward, backward, clip, AdamW, scheduler) through the library's
          own ``training_step``, adapters vs full fine-tuning, with torch's dropout and attention
          ("plain") and with :func:`adaptune.kernels.use_lean_kernels` on both ("lean").
- infer:  forward pass in eval mode under no_grad, the same model with the adapter active vs
          ``set_active(model, None)`` (the plain base).
- mixed:  --tasks adapters (each with its own norms and head); one batch whose rows cycle through
          the tasks vs the same batch all on one task; reported as throughput mixed / single.
- memory: peak RSS of a fresh subprocess per strategy over --mem-steps training steps (VmHWM,
          reset after the model is built), adapters vs full, plain and lean.

Run:  .venv/bin/python bench/adapter_speed.py [--only train,infer,mixed,memory] [--rounds 5]
      [--size 64] [--batch 32] [--length 128] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

SECTIONS = ("train", "infer", "mixed", "memory")


def make_batch(batch: int, length: int, vocab: int, seed: int = 0, labels: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(1000, vocab, (batch, length), generator=g),
           "attention_mask": torch.ones(batch, length, dtype=torch.long),
           "token_type_ids": torch.zeros(batch, length, dtype=torch.long)}
    if labels:
        out["labels"] = torch.randint(0, 2, (batch,), generator=g)
    return out


def build(strategy: str, size: int, lean: bool, steps: int):
    """Model, optimizer and scheduler through the library's own training path."""
    from adaptune.kernels import use_lean_kernels
    from adaptune.models import quiet_transformers
    from adaptune.train import TrainConfig, build_model, make_optimizer

    cfg = TrainConfig(strategy=strategy, adapter_size=size) if strategy == "adapters" else TrainConfig(strategy=strategy)
    with quiet_transformers():
        model, _ = build_model(cfg, 2)
    if lean:
        use_lean_kernels(model)
    model.train()
    optimizer, scheduler = make_optimizer(model, cfg, steps)
    return model, optimizer, scheduler, cfg


def alternate(fns: dict, rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median CPU seconds per call of each fn, calling them in turn, round after round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + rounds):
        for k, fn in fns.items():
            c = time.process_time()
            fn()
            if r >= warmup:
                times[k].append(time.process_time() - c)
    return {k: statistics.median(v) for k, v in times.items()}


def section_train(args) -> dict:
    from adaptune.train import training_step

    batch = make_batch(args.batch, args.length, 30000)
    steps = args.rounds + 2
    fns = {}
    for lean in (False, True):
        for strategy in ("adapters", "full"):
            model, opt, sched, cfg = build(strategy, args.size, lean, steps)

            def fn(model=model, opt=opt, sched=sched, cfg=cfg):
                training_step(model, batch, opt, sched, task_type="classification", max_grad_norm=cfg.max_grad_norm)

            fns[f"{'lean' if lean else 'plain'}-{strategy}"] = fn
    med = alternate(fns, args.rounds)
    del fns
    return {"seconds": med,
            "ratio_plain": med["plain-adapters"] / med["plain-full"],
            "ratio_lean": med["lean-adapters"] / med["lean-full"],
            "ratio_lean_adapters_vs_plain_full": med["lean-adapters"] / med["plain-full"]}


def _adapted_model(size: int, tasks: int):
    """The shipped model with ``tasks`` perturbed Houlsby adapters (norm and head copies each)."""
    from adaptune import AdapterConfig, add_adapter
    from adaptune.models import load_classifier

    torch.manual_seed(0)
    model = load_classifier("minilm", 2).eval()
    for t in range(tasks):
        aset = add_adapter(model, f"task{t}", AdapterConfig.preset("houlsby", size=size))
        with torch.no_grad():  # trained-looking weights, so every task really differs
            for p in aset.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return model


def section_infer(args) -> dict:
    from adaptune import set_active

    model = _adapted_model(args.size, 1)
    batch = make_batch(args.batch, args.length, 30000, labels=False)

    def run(name):
        def fn():
            set_active(model, name)
            with torch.no_grad():
                model(**batch)
        return fn

    med = alternate({"base": run(None), "adapter": run("task0")}, args.rounds * 2)
    return {"seconds": med, "overhead": med["adapter"] / med["base"] - 1.0, "flop_ideal": args.size / (3 * 384)}


def section_mixed(args) -> dict:
    from adaptune import set_active

    model = _adapted_model(args.size, args.tasks)
    batch = make_batch(args.batch, args.length, 30000, labels=False)
    rows = [f"task{i % args.tasks}" for i in range(args.batch)]

    def run(names):
        def fn():
            set_active(model, names)
            with torch.no_grad():
                model(**batch)
        return fn

    med = alternate({"single": run("task0"), "mixed": run(rows)}, args.rounds * 2)
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
    return {"seconds": med, "throughput_ratio": med["single"] / med["mixed"], "tasks": args.tasks,
            "max_abs_diff_vs_separate": worst}


# ---- memory: one subprocess per variant --------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_worker(args) -> dict:
    from adaptune.train import training_step

    strategy, lean = args.worker.split(":")
    model, opt, sched, cfg = build(strategy, args.size, lean == "lean", args.mem_steps + 1)
    batch = make_batch(args.batch, args.length, 30000)
    before = _status_kib("VmRSS") * 1024
    try:  # "5" resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    for _ in range(args.mem_steps):
        training_step(model, batch, opt, sched, task_type="classification", max_grad_norm=cfg.max_grad_norm)
    return {"before": before, "peak": _status_kib("VmHWM") * 1024, "hwm_reset": reset}


def section_memory(args) -> dict:
    passed = ["--size", str(args.size), "--batch", str(args.batch), "--length", str(args.length),
              "--threads", str(args.threads), "--mem-steps", str(args.mem_steps)]
    runs: dict[str, list[dict]] = {}
    for _ in range(args.mem_repeats):
        for variant in ("adapters:plain", "full:plain", "adapters:lean", "full:lean"):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", variant, *passed],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"memory worker {variant} failed:\n{out.stderr[-3000:]}")
            runs.setdefault(variant, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("before", "peak")} for v, rs in runs.items()}
    res = {"bytes": med}
    for lean in ("plain", "lean"):
        a, f = med[f"adapters:{lean}"], med[f"full:{lean}"]
        res[f"peak_ratio_{lean}"] = a["peak"] / f["peak"]
        res[f"increment_ratio_{lean}"] = (a["peak"] - a["before"]) / (f["peak"] - f["before"])
    res["peak_ratio_lean_adapters_vs_plain_full"] = med["adapters:lean"]["peak"] / med["full:plain"]["peak"]
    return res


def report(name: str, res: dict, args) -> None:
    mib = 2**20
    if name == "train":
        s = res["seconds"]
        print(f"train  step CPU s: plain adapters {s['plain-adapters']:.3f} full {s['plain-full']:.3f} | "
              f"lean adapters {s['lean-adapters']:.3f} full {s['lean-full']:.3f}")
        print(f"train  ratio adapters/full: plain {res['ratio_plain']:.3f} | lean (both) {res['ratio_lean']:.3f} | "
              f"lean adapters / plain full {res['ratio_lean_adapters_vs_plain_full']:.3f}")
    elif name == "infer":
        print(f"infer  forward CPU s: base {res['seconds']['base']:.3f} adapter {res['seconds']['adapter']:.3f} | "
              f"overhead {100 * res['overhead']:+.1f} % (FLOP ideal {100 * res['flop_ideal']:.1f} %)")
    elif name == "mixed":
        print(f"mixed  forward CPU s: single task {res['seconds']['single']:.3f} {res['tasks']} tasks "
              f"{res['seconds']['mixed']:.3f} | throughput mixed/single {res['throughput_ratio']:.3f} | "
              f"max |diff| vs separate runs {res['max_abs_diff_vs_separate']:.2e}")
    elif name == "memory":
        b = res["bytes"]
        print("memory peak RSS MiB: " + ", ".join(f"{v} {b[v]['peak'] / mib:.0f} (before {b[v]['before'] / mib:.0f})" for v in b))
        print(f"memory ratio adapters/full peak: plain {res['peak_ratio_plain']:.3f} | lean (both) {res['peak_ratio_lean']:.3f} | "
              f"lean adapters / plain full {res['peak_ratio_lean_adapters_vs_plain_full']:.3f} | "
              f"increment plain {res['increment_ratio_plain']:.3f} lean {res['increment_ratio_lean']:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per figure (inference: twice as many)")
    p.add_argument("--size", type=int, default=64, help="adapter size m")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--tasks", type=int, default=4, help="tasks in the mixed batch")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mem-steps", type=int, default=3)
    p.add_argument("--mem-repeats", type=int, default=1)
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(memory_worker(args)), flush=True)
        return
    print(f"model all-MiniLM-L6-v2 | Houlsby m={args.size} (+ norm and head copies) | random {args.batch}x{args.length} | "
          f"torch {torch.__version__} cpu, {torch.get_num_threads()} threads | median CPU time of {args.rounds} rounds, "
          "variants alternating", flush=True)
    results = {}
    for name in args.only.split(","):
        if name not in SECTIONS:
            sys.exit(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
        t0 = time.perf_counter()
        results[name] = globals()[f"section_{name}"](args)
        report(name, results[name], args)
        print(f"       ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"config": vars(args), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
