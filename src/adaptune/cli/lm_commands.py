"""The causal-LM subcommands: ``generate``, ``convert``, ``lm-demo``, and ``eval`` of a language-model run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from adaptune.errors import ConfigError, DataError
from adaptune.cli.options import print_json, read_stdin


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
    from adaptune.lm.causal_lm import evaluate_lm
    from adaptune.lm.chat import encode_conversations
    from adaptune.lm.generate import Generator
    from adaptune.core.inject import set_active
    from adaptune.training.checkpoint import read_json
    from adaptune.training.train import TrainConfig, _load_data

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
    text = read_stdin().strip()
    if not text:
        raise DataError("the prompt on standard input is empty")
    return text


def generate(args: argparse.Namespace) -> int:
    from adaptune.lm.generate import Generator

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
    if args.run and args.source_format != "adapterhub":
        raise ConfigError("--run writes a run folder from an AdapterHub adapter: use it with --from adapterhub")
    if args.source_format == "adapterhub" or args.target_format == "adapterhub":
        from adaptune.cli.interop_commands import convert_adapterhub

        return convert_adapterhub(args)
    from adaptune.models.gguf import SMOLLM2, convert_gguf, smollm2_gguf

    src = smollm2_gguf() if args.gguf == SMOLLM2 else Path(args.gguf)
    out = convert_gguf(src, args.output, overwrite=args.overwrite)
    print(f"wrote {out} (config.json, model.safetensors, tokenizer); use it with --model {out}")
    return 0


def lm_demo(args: argparse.Namespace) -> int:
    from adaptune.lm.generate import Generator
    from adaptune.training.train import TrainConfig, train as run_train

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
        quantize=args.quantize,
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
