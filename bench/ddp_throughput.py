"""Data-parallel training: examples/s of 2 torchrun processes vs 1 process, same run otherwise.

Runs ``adaptune train`` (Houlsby adapter, all-MiniLM-L6-v2, the embedded reviews) once as one
process and once under ``torchrun --standalone --nproc-per-node N`` (gloo on CPU, nccl on GPUs),
with the same global batch and seed, and reads ``examples_per_second`` and the dev metrics from
each run's ``metrics.json``. On a 2-core machine expect no speed-up: two processes share the same
two cores; the point is that the path works and agrees with one process.

Run:  .venv/bin/python bench/ddp_throughput.py [--procs 2] [--limit-train 512] [--epochs 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run(cmd: list[str], threads: int) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--limit-train", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    common = [
        "train",
        "--quiet",
        "--limit-train",
        str(args.limit_train),
        "--limit-eval",
        "200",
        "--epochs",
        str(args.epochs),
        "--device",
        args.device,
        "--max-length",
        "128",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        # one process may use every core; N processes share them
        run([sys.executable, "-m", "adaptune", *common, "-o", str(one)], threads=cores)
        run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(args.procs),
                "-m",
                "adaptune",
                *common,
                "-o",
                str(many),
            ],
            threads=max(1, cores // args.procs),
        )
        m1 = json.loads((one / "metrics.json").read_text())
        mn = json.loads((many / "metrics.json").read_text())
    print(
        f"all-MiniLM-L6-v2, Houlsby m=64, reviews: {args.limit_train} examples x {args.epochs} epoch(s), "
        f"global batch 32, {args.device}, {cores} cores"
    )
    print(f"{'processes':<10}{'examples/s':>12}{'dev accuracy':>14}")
    for n, m in ((1, m1), (args.procs, mn)):
        print(f"{n:<10}{m['examples_per_second']:>12.2f}{m['dev']['accuracy']:>14.4f}")
    print(
        f"ratio {args.procs} processes / 1: {mn['examples_per_second'] / m1['examples_per_second']:.2f}x examples/s; "
        f"dev accuracy difference {mn['dev']['accuracy'] - m1['dev']['accuracy']:+.4f}"
    )


if __name__ == "__main__":
    main()
