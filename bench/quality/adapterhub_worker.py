"""AdapterHub's Houlsby adapter on one quality-suite task, run inside ``.venv-adapterhub``.

Invoked by ``bench/quality/run.py`` (never imports adaptune: that venv pins AdapterHub's own
transformers). Same data files, epochs, batch size, learning rate, warm-up, decay, weight decay
and clipping as adaptune's runs; AdapterHub's own choices otherwise: ``DoubleSeqBnConfig`` (two
sequential bottlenecks per layer, reduction factor d/m), its default two-layer classification head
(``add_classification_head``), and ``train_adapter`` to freeze the rest. The dev split picks the
best epoch by macro-F1 (the suite's selection metric); the predictions of that epoch on dev and
test are printed as one JSON line for the caller to score with adaptune's metrics.

Usage: python adapterhub_worker.py MODEL_DIR TASK_DIR TRAIN_FILE EPOCHS SEED [SIZE]
"""

import json
import math
import random
import sys
import time

import numpy as np
import torch


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _macro_f1(p, y):  # the selection metric only; the caller scores the kept predictions itself
    p, y = np.asarray(p), np.asarray(y)
    scores = []
    for c in np.union1d(p, y):
        tp, fp, fn = np.sum((p == c) & (y == c)), np.sum((p == c) & (y != c)), np.sum((p != c) & (y == c))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


def main():
    model_dir, task_dir, train_file, epochs, seed = sys.argv[1:6]
    size = int(sys.argv[6]) if len(sys.argv) > 6 else 64
    epochs, seed = int(epochs), int(seed)
    import adapters
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    random.seed(seed)
    splits = {
        "train": _read(train_file),
        "dev": _read(f"{task_dir}/dev.jsonl"),
        "test": _read(f"{task_dir}/test.jsonl"),
    }
    names = sorted({r["label"] for r in splits["train"]})
    ids = {n: i for i, n in enumerate(names)}
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = adapters.AutoAdapterModel.from_pretrained(model_dir)
    d = model.config.hidden_size
    model.add_adapter("t", config=adapters.DoubleSeqBnConfig(reduction_factor=d / size))
    model.add_classification_head("t", num_labels=len(names))
    model.train_adapter("t")
    params = [p for p in model.parameters() if p.requires_grad]

    def batches(rows, shuffle):
        order = list(range(len(rows)))
        if shuffle:
            random.shuffle(order)
        for i in range(0, len(order), 32):
            part = [rows[j] for j in order[i : i + 32]]
            pair = [r["text_pair"] for r in part] if "text_pair" in part[0] else None
            enc = tok(
                [r["text"] for r in part], pair, truncation=True, max_length=128, padding=True, return_tensors="pt"
            )
            yield enc, torch.tensor([ids[r["label"]] for r in part])

    steps = epochs * math.ceil(len(splits["train"]) / 32)
    warm = max(1, round(0.1 * steps))
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm))
    )

    @torch.no_grad()
    def predict(rows):
        model.eval()
        out = [int(i) for enc, _ in batches(rows, False) for i in model(**enc).logits.argmax(-1)]
        model.train()
        return out

    best, t0 = None, time.perf_counter()
    for epoch in range(epochs):
        for enc, labels in batches(splits["train"], True):
            loss = torch.nn.functional.cross_entropy(model(**enc).logits, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
        dev = predict(splits["dev"])
        score = _macro_f1(dev, [ids[r["label"]] for r in splits["dev"]])
        if best is None or score > best[0]:
            best = (score, epoch, dev, {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad})
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        for k, v in model.named_parameters():
            if k in best[3]:
                v.copy_(best[3][k])
    test = predict(splits["test"])
    print(
        json.dumps(
            {
                "label_names": names,
                "best_epoch": best[1],
                "dev_pred": best[2],
                "test_pred": test,
                "trainable": sum(p.numel() for p in params),
                "base": sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in params),
                "train_seconds": seconds,
                "adapters_version": adapters.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
