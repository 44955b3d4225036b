"""Length bucketing vs padding every batch to max_length: examples/s of a whole training epoch.

Issue 5's figure: on the embedded review data (real lengths), an epoch of adapter training with
length bucketing (``bucket_batches`` + padding to each batch's longest, what ``train.py`` does by
default) against the same epoch with every batch padded to ``max_length``
(``collate(..., pad_to=max_length)``). A third variant, random batches padded to their longest
(``--no-bucket``), shows how much of the gain is dynamic padding alone.

Set-up: all-MiniLM-L6-v2, Houlsby adapters m=64 with layer-norm and head copies (the default
``TrainConfig``), a seeded subset of --examples training reviews (default 320, ``limit_train``),
batch 32, max_length 128, one torch thread. The three variants share one model and optimiser and
take turns epoch by epoch (bucketed, padded, random, bucketed, ...) for --rounds rounds; each
epoch is timed whole (CPU time, ``time.process_time``, and wall time) and the median per variant
is reported. Only the ratios mean anything on a shared machine.

Run:  .venv/bin/python bench/bucketing.py [--examples 320] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

VARIANTS = ("bucketed", "padded-to-max", "random-dynamic")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=320, help="seeded subset of the training reviews")
    p.add_argument("--rounds", type=int, default=2, help="epochs per variant, alternating")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    from adaptune.data.loading import bucket_batches, collate, encode, load_task_data
    from adaptune.models.loading import load_tokenizer, quiet_transformers
    from adaptune.training.train import TrainConfig, build_model, make_optimizer, training_step

    torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        model="minilm",
        data="reviews",
        batch_size=args.batch,
        max_length=args.max_length,
        limit_train=args.examples,
        device="cpu",
    )
    tok = load_tokenizer(cfg.model)
    data = load_task_data(cfg.data, limit_train=cfg.limit_train, seed=cfg.seed)
    enc = encode(data.train, tok, cfg.max_length)
    lengths = [len(e["input_ids"]) for e in enc]
    with quiet_transformers():
        model, _ = build_model(cfg, len(data.label_names))
    model.train()
    optimizer, scheduler = make_optimizer(model, cfg, 10**6)  # a long schedule: the rate barely moves

    def epoch(variant: str, e: int) -> tuple[float, float, int]:
        if variant == "random-dynamic" or variant == "padded-to-max":
            perm = torch.randperm(len(enc), generator=torch.Generator().manual_seed(e)).tolist()
            order = [perm[i : i + cfg.batch_size] for i in range(0, len(perm), cfg.batch_size)]
        else:
            order = bucket_batches(lengths, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=e)
        pad_to = cfg.max_length if variant == "padded-to-max" else None
        tokens = 0
        c0, t0 = time.process_time(), time.perf_counter()
        for idx in order:
            batch = collate([enc[i] for i in idx], tok.pad_token_id, pad_to=pad_to)
            tokens += batch["input_ids"].numel()
            training_step(
                model, batch, optimizer, scheduler, task_type=data.task_type, max_grad_norm=cfg.max_grad_norm
            )
        return time.process_time() - c0, time.perf_counter() - t0, tokens

    epoch("bucketed", 99)  # warm-up, not timed
    runs: dict[str, list[tuple[float, float, int]]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS:
            runs[v].append(epoch(v, r))
            cpu, wall, tokens = runs[v][-1]
            print(
                f"  round {r + 1}/{args.rounds} {v:15s} {len(enc) / cpu:6.2f} ex/s (CPU) {len(enc) / wall:6.2f} ex/s "
                "(wall) "
                f"{tokens / len(enc):6.1f} padded tokens/example",
                flush=True,
            )

    print(
        f"all-MiniLM-L6-v2, Houlsby m=64 + layer norms + head | reviews: {len(enc)} training examples (seeded "
        "subset), "
        f"mean length {statistics.mean(lengths):.1f} tokens, {sum(n == cfg.max_length for n in lengths)} at "
        "max_length "
        f"{cfg.max_length} | batch {cfg.batch_size} | {args.threads} thread(s) | {args.rounds} epochs per variant, "
        "alternating"
    )
    med = {
        v: (
            statistics.median(len(enc) / c for c, _, _ in runs[v]),
            statistics.median(len(enc) / w for _, w, _ in runs[v]),
        )
        for v in VARIANTS
    }
    for v in VARIANTS:
        print(
            f"{v:15s} {med[v][0]:7.2f} ex/s CPU   {med[v][1]:7.2f} ex/s wall   "
            f"{runs[v][0][2] / len(enc):6.1f} padded tokens/example"
        )
    b, p_, rnd = med["bucketed"], med["padded-to-max"], med["random-dynamic"]
    print(
        f"bucketed / padded-to-max examples/s: {b[0] / p_[0]:.2f} (CPU time), {b[1] / p_[1]:.2f} (wall)   [goal >= "
        "1.5]"
    )
    print(f"random batches padded to their longest / padded-to-max: {rnd[0] / p_[0]:.2f} (CPU time)")


if __name__ == "__main__":
    main()
