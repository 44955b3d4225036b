"""Training throughput and peak memory: adapter tuning vs full fine-tuning, in one run.

Measures examples/s and peak memory of one training step loop for Houlsby adapters (m=64, the
default ``TrainConfig(strategy="adapters")``) and for full fine-tuning (``strategy="full"``) on
all-MiniLM-L6-v2, through the library's own path: ``build_model`` + ``make_optimizer`` +
``training_step`` on batches from ``encode``/``bucket_batches``/``collate`` of the embedded reviews
data (same seed, so the same batches for both). 2 warm-up steps are not timed, then --steps timed.
``--fixed-length 128`` uses random token batches of batch x 128 instead (the issue-5 shape).

Each strategy runs in a fresh subprocess (this script with --worker), so peak memory is its own:
on CPU, VmRSS before the first step and VmHWM after the last (/proc/self/status; the high-water
mark is reset before training when the kernel allows it); on CUDA, torch.cuda.max_memory_allocated.
Workers alternate (adapters, full, adapters, full, ...) --repeats times, and the median examples/s
per strategy is reported. On a noisy shared machine only the ratios adapter/full mean anything;
the CPU-time column (time.process_time per step) is less sensitive to other processes than wall
time, most of all with --threads 1. Batches vary in length, so compare medians across strategies.

Run:  .venv/bin/python bench/train_throughput.py [--steps 20] [--repeats 2] [--fixed-length 128]
      [--batch 32] [--max-length 128] [--threads N] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

STRATEGIES = ("adapters", "full")
WARMUP = 2


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args) -> dict:
    import torch

    from adaptune.data.loading import bucket_batches, collate, encode, load_task_data
    from adaptune.models.loading import load_tokenizer, quiet_transformers
    from adaptune.training.train import TrainConfig, build_model, make_optimizer, pick_device, training_step

    if args.threads:
        torch.set_num_threads(args.threads)
    n = WARMUP + args.steps
    cfg = TrainConfig(
        strategy=args.worker,
        batch_size=args.batch,
        max_length=args.max_length,
        limit_train=n * args.batch,
        device=args.device,
    )
    device = pick_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model)
    if args.fixed_length:
        g = torch.Generator().manual_seed(cfg.seed)
        shape = (args.batch, args.fixed_length)
        batches = [
            {
                "input_ids": torch.randint(1000, tokenizer.vocab_size, shape, generator=g),
                "attention_mask": torch.ones(shape, dtype=torch.long),
                "token_type_ids": torch.zeros(shape, dtype=torch.long),
                "labels": torch.randint(0, 2, (args.batch,), generator=g),
            }
            for _ in range(n)
        ]
        num_labels, task_type = 2, "classification"
    else:
        data = load_task_data(cfg.data, limit_train=cfg.limit_train, seed=cfg.seed)
        enc = encode(data.train, tokenizer, cfg.max_length)
        order = bucket_batches([len(e["input_ids"]) for e in enc], cfg.batch_size, shuffle=True, seed=cfg.seed)
        order = [b for b in order if len(b) == cfg.batch_size]
        batches = [collate([enc[i] for i in order[k % len(order)]], tokenizer.pad_token_id) for k in range(n)]
        num_labels, task_type = len(data.label_names), data.task_type
    with quiet_transformers():
        model, counts = build_model(cfg, num_labels)
    model.to(device).train()
    optimizer, scheduler = make_optimizer(model, cfg, n)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _status_kib("VmRSS") * 1024
    hwm_reset = False if cuda else _reset_hwm()
    times, cpu, losses = [], [], []
    for k, batch in enumerate(batches):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(
            training_step(model, batch, optimizer, scheduler, task_type=task_type, max_grad_norm=cfg.max_grad_norm)
        )
        sync()
        if k >= WARMUP:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    peak = torch.cuda.max_memory_allocated(device) if cuda else _status_kib("VmHWM") * 1024
    timed = batches[WARMUP:]
    return {
        "strategy": args.worker,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "trainable": counts.trainable,
        "percent": counts.percent,
        "seconds": sum(times),
        "step_median_s": statistics.median(times),
        "cpu_step_median_s": statistics.median(cpu),
        "examples_per_s": sum(len(b["labels"]) for b in timed) / sum(times),
        "tokens_per_s": sum(int(b["attention_mask"].sum()) for b in timed) / sum(times),
        "mean_len": statistics.mean(b["input_ids"].shape[1] for b in timed),
        "mem_before": before,
        "mem_peak": peak,
        "mem_increment": peak - before,
        "hwm_reset": hwm_reset,
        "last_loss": losses[-1],
        "times": times,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per worker (after 2 warm-up steps)")
    p.add_argument("--repeats", type=int, default=2, help="alternating (adapters, full) rounds")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--fixed-length", type=int, default=0, help="random token batches of batch x L instead of reviews")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--worker", choices=STRATEGIES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return

    passed = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("json", "worker", "repeats")]
    runs: dict[str, list[dict]] = {s: [] for s in STRATEGIES}
    for r in range(args.repeats):
        for s in STRATEGIES:
            t0 = time.perf_counter()
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--worker", s, *passed], capture_output=True, text=True
            )
            if out.returncode != 0:
                sys.exit(f"worker {s} failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            runs[s].append(res)
            print(
                f"  round {r + 1}/{args.repeats} {s:8s} {res['examples_per_s']:7.2f} ex/s "
                f"(worker {time.perf_counter() - t0:.0f}s)",
                file=sys.stderr,
                flush=True,
            )

    med = {
        s: {
            k: statistics.median(x[k] for x in runs[s])
            for k in (
                "examples_per_s",
                "tokens_per_s",
                "step_median_s",
                "cpu_step_median_s",
                "mem_before",
                "mem_peak",
                "mem_increment",
            )
        }
        for s in STRATEGIES
    }
    a, f, first = med["adapters"], med["full"], runs["adapters"][0]
    mem = "cuda max_memory_allocated" if first["device"].startswith("cuda") else "RSS (VmRSS before, VmHWM after)"
    shape = (
        f"random {args.batch}x{args.fixed_length}"
        if args.fixed_length
        else f"reviews, batch {args.batch}, max_length {args.max_length}, mean padded length {first['mean_len']:.1f}"
    )
    mib = lambda b: f"{b / 2**20:8.1f}"
    print(
        f"model all-MiniLM-L6-v2 | {shape} | {WARMUP} warm-up + {args.steps} timed steps x {args.repeats} "
        f"rounds (interleaved) | torch {first['torch']} | {first['device']}, {first['threads']} threads | "
        f"memory: {mem}{'' if first['hwm_reset'] or first['device'] != 'cpu' else ', HWM not reset'}"
    )
    print(
        f"{'strategy':9s} {'trainable':>10s} {'ex/s':>8s} {'ex/s runs':>16s} {'step s':>7s} {'cpu s':>7s} "
        f"{'before MiB':>10s} {'peak MiB':>9s} {'incr MiB':>9s}"
    )
    for s in STRATEGIES:
        m, r0 = med[s], runs[s][0]
        each = ",".join(f"{x['examples_per_s']:.1f}" for x in runs[s])
        print(
            f"{s:9s} {r0['trainable']:>10,d} {m['examples_per_s']:8.2f} {each:>16s} {m['step_median_s']:7.3f} "
            f"{m['cpu_step_median_s']:7.3f} "
            f"{mib(m['mem_before']):>10s} {mib(m['mem_peak']):>9s} {mib(m['mem_increment']):>9s}"
        )
    ratios = {
        "examples_per_s": a["examples_per_s"] / f["examples_per_s"],
        "step_time": f["examples_per_s"] / a["examples_per_s"],
        "cpu_step_time": a["cpu_step_median_s"] / f["cpu_step_median_s"],
        "mem_peak": a["mem_peak"] / f["mem_peak"],
        "mem_increment": a["mem_increment"] / f["mem_increment"] if f["mem_increment"] > 0 else None,
    }
    print(
        f"ratios adapter/full: examples/s {ratios['examples_per_s']:.3f} | step time {ratios['step_time']:.3f} "
        f"(median CPU time/step {ratios['cpu_step_time']:.3f}) | "
        f"peak memory {ratios['mem_peak']:.3f} | training increment "
        + (f"{ratios['mem_increment']:.3f}" if ratios["mem_increment"] is not None else "n/a")
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"config": vars(args) | {"warmup": WARMUP}, "runs": runs, "median": med, "ratios": ratios},
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
