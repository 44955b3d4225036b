"""Adapter speed and memory on a CUDA GPU, as ratios measured in one run.

Two models of the shipped shapes, with random weights (speed does not depend on the values):
all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384; sequence classification, batch --batch x 128 and
--big-batch x 128) and
SmolLM2-135M (LLaMA, 30 layers, hidden 576; causal LM with the response-only loss, batch
--lm-batch x 256 with the second half of each row as the response). For each, in fp32 and in bf16
autocast, through the library's own ``training_step``:

- train:  step time of Houlsby m=64 adapters vs full fine-tuning (CUDA events, alternating blocks,
          medians) and peak allocated memory of each (``torch.cuda.max_memory_allocated``).
- infer:  forward time with the adapter active vs the plain base (eval mode, no_grad).
- mixed:  one batch whose rows cycle through 4 adapters vs the same batch on one adapter.
- generate (LLaMA only): greedy tokens/s at batch 1, with vs without the adapter.

Each figure is taken eager, compiled (``torch.compile``, ``default``: fused element-wise work) and
with CUDA graphs (``reduce-overhead``: the step's kernels replayed, no per-kernel launch cost, which
a small model's adapter step is bound by), adapters and full fine-tuning in the same run. The
compiled inference switches the active adapter and the rows' tasks between calls: the routing is
tensor data, so that runs the graphs compiled first (a recompilation would show in the time).
The step reads nothing back from the GPU (``training_step`` returns the loss on the device).

Order: every eager figure of MiniLM 32 x 128 and SmolLM2 16 x 256 first, then their compiled
bf16 figures, then compiled fp32, then the big MiniLM batch; ``--budget-minutes`` (default 8) skips what is left
when the time is up, and the JSON is written after every figure, so a run cut short keeps what it
measured. ``--smoke`` runs 2-layer, 64-wide versions for a minute on any device (the CPU included),
to check the script before a GPU is lent.

Run:  python bench/gpu_speed.py --json docs/gpu_speed_<gpu>.json
      [--only minilm/b32/bf16,smollm2/b16/bf16] [--compile none,default,reduce-overhead] [--smoke]
      python bench/gpu_speed.py --profile profile.txt --only minilm/b32/bf16 --compile none,default
      (where the step's device time goes, adapters against full fine-tuning)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers as T

from adaptune import AdapterConfig, add_adapter, set_active, train_strategy
from adaptune.training.train import TrainConfig, make_optimizer, training_step

SHAPES = {
    "minilm": lambda: T.BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        num_labels=2,
    ),
    "smollm2": lambda: T.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        pad_token_id=0,
    ),
}


SMOKE = False  # --smoke: tiny versions of the shapes


def make(shape: str, strategy: str, device, tasks: int = 1):
    torch.manual_seed(0)
    cfg = SHAPES[shape]()
    if SMOKE:
        cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size = 2, 64, 128
        cfg.num_attention_heads = 4
        if shape == "smollm2":
            cfg.num_key_value_heads = 2
    cls = T.AutoModelForSequenceClassification if shape == "minilm" else T.AutoModelForCausalLM
    model = cls.from_config(cfg)
    if strategy == "adapters":
        for t in range(tasks):
            add_adapter(
                model, f"t{t}", AdapterConfig.preset("houlsby", size=64, train_head=shape == "minilm"), activate=t == 0
            )
    train_strategy(model, strategy)
    return model.to(device)


def batch_for(shape: str, n: int, device) -> tuple[dict, str]:
    g = torch.Generator().manual_seed(0)
    if shape == "minilm":
        ids = torch.randint(1000, 30000, (n, 128), generator=g)
        return {
            "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
            "labels": torch.randint(0, 2, (n,), generator=g).to(device),
        }, "classification"
    ids = torch.randint(10, 49000, (n, 256), generator=g)
    labels = ids.clone()
    labels[:, :128] = -100
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
    }, "causal-lm"


def timed(fn, steps: int) -> float:
    if not torch.cuda.is_available():  # --smoke on a CPU
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - t0) * 1000 / steps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def bench_train(
    shape: str, precision: str, n: int, rounds: int, steps: int, device, compile_mode: str = "none"
) -> dict:
    batch, task = batch_for(shape, n, device)
    _fresh_compiler(compile_mode)
    runs = {}
    for strategy in ("adapters", "full"):
        _reset_memory()
        model = make(shape, strategy, device).train()
        opt, sched = make_optimizer(model, TrainConfig(strategy=strategy), 10_000)
        run = model if compile_mode == "none" else torch.compile(model, mode=_mode(compile_mode))

        def step(model=run, opt=opt, sched=sched):
            training_step(model, batch, opt, sched, task_type=task, max_grad_norm=1.0, precision=precision)

        for _ in range(3):
            step()
        _sync()
        runs[strategy] = {"step": step, "times": [], "peak_mib": _peak_mib(), "model": model}
    for r in range(rounds):
        for strategy in ("adapters", "full") if r % 2 == 0 else ("full", "adapters"):
            runs[strategy]["times"].append(timed(runs[strategy]["step"], steps))
    med = {s: statistics.median(v["times"]) for s, v in runs.items()}
    out = {
        "step_ms": {s: round(m, 2) for s, m in med.items()},
        "step_ratio": round(med["adapters"] / med["full"], 3),
        "peak_mib": {s: round(v["peak_mib"], 1) for s, v in runs.items()},
        "memory_ratio": round(runs["adapters"]["peak_mib"] / max(runs["full"]["peak_mib"], 1e-9), 3),
    }
    del runs
    _reset_memory()
    return out


def _fresh_compiler(compile_mode: str) -> None:
    """Forget the graphs of earlier figures. transformers' forward wrapper is one code object shared
    by every model, so their graphs pile up on it; past dynamo's recompile limit (8) it runs eager
    and a "compiled" figure silently measures eager code (seen on the first H100 run)."""
    if compile_mode != "none":
        torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


def _mode(compile_mode: str) -> str | None:
    return None if compile_mode == "default" else compile_mode


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mib() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def bench_infer(
    shape: str, precision: str, n: int, rounds: int, steps: int, device, compile_mode: str = "none"
) -> dict:
    batch, _ = batch_for(shape, n, device)
    batch = {k: v for k, v in batch.items() if k != "labels"}
    _fresh_compiler(compile_mode)
    model = make(shape, "adapters", device, tasks=4).eval()
    net = model if compile_mode == "none" else torch.compile(model, mode=_mode(compile_mode))
    ctx = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    rows = [f"t{i % 4}" for i in range(n)]
    shifted = [f"t{(i + 1) % 4}" for i in range(n)]  # another assignment of rows to tasks, same graph

    def fwd(*routes):
        def run():
            for route in routes:
                set_active(model, route)
                with torch.no_grad(), ctx():
                    net(**batch)

        return run

    # each variant runs two forwards, switching what is active between them
    variants = {"base": fwd(None, None), "adapter": fwd("t0", "t1"), "mixed": fwd(rows, shifted)}
    for v in variants.values():
        for _ in range(3):
            v()
    times = {k: [] for k in variants}
    for r in range(rounds * 2):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for k in order:
            times[k].append(timed(variants[k], steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "forward_ms": {k: round(m, 3) for k, m in med.items()},
        "adapter_overhead_pct": round(100 * (med["adapter"] / med["base"] - 1), 2),
        "mixed_over_single_throughput": round(med["adapter"] / med["mixed"], 3),
    }
    if shape == "smollm2" and compile_mode == "none":
        ids = batch["input_ids"][:1, :32]

        def gen(route):
            def run():
                set_active(model, route)
                with torch.no_grad(), ctx():
                    model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=64,
                        min_new_tokens=64,
                        do_sample=False,
                        pad_token_id=0,
                    )

            return run

        g = {"base": gen(None), "adapter": gen("t0")}
        for v in g.values():
            v()
        gt = {k: [] for k in g}
        for r in range(rounds):
            for k in ("base", "adapter") if r % 2 == 0 else ("adapter", "base"):
                gt[k].append(timed(g[k], 1))
        gm = {k: statistics.median(v) for k, v in gt.items()}
        out["generate_tokens_per_s"] = {k: round(64_000 / m, 1) for k, m in gm.items()}
        out["generate_ratio_adapter_over_base"] = round(gm["base"] / gm["adapter"], 3)
    return out


def main() -> None:
    global SMOKE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--big-batch", type=int, default=256, help="a second MiniLM batch, where arithmetic dominates")
    ap.add_argument("--lm-batch", type=int, default=16)
    ap.add_argument("--only", default=None, help="comma-separated keys such as minilm/b32/bf16 (default: all)")
    ap.add_argument(
        "--compile",
        default="none,default,reduce-overhead",
        help="comma-separated torch.compile modes, each measured: none (eager), default, reduce-overhead",
    )
    ap.add_argument("--no-infer", action="store_true", help="training figures only")
    ap.add_argument("--budget-minutes", type=float, default=8.0, help="skip what is left after this long")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 1 round of 2 steps, on any device")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--profile",
        default=None,
        metavar="FILE",
        help="instead of the figures: torch.profiler tables of the first --only key's training step "
        "(eager and compiled, adapters and full), written to FILE",
    )
    args = ap.parse_args()
    SMOKE = args.smoke
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("gpu_speed.py needs a CUDA GPU (or --smoke, to check the script on a CPU)")
    if args.smoke:
        args.rounds, args.steps, args.batch, args.big_batch, args.lm_batch = 1, 2, 4, 8, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    report = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (--smoke on a CPU)",
        "torch": torch.__version__,
        "transformers": T.__version__,
        "smoke": args.smoke,
        "tf32_matmul": True,
        "results": {},
        "skipped": [],
        "failed": {},
    }
    if args.profile:
        shape, n, precision, _ = next(p for p in _plan(args) if not args.only or _key(p) in args.only.split(","))
        with open(args.profile, "w") as f:
            f.write(f"{report['gpu']}, torch {torch.__version__}: {shape} batch {n}, {precision}\n")
            for mode in args.compile.split(","):
                for strategy in ("adapters", "full"):
                    table = profile_step(shape, precision, n, device, mode, strategy)
                    f.write(f"\n== {strategy}, compile {mode} ==\n{table}\n")
                    f.flush()
        print(f"profile written to {args.profile}")
        return
    t0 = time.perf_counter()
    for shape, n, precision, mode in _plan(args):
        key = f"{shape}/b{n}/{precision}"
        if args.only and key not in args.only.split(","):
            continue
        name = key if mode == "none" else f"{key}/compile-{mode}"
        if time.perf_counter() - t0 > args.budget_minutes * 60:
            report["skipped"].append(name)
            continue
        try:
            r = {"train": bench_train(shape, precision, n, args.rounds, args.steps, device, mode)}
            if not args.no_infer:
                r["infer"] = bench_infer(shape, precision, n, args.rounds, args.steps, device, mode)
        except Exception as e:  # one failing figure (a compiler error, say) must not lose the others
            report["failed"][name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"{name:<36} FAILED {report['failed'][name]}", flush=True)
            torch._dynamo.reset()
            continue
        r["seconds"] = round(time.perf_counter() - t0, 1)
        report["results"][name] = r
        print(_line(name, r), flush=True)
        if args.json:  # after every figure, so a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
    if report["skipped"]:
        print(f"skipped (over --budget-minutes {args.budget_minutes:g}): {', '.join(report['skipped'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


def _key(planned: tuple[str, int, str, str]) -> str:
    shape, n, precision, _ = planned
    return f"{shape}/b{n}/{precision}"


def profile_step(shape: str, precision: str, n: int, device, compile_mode: str, strategy: str) -> str:
    """torch.profiler's table of 5 training steps (after 5 warm-up steps), by device time."""
    from torch.profiler import ProfilerActivity, profile

    batch, task = batch_for(shape, n, device)
    _fresh_compiler(compile_mode)
    model = make(shape, strategy, device).train()
    opt, sched = make_optimizer(model, TrainConfig(strategy=strategy), 10_000)
    run = model if compile_mode == "none" else torch.compile(model, mode=_mode(compile_mode))

    def step():
        training_step(run, batch, opt, sched, task_type=task, max_grad_norm=1.0, precision=precision)

    for _ in range(5):
        step()
    _sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            step()
        _sync()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=30)


def _plan(args) -> list[tuple[str, int, str, str]]:
    """What to measure, most wanted first: every eager figure of the two shapes the goals name, then
    compiled bf16, then compiled fp32, then the big MiniLM batch (device time is scarce)."""
    modes = args.compile.split(",")
    shapes = [("minilm", args.batch), ("smollm2", args.lm_batch)]
    plan = [(s, n, p, "none") for p in ("bf16", "fp32") for s, n in shapes if "none" in modes]
    compiled = [m for m in modes if m != "none"]
    plan += [(s, n, p, m) for p in ("bf16", "fp32") for s, n in shapes for m in compiled]
    plan += [("minilm", args.big_batch, p, m) for p in ("bf16", "fp32") for m in modes]
    return plan


def _line(name: str, r: dict) -> str:
    t = r["train"]
    line = (
        f"{name:<36} train step adapters/full {t['step_ratio']:.3f} ({t['step_ms']['adapters']:.1f} / "
        f"{t['step_ms']['full']:.1f} ms), peak memory {t['memory_ratio']:.3f}"
    )
    if "infer" in r:
        i = r["infer"]
        line += f"; inference +{i['adapter_overhead_pct']:.1f} %, mixed/single {i['mixed_over_single_throughput']:.3f}"
        if "generate_tokens_per_s" in i:
            tok = i["generate_tokens_per_s"]
            line += f"; generate {tok['adapter']:.0f} vs {tok['base']:.0f} tok/s"
    return line


if __name__ == "__main__":
    main()
