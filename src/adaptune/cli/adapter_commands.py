"""The subcommands about adapters and the machine: ``info``, ``params``, ``build-kernels``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adaptune.errors import ConfigError
from adaptune.cli.options import print_json


def info(args: argparse.Namespace) -> int:
    from safetensors import safe_open

    from adaptune.core.io import WEIGHTS, read_adapter_config

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
        "placement": {"mode": cfg.mode, "reads": cfg.reads, "slots": list(cfg.slots), "layers": cfg.layers or "all"},
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
        "fusion_params": count("fusion."),
        "fuses": list(cfg.fuse),
        "total_params": sum(_prod(s) for s in shapes.values()),
        "base": base,
        "adaptune_version": meta.get("adaptune_version"),
        "extra": meta.get("extra"),
    }
    if args.json:
        print_json(report)
        return 0
    print(f"adapter {report['name']!r} in {path}")
    mode = f"{cfg.mode}, reads norm(h + x) (Pfeiffer)" if cfg.norm_before else cfg.mode
    print(f"  placement    {mode}, slots {', '.join(cfg.slots)}, layers {report['placement']['layers']}")
    if cfg.fuse:  # AdapterFusion: no bottlenecks of its own
        print(
            f"  fusion       attention over {', '.join(cfg.fuse)} (in {path / 'fused'}): "
            f"{report['fusion_params']:,} parameters"
        )
    else:
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
    from adaptune.models.loading import is_causal_lm, load_causal_lm, load_classifier

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


def build_kernels(args: argparse.Namespace) -> int:
    import importlib

    from adaptune.cpu import native

    for wrapper in ("adapter_gemm", "kernels"):  # importing them registers their checks against torch
        importlib.import_module(f"adaptune.cpu.{wrapper}")

    lib = native.library()
    if lib is None:
        print(f"C kernels: not available here: {native.why_not()}; training uses torch's operators", file=sys.stderr)
        return 1
    print(
        f"C kernels: built and checked against torch, {lib.path}"
        f" ({'OpenMP, torch threads' if lib.parallel else 'one thread'})"
    )
    return 0
