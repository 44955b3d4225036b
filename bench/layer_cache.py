"""Kept outputs of the frozen lower layers: epoch time with adapters only in the top k of L layers.

Issue 5's figure: with adapters in the top k layers only, epochs after the first should cost about
k/L of a full-stack epoch, because the frozen lower layers' outputs are computed once
(``adaptune.training.layer_cache``; ``--no-frozen-dropout --cache-frozen-layers`` in ``adaptune train``).

Set-up: all-MiniLM-L6-v2 (L = 6), Houlsby adapters m=64 in the top --top layers (default 2:
layers 4 and 5), head copy, no layer-norm copies (those cover every layer, see the module), the
frozen layers without dropout; a seeded subset of --examples training reviews (default 320),
length-bucketed batches of 32, max_length 128, one torch thread. Three models, same seed, each
with its own optimiser, take turns epoch by epoch:

- ``recompute``: the plain path (the same dropout-off setting), every epoch runs all 6 layers;
- ``cached``: ``FrozenBelow(cache=True)``; its first (filling) epoch is timed apart, then each
  later epoch runs layers >= 6 - k from the kept states;
- ``all-layers``: adapters in every layer (no layer-norm copies), the full-stack epoch of the
  issue's k/L.

Each epoch is timed whole (CPU time, ``time.process_time``, and wall time); the medians over
--rounds are compared. The losses of ``cached`` and ``recompute`` are printed side by side (they
train identically up to float rounding).

Run:  .venv/bin/python bench/layer_cache.py [--examples 320] [--rounds 3] [--top 2]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=320)
    p.add_argument("--rounds", type=int, default=3, help="timed epochs per variant after the filling epoch")
    p.add_argument("--top", type=int, default=2, help="k: adapters in the top k layers")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    from adaptune.data.loading import bucket_batches, collate, encode, load_task_data
    from adaptune.training.layer_cache import FrozenBelow
    from adaptune.models.loading import load_tokenizer, quiet_transformers
    from adaptune.training.train import TrainConfig, build_model, make_optimizer, training_step

    torch.set_num_threads(args.threads)
    num_layers = 6
    top = tuple(range(num_layers - args.top, num_layers))
    base = TrainConfig(
        model="minilm",
        data="reviews",
        batch_size=args.batch,
        max_length=args.max_length,
        limit_train=args.examples,
        train_layer_norms=False,
        frozen_dropout=False,
        device="cpu",
    )
    tok = load_tokenizer(base.model)
    data = load_task_data(base.data, limit_train=base.limit_train, seed=base.seed)
    enc = encode(data.train, tok, base.max_length)
    lengths = [len(e["input_ids"]) for e in enc]

    variants = {}
    for name, layers, cache in (("recompute", top, False), ("cached", top, True), ("all-layers", None, False)):
        cfg = TrainConfig(**{**base.to_dict(), "adapter_layers": layers})
        with quiet_transformers():
            model, _ = build_model(cfg, len(data.label_names))
        model.train()
        frozen = FrozenBelow(model, cache=cache, lengths=lengths)
        variants[name] = (model, frozen, *make_optimizer(model, cfg, 10**6), [])

    def epoch(name: str, e: int) -> tuple[float, float, float, int]:
        model, frozen, optimizer, scheduler, _ = variants[name]
        torch.manual_seed(1000 + e)  # the same dropout draws above the cut for every variant
        losses, hits = [], 0
        c0, t0 = time.process_time(), time.perf_counter()
        for idx in bucket_batches(lengths, base.batch_size, shuffle=True, seed=base.seed, epoch=e):
            batch = collate([enc[i] for i in idx], tok.pad_token_id)
            with frozen.step(idx) as hit:
                losses.append(
                    training_step(
                        model, batch, optimizer, scheduler, task_type=data.task_type, max_grad_norm=base.max_grad_norm
                    )
                )
            hits += hit
        return time.process_time() - c0, time.perf_counter() - t0, statistics.mean(losses), hits

    warm = collate([enc[i] for i in range(min(len(enc), base.batch_size))], tok.pad_token_id)
    warm.pop("labels")
    for model, *_ in variants.values():  # one untimed forward each: first-call costs out of epoch 1
        with torch.no_grad():
            model.eval()(**warm)
        model.train()
    first = {n: epoch(n, 0) for n in variants}  # the cached variant fills its store here
    cut = variants["cached"][1].cut
    kept = sum(t.numel() * t.element_size() for t in variants["cached"][1].store.values())
    print(
        "  epoch 1: " + "  ".join(f"{n} {c:.1f}s CPU (loss {loss:.4f})" for n, (c, _, loss, _) in first.items()),
        flush=True,
    )
    for r in range(1, args.rounds + 1):
        for n in variants:
            variants[n][-1].append(epoch(n, r))
            c, w, loss, hits = variants[n][-1][-1]
            print(
                f"  epoch {r + 1} {n:10s} {c:6.1f}s CPU {w:6.1f}s wall  mean loss {loss:.6f}  reused batches {hits}",
                flush=True,
            )

    med = {
        n: (statistics.median(x[0] for x in v[-1]), statistics.median(x[1] for x in v[-1]))
        for n, v in variants.items()
    }
    print(
        f"all-MiniLM-L6-v2 (L={num_layers}), Houlsby m=64 in layers {list(top)} + head, no layer-norm copies, "
        f"no dropout below layer {cut} | reviews: {len(enc)} examples (seeded subset), bucketed batches of "
        f"{base.batch_size}, "
        f"max_length {base.max_length} | {args.threads} thread(s) | kept states {kept / 2**20:.1f} MiB | "
        f"median of {args.rounds} later epochs per variant, alternating"
    )
    for n in variants:
        print(
            f"{n:10s} later epoch {med[n][0]:7.2f}s CPU {med[n][1]:7.2f}s wall   first epoch {first[n][0]:7.2f}s CPU"
        )
    c, rc, a = med["cached"], med["recompute"], med["all-layers"]
    print(f"cached / recompute (same adapters, later epochs): {c[0] / rc[0]:.3f} CPU time, {c[1] / rc[1]:.3f} wall")
    print(
        f"cached / all-layers adapters (full-stack epoch):   {c[0] / a[0]:.3f} CPU time, {c[1] / a[1]:.3f} wall   "
        f"[k/L = {args.top}/{num_layers} = {args.top / num_layers:.3f}]"
    )
    print(
        f"cached first (filling) epoch / recompute first epoch: {first['cached'][0] / first['recompute'][0]:.3f} CPU "
        "time"
    )
    drift = max(abs(x[2] - y[2]) for x, y in zip(variants["cached"][-1], variants["recompute"][-1]))
    print(f"largest difference of mean epoch loss, cached vs recompute: {drift:.2e}")


if __name__ == "__main__":
    main()
