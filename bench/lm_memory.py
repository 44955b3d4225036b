"""Peak training memory and step time of SmolLM2-135M with a Houlsby adapter: fp32 base, int8 base,
gradient checkpointing, int8 + checkpointing. Each configuration runs in a process of its own.

The causal-LM loss is taken from the backbone's hidden states a few rows of logits at a time
(``adaptune.lm.causal_lm``); the row "fp32, whole logits" measures the loss over all (N, V)
logits at once, as it was before.

Batches: 16 rows × 256 tokens (random token ids; the second half of each row is the response the
loss covers, as in ``bench/gpu_speed.py``), through the library's own ``build_model`` +
``training_step``. Per configuration: the bytes of the model's weights (quantised ones counted
as their int8 data and scales), the process's resident memory after loading and its peak over the
steps (``VmHWM``, reset after loading: the full-precision weights a quantised base loads first
do not count, though what glibc's heap keeps of them does), the peak minus the weights
(activations, gradients, optimiser state, the runtime), and the median step time.

glibc's heap keeps freed blocks between live ones, so the peak resident memory depends on the
allocator as much as on the tensors. ``MALLOC_MMAP_THRESHOLD_=1048576`` maps every block of 1 MiB
or more apart and unmaps it when freed, as ``adaptune train`` does for runs that save memory
(``--quantize``, ``--gradient-checkpointing``; ``adaptune.cpu.heap.return_freed_memory``).

Run:  OMP_NUM_THREADS=2 .venv/bin/python bench/lm_memory.py [--steps 3] [--json bench/results/lm_memory.json]
      MALLOC_MMAP_THRESHOLD_=1048576 OMP_NUM_THREADS=2 .venv/bin/python bench/lm_memory.py \
          --json bench/results/lm_memory_mmap1m.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "fp32": {},
    "fp32, whole logits": {},  # the loss over the (N, V) logits at once, as before the chunked loss
    "int8": {"quantize": "int8"},
    "checkpointing": {"gradient_checkpointing": True},
    "int8+checkpointing": {"quantize": "int8", "gradient_checkpointing": True},
}


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def one(name: str, steps: int, batch: int, length: int) -> dict:
    import torch

    from adaptune.models.quantize import weight_bytes
    from adaptune.training.steps import build_model, make_optimizer, training_step
    from adaptune.training.train import TrainConfig

    if name == "fp32, whole logits":
        from adaptune.lm import causal_lm

        causal_lm._PLAIN_HEAD_FAMILIES = ()  # no family takes the chunked loss
    cfg = TrainConfig(model="smollm2", data="chatterbot", device="cpu", **CONFIGS[name])
    model, counts = build_model(cfg, num_labels=0, device=torch.device("cpu"))
    model.train()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # the full-precision weights a quantised base freed go back
    loaded = rss_mib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS (VmHWM) starts again here: training only, not the loading
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 49000, (batch, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 2] = -100
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    opt, sched = make_optimizer(model, cfg, 1000)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = training_step(model, data, opt, sched, task_type="causal-lm", max_grad_norm=1.0)
        float(loss)
        times.append(time.perf_counter() - t0)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    weights = weight_bytes(model) / 2**20
    return {
        "config": name,
        "weight_mib": round(weights, 1),
        "rss_after_load_mib": round(loaded, 1),
        "peak_rss_mib": round(peak, 1),
        "peak_minus_weights_mib": round(peak - weights, 1),
        "step_s": round(statistics.median(times[1:] or times), 2),
        "trainable": counts.trainable,
        "loss": round(float(loss), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)  # a child process
    ap.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "lm_memory.json"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.batch, args.length)))
        return
    rows = []
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps)]
        cmd += ["--batch", str(args.batch), "--length", str(args.length)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if out.returncode != 0:
            raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    for r in rows:
        r["peak_over_fp32"] = round(r["peak_rss_mib"] / base["peak_rss_mib"], 3)
        r["weights_over_fp32"] = round(r["weight_mib"] / base["weight_mib"], 3)
        r["step_over_fp32"] = round(r["step_s"] / base["step_s"], 3)
    report = {
        "batch": args.batch,
        "length": args.length,
        "steps": args.steps,
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),  # unset: glibc's adaptive rule
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print("| configuration | weights MiB | peak RSS MiB | peak − weights | step s | peak / fp32 | weights / fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['config']} | {r['weight_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['peak_minus_weights_mib']:.0f} | "
            f"{r['step_s']:.1f} | {r['peak_over_fp32']:.2f} | {r['weights_over_fp32']:.2f} |"
        )


if __name__ == "__main__":
    main()
