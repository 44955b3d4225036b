"""What each ``adaptune`` subcommand does, calling the same public functions a Python user calls."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from adaptune.options import config_from, print_json
from adaptune.metrics import single_class_warning
from adaptune.errors import ConfigError, DataError


def train(args: argparse.Namespace) -> int:
    from adaptune.train import TrainConfig, train as run_train

    cfg = config_from(args, TrainConfig)
    result = run_train(cfg, args.output, resume=args.resume, quiet=args.quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the job
        _summary(result, args.output)
    return 0


def _summary(result: dict, where) -> None:
    p = result["params"]
    if "base" in result:  # a causal LM: perplexity before and after
        print(
            f"{result['strategy']}: {_lm_line(result)}; trained {p['trainable']:,} of {p['base']:,} parameters "
            f"({p['percent_trained']:.2f} %); run folder {where}"
        )
        return
    print(
        f"{result['strategy']}: "
        + "; ".join(
            f"{split} {metric_line(result[split], result['metric'])}" for split in ("dev", "test") if result.get(split)
        )
    )
    print(
        f"  trained {p['trainable']:,} of {p['base']:,} parameters ({p['percent_trained']:.2f} %); run folder {where}"
        + (f"; positive class {result['positive_label']!r}" if result.get("positive_label") else "")
    )
    for warning in result.get("warnings", []):
        print(f"warning: {warning}")


def metric_line(metrics: dict, selected: str) -> str:
    """``macro_f1 0.7512 (accuracy 0.8300, mcc 0.6131, majority baseline 0.6450)``: the selection
    metric first, the others and the majority-class baseline beside it."""
    selected = selected if selected in metrics else next(iter(metrics))  # a run from an older version
    others = [
        k
        for k in ("macro_f1", "accuracy", "mcc", "f1", "pearson", "spearman", "mse")
        if k in metrics and k != selected
    ]
    beside = [f"{k} {metrics[k]:.4f}" for k in others]
    if "majority_baseline" in metrics:
        beside.append(f"majority baseline {metrics['majority_baseline']:.4f}")
    return f"{selected} {metrics[selected]:.4f}" + (f" ({', '.join(beside)})" if beside else "")


def eval(args: argparse.Namespace) -> int:
    from adaptune.checkpoint import read_json
    from adaptune.predict import Predictor
    from adaptune.train import _load_data

    task_file = Path(args.run) / "task.json"
    if task_file.is_file() and (read_json(task_file) or {}).get("task_type") == "causal-lm":
        return _eval_lm(args)
    pred = Predictor(args.run, device=args.device)
    overrides = {
        k: getattr(args, k)
        for k in (
            "data",
            "text_column",
            "text_pair_column",
            "label_column",
            "dev_file",
            "test_file",
            "glue_task",
            "limit_eval",
        )
        if getattr(args, k) is not None
    }
    if "data" in overrides and overrides["data"] != pred.config.data:
        # a new source: keep none of the old source's column and file options unless given again
        for k in ("text_column", "text_pair_column", "label_column", "dev_file", "test_file", "glue_task"):
            overrides.setdefault(k, None)
    cfg = dataclasses.replace(pred.config, **overrides)
    data = _load_data(cfg)
    split = data.dev if args.split == "dev" else data.test
    if split is None:
        raise DataError(f"{cfg.data} has no labelled {args.split} split; pass --{args.split}-file")
    metrics = pred.evaluate(split, data.label_names)
    if args.json:
        print_json({"split": args.split, "examples": len(split), **metrics})
    else:
        print(
            f"{args.split} ({len(split)} examples): "
            f"{metric_line(metrics, pred.task.get('metric') or next(iter(metrics)))}"
        )
        warning = single_class_warning(metrics)
        if warning:
            print(f"warning: {warning}")
    return 0


def predict(args: argparse.Namespace) -> int:
    from adaptune.predict import Predictor

    if args.texts:
        lines = list(args.texts)
    else:
        src = args.file or "-"
        try:
            lines = (sys.stdin.read() if src == "-" else Path(src).read_text(encoding="utf-8")).splitlines()
        except FileNotFoundError:
            raise DataError(f"file {src} does not exist") from None
        except UnicodeDecodeError:
            raise DataError(f"{src} is not UTF-8 text; re-encode it as UTF-8") from None
        lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise DataError("no texts to predict: pass them as arguments, with --file, or on standard input")
    if args.also:
        return _predict_many(args, lines)
    pred = Predictor(args.run, device=args.device)
    pairs = None
    if pred.task["text_pair"]:
        split = [ln.split(args.pair_sep, 1) for ln in lines]
        if any(len(s) != 2 for s in split):
            raise DataError(
                "this task takes text pairs: separate the two texts of each line with a tab (or --pair-sep)"
            )
        lines, pairs = [s[0] for s in split], [s[1] for s in split]
    _print_predictions(pred.predict(lines, pairs), args.json)
    return 0


def _predict_many(args: argparse.Namespace, lines: list[str]) -> int:
    from adaptune.predict import MultiTaskPredictor, name_runs

    pred = MultiTaskPredictor(name_runs([args.run, *args.also]), device=args.device)
    tasks, texts, pairs = [], [], []
    for n, line in enumerate(lines, 1):
        fields = line.split(args.pair_sep)
        task = pred.tasks.get(fields[0])
        if task is None or len(fields) != (3 if task["text_pair"] else 2):
            sep = "<tab>" if args.pair_sep == "\t" else args.pair_sep
            raise DataError(
                f"line {n}: expected TASK{sep}TEXT (a pair task: TASK{sep}TEXT{sep}PAIR) "
                f"with TASK one of {', '.join(pred.tasks)}; got {line[:60]!r}"
            )
        tasks.append(fields[0])
        texts.append(fields[1])
        pairs.append(fields[2] if len(fields) == 3 else None)
    _print_predictions(pred.predict(texts, tasks, pairs), args.json)
    return 0


def _print_predictions(rows: list[dict], as_json: bool) -> None:
    for row in rows:
        task = f"{row['task']}\t" if "task" in row else ""
        if as_json:
            print(json.dumps(row, ensure_ascii=False))
        elif "score" in row:
            print(f"{task}{row['score']:.4f}\t{row['text']}")
        else:
            print(f"{task}{row['label']}\t{row['probabilities'][row['label']]:.3f}\t{row['text']}")


def info(args: argparse.Namespace) -> int:
    from safetensors import safe_open

    from adaptune.io import WEIGHTS, read_adapter_config

    path = Path(args.path)
    if (path / "adapter").is_dir():
        path = path / "adapter"
    meta = read_adapter_config(path)
    cfg = meta["config"]
    base = meta.get("base") or {}
    d, m = base.get("hidden_size"), cfg.size
    try:
        with safe_open(str(path / WEIGHTS), "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as e:
        raise ConfigError(f"{path / WEIGHTS} cannot be read ({e}); the file is damaged") from None
    d = _check_adapter_shapes(path, meta, shapes, m, d)
    count = lambda prefix: sum(_prod(s) for k, s in shapes.items() if k.startswith(prefix))
    n_adapters = len({k.rsplit(".", 2)[0] for k in shapes if k.startswith("adapters.")})  # adapters.{layer}.{slot}
    per = 2 * m * d + d + m if isinstance(d, int) else None
    report = {
        "path": str(path),
        "name": meta.get("name"),
        "placement": {"mode": cfg.mode, "slots": list(cfg.slots), "layers": cfg.layers or "all"},
        "size": m,
        "nonlinearity": cfg.nonlinearity,
        "init_std": cfg.init_std,
        "scale": cfg.scale,
        "adapters": n_adapters,
        "params_per_adapter": per,
        "bottleneck_params": count("adapters."),
        "layer_norm_params": count("norms."),
        "head_params": count("head."),
        "pooler_params": count("pooler."),
        "total_params": sum(_prod(s) for s in shapes.values()),
        "base": base,
        "adaptune_version": meta.get("adaptune_version"),
        "extra": meta.get("extra"),
    }
    if args.json:
        print_json(report)
        return 0
    print(f"adapter {report['name']!r} in {path}")
    print(f"  placement    {cfg.mode}, slots {', '.join(cfg.slots)}, layers {report['placement']['layers']}")
    print(f"  bottleneck   m={m}, {cfg.nonlinearity}, init_std {cfg.init_std:g}, scale {cfg.scale:g}")
    check = "ok" if per is not None and per * n_adapters == report["bottleneck_params"] else "MISMATCH"
    per_text = f"{per:,}" if per is not None else "?"
    print(
        f"  adapters     {n_adapters} × (2·{m}·{d} + {d} + {m} = {per_text}) = {report['bottleneck_params']:,} "
        f"parameters [2md+d+m {check}]"
    )
    print(f"  layer norms  {report['layer_norm_params']:,} parameters")
    print(
        f"  head         {report['head_params']:,} parameters"
        + (f" + pooler {report['pooler_params']:,}" if report["pooler_params"] else "")
    )
    print(f"  total        {report['total_params']:,} parameters in the file")
    print(
        f"  base model   {base.get('model_type')}, hidden {d}, {base.get('num_layers')} layers, fingerprint "
        f"{base.get('fingerprint')}"
    )
    extra = meta.get("extra") or {}
    if extra.get("label_names"):
        print(f"  labels       {', '.join(map(str, extra['label_names']))}")
    return 0


def _check_adapter_shapes(path: Path, meta: dict, shapes: dict, m: int, d) -> int | None:
    """The hidden size, after checking the file's tensors against its config as loading does: the
    tensors the config lists, and every bottleneck's down- and up-projection of size m × d (d from
    the base model's identity, else from the tensors)."""
    from adaptune.errors import AdapterFileError

    listed = meta.get("tensors")
    if listed is not None and sorted(listed) != sorted(shapes):
        odd = sorted(set(listed) ^ set(shapes))
        raise AdapterFileError(
            f"{path} lists tensors its weights file does not hold (or the reverse): "
            f"{', '.join(odd[:3])}{' …' if len(odd) > 3 else ''}; the folder is damaged"
        )
    projections = {
        k: tuple(s)
        for k, s in shapes.items()
        if k.startswith("adapters.") and k.endswith((".down.weight", ".up.weight"))
    }
    if d is None and projections:
        key, shape = next(iter(projections.items()))
        d = shape[1] if key.endswith(".down.weight") else shape[0]
    for key, shape in projections.items():
        want = (m, d) if key.endswith(".down.weight") else (d, m)
        if shape != want:
            raise AdapterFileError(
                f"{path}: {key} has shape {shape} but the config says size {m} and the base model "
                f"hidden size {d}, so {want}; the config or the weights were edited"
            )
    return d


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def params(args: argparse.Namespace) -> int:
    from adaptune import AdapterConfig, add_adapter, count_parameters, list_adapters, set_active, train_strategy
    from adaptune.models import is_causal_lm, load_causal_lm, load_classifier

    causal = is_causal_lm(args.model)
    model = load_causal_lm(args.model) if causal else load_classifier(args.model, 2)
    cfg = AdapterConfig.preset(args.adapter, size=args.adapter_size, train_head=not causal)
    add_adapter(model, "task", cfg)
    row = list_adapters(model)[0]
    ident = model.config
    d = ident.hidden_size if hasattr(ident, "hidden_size") else None
    per = cfg.params_per_adapter(d)
    n = row["num_adapters"]
    base = count_parameters(model).base
    print(
        f"{args.model}: {ident.model_type}, {ident.num_hidden_layers} layers, hidden {d}; {base:,} parameters"
        + (" (a causal LM: its output layer is not a task head)" if causal else " with a 2-class head")
    )
    formula_ok = per * n == row["bottleneck_params"]
    print(
        f"{args.adapter} adapter, m={cfg.size}: {n} adapters × (2·{cfg.size}·{d} + {d} + {cfg.size} = {per:,}) = "
        f"{per * n:,}; "
        f"counted {row['bottleneck_params']:,} [{'ok' if formula_ok else 'MISMATCH'}]"
    )
    print(f"{'strategy':<12}{'trainable':>14}{'% of base':>11}")
    counts = train_strategy(model, "adapters")
    print(
        f"{'adapters':<12}{counts.trainable:>14,}{counts.percent:>10.2f}%   "
        f"(bottlenecks {row['bottleneck_params']:,} + layer norms {row['norm_params']:,} + head {row['head_params']:,}"
        + (f" + pooler {row['pooler_params']:,})" if row["pooler_params"] else ")")
    )
    set_active(model, None)
    for strategy, k in (("full", None), ("top-k", args.top_k), ("layernorm", None)) + (
        (("head", None),) if not causal else ()
    ):
        counts = train_strategy(model, strategy, k=k)
        label = f"top-{k}" if k else strategy
        print(f"{label:<12}{counts.trainable:>14,}{counts.percent:>10.2f}%")
    return 0 if formula_ok else 1


def demo(args: argparse.Namespace) -> int:
    from adaptune.train import TrainConfig, train as run_train

    out = Path(args.output)
    common = dict(limit_train=args.limit_train, epochs=args.epochs, max_length=args.max_length)
    print(
        f"Houlsby adapter (m=64) vs full fine-tuning: all-MiniLM-L6-v2 on the embedded fine-food reviews "
        f"(a subset of {args.limit_train} training reviews, at most {args.max_length} tokens each, {args.epochs} "
        "epochs), 2 runs",
        flush=True,
    )
    results = {}
    for strategy in ("adapters", "full"):
        cfg = TrainConfig(strategy=strategy, **common)
        run = out / strategy
        saved = run / "config.json"
        resume = saved.is_file()
        if resume and json.loads(saved.read_text(encoding="utf-8"))["train"] != cfg.to_dict():
            raise ConfigError(f"{run} holds a run with other settings; pass another --output")
        results[strategy] = run_train(cfg, run, resume=resume, quiet=args.quiet)
    metric = results["adapters"]["metric"]
    print()
    print(
        f"| strategy | trained parameters | % of model | dev {metric} | test {metric} | test MCC | test accuracy | "
        "train time |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for strategy, r in results.items():
        p, t = r["params"], r["test"]
        print(
            f"| {'Houlsby adapter m=64' if strategy == 'adapters' else 'full fine-tuning'} | {p['trainable']:,} | "
            f"{p['percent_trained']:.2f} % | {r['dev'][metric]:.4f} | {t[metric]:.4f} | {t['mcc']:.4f} | "
            f"{t['accuracy']:.4f} | "
            f"{r['train_seconds']:.0f} s |"
        )
    test = results["adapters"]["test"]
    print(f"| majority-class baseline | 0 | 0.00 % | | | 0.0000 | {test['majority_baseline']:.4f} | |")
    gap = results["full"]["dev"][metric] - results["adapters"]["dev"][metric]
    print(
        f"\nadapter vs full on dev: {-gap:+.4f} {metric}, training "
        f"{results['adapters']['params']['percent_trained']:.2f} % "
        f"of the parameters; positive class {results['adapters'].get('positive_label')!r}. "
        f'Runs in {out}/ (predict with: adaptune predict {out}/adapters "Great coffee!")'
    )
    for warning in (w for r in results.values() for w in r.get("warnings", [])):
        print(f"warning: {warning}")
    for note in results["adapters"].get("notes", []):
        print(f"note: {note}")
    return 0


def compare(args: argparse.Namespace) -> int:
    from adaptune.compare import CompareConfig, compare as run_compare
    from adaptune.train import TrainConfig

    grid = {
        k: tuple(getattr(args, k))
        for k in ("methods", "sizes", "top_ks", "lr_factors", "seeds", "init_stds")
        if getattr(args, k) is not None
    }
    cfg = CompareConfig(
        tasks=tuple(args.tasks),
        ablation=args.ablation,
        budget_minutes=args.budget_minutes,
        train=config_from(args, TrainConfig),
        **grid,
    )
    report = run_compare(cfg, args.output, quiet=args.quiet, plots=args.plots, log=lambda m: print(m, flush=True))
    print()
    print(report["table"])
    print()
    for line in report["findings"] + report["notes"]:
        print(f"- {line}")
    print(
        f"\nreports in {args.output}/: results.md, results.csv, summary.csv, results.json"
        + (", " + ", ".join(Path(f).name for f in report["figures"]) if report["figures"] else "")
    )
    return 0


# ---------------------------------------------------------------------------------------- causal LMs


def _lm_line(result: dict) -> str:
    """Held-out perplexity (and exact match) of the trained model next to the base model's."""
    parts = []
    for split in ("dev", "test"):
        now, base = result.get(split), result["base"].get(split)
        if now and base:
            parts.append(f"{split} perplexity {now['perplexity']:.2f} (base {base['perplexity']:.2f})")
    test, base_test = result.get("test") or {}, result["base"].get("test") or {}
    if "exact_match" in test and "exact_match" in base_test:
        parts.append(f"test exact match {test['exact_match']:.3f} (base {base_test['exact_match']:.3f})")
    return ", ".join(parts)


def _eval_lm(args: argparse.Namespace) -> int:
    """Held-out loss, perplexity and token accuracy of a language-model run, and of its base model."""
    from adaptune.causal_lm import evaluate_lm
    from adaptune.chat import encode_conversations
    from adaptune.generate import Generator
    from adaptune.inject import set_active
    from adaptune.checkpoint import read_json
    from adaptune.train import TrainConfig, _load_data

    gen = Generator(args.run, device=args.device)
    cfg = TrainConfig.from_dict(read_json(Path(args.run) / "config.json", "train"))
    overrides = {
        k: getattr(args, k) for k in ("data", "dev_file", "test_file", "limit_eval") if getattr(args, k) is not None
    }
    cfg = dataclasses.replace(cfg, **overrides)
    split = getattr(_load_data(cfg), args.split)
    enc, _ = encode_conversations(split, gen.tokenizer, cfg.max_length)
    if not enc:
        raise DataError(f"no {args.split} conversation to evaluate")
    kw = dict(batch_size=cfg.batch_size * 2, pad_id=gen.tokenizer.pad_token_id, device=gen.device)
    rows = {}
    for label, adapter in (("adapted", gen.default), ("base", None)):
        set_active(gen.model, adapter)
        rows[label] = evaluate_lm(gen.model, enc, **kw)
    if args.json:
        print_json({"split": args.split, "conversations": len(enc), **rows})
    else:
        for label, m in rows.items():
            print(
                f"{args.split} ({len(enc)} conversations), {label}: loss {m['loss']:.4f}, perplexity "
                f"{m['perplexity']:.2f}, "
                f"token accuracy {m['token_accuracy']:.4f}"
            )
    return 0


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt:
        return " ".join(args.prompt)
    if sys.stdin is None or sys.stdin.isatty():
        raise DataError("no prompt: pass it as arguments or on standard input")
    text = sys.stdin.read().strip()
    if not text:
        raise DataError("the prompt on standard input is empty")
    return text


def generate(args: argparse.Namespace) -> int:
    from adaptune.generate import Generator

    prompt = _read_prompt(args)
    gen = Generator(args.source, device=args.device)
    for path in args.adapter or []:
        name, sep, folder = path.partition("=")  # NAME=PATH; the path itself may hold '='
        gen.add_adapter(folder if sep else path, name=name if sep else None)
    use = gen.default if args.use is None else (None if args.use == "none" else args.use)
    if args.use is None and gen.default is None and args.adapter:
        use = gen.adapters[-1]  # a base model plus --adapter: generate with that adapter
    stream = None if args.no_stream else (lambda piece: print(piece, end="", flush=True))
    reply = gen.generate(
        prompt,
        adapter=use,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stream=stream,
    )
    print() if stream else print(reply)
    return 0


def convert(args: argparse.Namespace) -> int:
    from adaptune.convert import SMOLLM2, convert_gguf, smollm2_gguf

    src = smollm2_gguf() if args.gguf == SMOLLM2 else Path(args.gguf)
    out = convert_gguf(src, args.output, overwrite=args.overwrite)
    print(f"wrote {out} (config.json, model.safetensors, tokenizer); use it with --model {out}")
    return 0


def lm_demo(args: argparse.Namespace) -> int:
    from adaptune.generate import Generator
    from adaptune.train import TrainConfig, train as run_train

    cfg = TrainConfig(
        model=args.model,
        data="chatterbot",
        adapter_size=args.adapter_size,
        limit_train=args.limit_train,
        limit_eval=args.limit_eval,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        eval_generate=args.eval_generate,
    )
    out = Path(args.output)
    saved = out / "config.json"
    resume = saved.is_file()
    if resume and json.loads(saved.read_text(encoding="utf-8"))["train"] != cfg.to_dict():
        raise ConfigError(f"{out} holds a run with other settings; pass another --output")
    print(
        f"Houlsby adapter (m={args.adapter_size}) on {args.model} with the chatterbot-corpus English conversations "
        f"({args.limit_train} training conversations, {args.epochs} epoch{'s' if args.epochs != 1 else ''}, at most "
        f"{args.max_length} tokens each; "
        f"dev/test {args.limit_eval} held-out conversations whose prompts are not in training)",
        flush=True,
    )
    result = run_train(cfg, out, resume=resume, quiet=args.quiet)
    base, now = result["base"], result
    print()
    print("| model | trained parameters | dev perplexity | test perplexity | test token accuracy | test exact match |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r, n in (("base", base, 0), ("Houlsby adapter", now, result["params"]["trainable"])):
        em = r["test"].get("exact_match")
        print(
            f"| {label} | {n:,} | {r['dev']['perplexity']:.2f} | {r['test']['perplexity']:.2f} | "
            f"{r['test']['token_accuracy']:.3f} | {'-' if em is None else f'{em:.3f}'} |"
        )
    print(
        f"\ntrained {result['params']['percent_trained']:.2f} % of the parameters in {result['train_seconds']:.0f} s; "
        f"run folder {out}"
    )
    gen = Generator(out)
    for prompt in args.prompts:
        print(f"\nprompt: {prompt}")
        print(f"  base:    {gen.generate(prompt, adapter=None, max_new_tokens=40)}")
        print(f"  adapter: {gen.generate(prompt, max_new_tokens=40)}")
    print(f'\ntry: adaptune generate {out} "Do you like music?"   (add --use none for the base model)')
    for note in result.get("notes", []):
        print(f"note: {note}")
    return 0


def build_kernels(args: argparse.Namespace) -> int:
    import importlib

    from adaptune import native

    for wrapper in ("adapter_gemm", "kernels"):  # importing them registers their checks against torch
        importlib.import_module(f"adaptune.{wrapper}")

    lib = native.library()
    if lib is None:
        print(f"C kernels: not available here: {native.why_not()}; training uses torch's operators", file=sys.stderr)
        return 1
    print(
        f"C kernels: built and checked against torch, {lib.path}"
        f" ({'OpenMP, torch threads' if lib.parallel else 'one thread'})"
    )
    return 0
