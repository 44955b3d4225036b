"""``adaptune convert --from adapterhub`` and ``--to adapterhub``: adapters in AdapterHub's format."""

from __future__ import annotations

import argparse
from pathlib import Path

from adaptune.errors import ConfigError


def convert_adapterhub(args: argparse.Namespace) -> int:
    if args.source_format == "adapterhub" and args.target_format == "adapterhub":
        raise ConfigError("--from adapterhub and --to adapterhub together convert nothing; give one of them")
    if args.source_format == "adapterhub":
        return _import(args)
    return _export(args)


def _import(args: argparse.Namespace) -> int:
    import transformers as T

    from adaptune.core.io import save_adapter
    from adaptune.interop.adapterhub import load_adapterhub, read_adapterhub
    from adaptune.models.loading import DEFAULT_MODEL, existing_model_path

    source = Path(args.gguf)
    base = existing_model_path(args.model or DEFAULT_MODEL, "a base model folder (--model)")
    config = T.AutoConfig.from_pretrained(base)
    foreign = read_adapterhub(source, config.num_hidden_layers)  # peek: which head to build
    head = foreign.head if args.with_head else None
    cls = {"token": T.AutoModelForTokenClassification, None: T.AutoModel}.get(
        head, T.AutoModelForSequenceClassification
    )
    kwargs = {}
    if head is not None:
        kwargs["num_labels"] = foreign.num_labels
        if head == "multi-label":
            kwargs["problem_type"] = "multi_label_classification"
    model = cls.from_pretrained(base, **kwargs).eval()
    name = load_adapterhub(model, source, with_head=args.with_head)
    extra = {"imported_from": f"AdapterHub ({foreign.version or 'adapters'}) folder {source}", "head": head}
    if foreign.labels and head is not None:
        extra["labels"] = foreign.labels
    if args.run:
        out = _write_run(Path(args.output), model, name, foreign, head, base, args, extra)
    else:
        out = save_adapter(model, name, args.output, overwrite=args.overwrite, extra=extra)
    cfg = foreign.config
    kind = "Pfeiffer (seq_bn)" if cfg.norm_before else "parallel (par_bn)" if cfg.mode == "parallel" else "sequential"
    print(
        f"read AdapterHub adapter {name!r}: {kind}, slots {'+'.join(cfg.slots)}, size {cfg.size}, "
        f"{cfg.nonlinearity}, head {head or 'none'}; the base's layer norms are used (AdapterHub keeps none per "
        f"adapter) and its weights could not be checked (AdapterHub stamps no fingerprint)"
    )
    if args.run:
        print(f"wrote the run folder {out}; predict with 'adaptune predict {out} TEXT' or serve it beside others")
    else:
        print(f"wrote {out}; load it with adaptune.load_adapter(model, {str(out)!r})")
    return 0


TASK_TYPES = {"classification": "classification", "multi-label": "multi-label", "token": "token-classification"}
METRICS = {"classification": "macro_f1", "multi-label": "micro_f1", "token": "entity_f1"}


def _write_run(out: Path, model, name: str, foreign, head: str | None, base: str, args, extra: dict) -> Path:
    """A run folder (``adapter/``, ``tokenizer/``, ``task.json``, ``config.json``) for the imported
    adapter and head, which ``adaptune predict``, ``eval`` and ``serve`` read; written atomically."""
    import json

    from adaptune.core.io import atomic_write_dir, save_adapter
    from adaptune.data.entities import is_span_scheme
    from adaptune.models.loading import load_tokenizer
    from adaptune.training.config import TrainConfig
    from adaptune.training.run_folder import create_run_dir

    if head is None:
        raise ConfigError(
            f"{args.gguf} has no prediction head{' (--no-head)' if not args.with_head else ''}: a run folder "
            "needs one; leave --run out to write an adapter folder"
        )
    labels = foreign.labels or [f"LABEL_{i}" for i in range(foreign.num_labels)]
    task = {"task_type": TASK_TYPES[head], "label_names": labels, "metric": METRICS[head]}
    task.update(max_length=args.max_length, text_pair=args.text_pair)
    if head == "token":
        task["span_tags"] = is_span_scheme(labels)
    cfg = TrainConfig(
        model=args.model or base,
        data=str(args.gguf),
        task_type=task["task_type"],
        max_length=args.max_length,
        train_layer_norms=False,
    )
    tokenizer = load_tokenizer(base)

    def fill(folder: Path) -> None:
        create_run_dir(folder, cfg, imported_from=extra["imported_from"])
        save_adapter(model, name, folder / "adapter", extra={**task, **extra})
        tokenizer.save_pretrained(str(folder / "tokenizer"))
        (folder / "task.json").write_text(json.dumps(task, indent=2) + "\n")

    atomic_write_dir(out, fill, overwrite=args.overwrite)
    return out


def _export(args: argparse.Namespace) -> int:
    from adaptune.core.inject import active_adapter
    from adaptune.interop.adapterhub_export import save_adapterhub

    source = Path(args.gguf)
    if (source / "task.json").is_file() or (source / "adapter").is_dir():
        from adaptune.predict import Predictor

        if not (source / "adapter").is_dir():
            raise ConfigError(f"{source} is a full fine-tuning run (model/); only adapter runs can be exported")
        predictor = Predictor(source, device="cpu")
        model, labels = predictor.model, predictor.label_names
    else:
        import transformers as T

        from adaptune.core.io import load_adapter, read_adapter_config
        from adaptune.models.loading import DEFAULT_MODEL, existing_model_path

        meta = read_adapter_config(source)
        base = existing_model_path(args.model or DEFAULT_MODEL, "a base model folder (--model)")
        labels = (meta.get("extra") or {}).get("labels")
        model = T.AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(labels or [0, 1]))
        load_adapter(model, source)
    name = active_adapter(model)
    out = save_adapterhub(model, name, args.output, labels=labels, with_head=args.with_head, overwrite=args.overwrite)
    print(f"wrote {out}; in AdapterHub: model.load_adapter({str(out)!r}, set_active=True)")
    return 0
