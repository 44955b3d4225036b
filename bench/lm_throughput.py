"""Causal-LM throughput: training tokens/s (adapter vs full fine-tuning) and generation tokens/s
(with vs without an adapter), as ratios measured in one run.

Training: the library's own path (``build_model`` + ``make_optimizer`` + ``training_step`` with the
response-only loss) on batches of the embedded chatterbot conversations rendered with the model's
chat template, same batches for both strategies, alternating adapters / full per repeat. Tokens/s
counts every token of the batch that is not padding (prompt + response).

Generation: greedy decoding of exactly --new-tokens tokens (end-of-turn ignored) after a short chat
prompt, batch 1, KV cache on, alternating base / adapter per repeat.

Run:  .venv/bin/python bench/lm_throughput.py [--model smollm2] [--steps 6] [--batch 16] [--new-tokens 48]
      [--repeats 3] [--threads N] [--device cpu|cuda] [--precision fp32|bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=6, help="timed training steps per strategy and repeat")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from adaptune.lm.chat import encode_conversations, load_chat_data, prompt_ids
    from adaptune.data.loading import bucket_batches, collate
    from adaptune.core.inject import set_active
    from adaptune.models.loading import load_tokenizer
    from adaptune.training.train import TrainConfig, build_model, make_optimizer, pick_device, training_step

    device = pick_device(args.device)
    tok = load_tokenizer(args.model)
    chat = load_chat_data("chatterbot")
    enc, _ = encode_conversations(chat.train, tok, args.max_length)
    batches = bucket_batches([len(e["input_ids"]) for e in enc], args.batch, shuffle=True, seed=0)
    needed = 2 + args.steps * args.repeats
    batches = [collate([enc[i] for i in b], tok.pad_token_id) for b in batches[:needed]]

    models = {}
    for strategy in ("adapters", "full"):
        cfg = TrainConfig(
            model=args.model, data="chatterbot", strategy=strategy, device=str(device), precision=args.precision
        )
        model, counts = build_model(cfg, 0)
        model.to(device).train()
        opt, sched = make_optimizer(model, cfg, 10_000)
        models[strategy] = (model, opt, sched, counts)

    def run_steps(strategy: str, chunk: list) -> tuple[float, int]:
        model, opt, sched, _ = models[strategy]
        tokens = 0
        _sync(device)
        t0 = time.perf_counter()
        for b in chunk:
            b = {k: v.to(device) for k, v in b.items()}
            training_step(model, b, opt, sched, task_type="causal-lm", max_grad_norm=1.0, precision=args.precision)
            tokens += int(b["attention_mask"].sum())
        _sync(device)
        return time.perf_counter() - t0, tokens

    for strategy in models:  # warm-up: allocator, kernels
        run_steps(strategy, batches[:2])
    train_tps = {s: [] for s in models}
    for r in range(args.repeats):
        chunk = batches[2 + r * args.steps : 2 + (r + 1) * args.steps]
        for strategy in ("adapters", "full") if r % 2 == 0 else ("full", "adapters"):
            seconds, tokens = run_steps(strategy, chunk)
            train_tps[strategy].append(tokens / seconds)
    del models["full"]

    model = models["adapters"][0].eval()
    ids = torch.tensor(
        [prompt_ids(tok, [{"role": "user", "content": "Tell me about your favourite book."}])], device=device
    )

    def gen(adapter) -> float:
        set_active(model, adapter)
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        _sync(device)
        return args.new_tokens / (time.perf_counter() - t0)

    gen(None), gen("task")  # warm-up
    gen_tps = {"base": [], "adapter": []}
    for r in range(args.repeats * 2):
        for label, adapter in (
            (("base", None), ("adapter", "task")) if r % 2 == 0 else (("adapter", "task"), ("base", None))
        ):
            gen_tps[label].append(gen(adapter))

    med = {k: statistics.median(v) for k, v in {**train_tps, **gen_tps}.items()}
    counts = models["adapters"][3]
    report = {
        "model": args.model,
        "device": str(device),
        "precision": args.precision,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "steps": args.steps,
        "repeats": args.repeats,
        "new_tokens": args.new_tokens,
        "adapter_percent_trained": round(counts.percent, 2),
        "train_tokens_per_s": {"adapters": round(med["adapters"], 1), "full": round(med["full"], 1)},
        "train_ratio_adapters_over_full": round(med["adapters"] / med["full"], 3),
        "generate_tokens_per_s": {"base": round(med["base"], 1), "adapter": round(med["adapter"], 1)},
        "generate_ratio_adapter_over_base": round(med["adapter"] / med["base"], 3),
    }
    print(
        f"{args.model} on {device} ({args.precision}, {report['threads']} threads), batch {args.batch}, "
        f"Houlsby m=64 ({report['adapter_percent_trained']} % trained); medians of {args.repeats} alternating repeats"
    )
    print(
        f"training tokens/s: adapters {med['adapters']:.0f}, full {med['full']:.0f} -> adapters/full = "
        f"{report['train_ratio_adapters_over_full']:.2f}x"
    )
    print(
        f"generation tokens/s (batch 1, greedy, {args.new_tokens} new tokens): base {med['base']:.1f}, with adapter "
        f"{med['adapter']:.1f} -> adapter/base = {report['generate_ratio_adapter_over_base']:.3f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
