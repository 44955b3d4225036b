"""``adaptune serve``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from adaptune.errors import ConfigError


def serve(args: argparse.Namespace) -> int:
    from adaptune.predict import name_runs

    try:
        from adaptune.serve import Engine, Limits, create_app, run
    except ImportError as e:
        raise ConfigError(f"adaptune serve needs {e.name}: pip install 'adaptune[serve]'") from None

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be between 1 and 65535, got {args.port}")
    for flag in ("max_body_bytes", "max_inputs", "max_chars", "max_choices"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.timeout_s <= 0:
        raise ConfigError("--timeout-s must be above 0")
    root = Path(args.adapter_root) if args.adapter_root else None
    if root is not None and not root.is_dir():
        raise ConfigError(f"--adapter-root {root} is not a folder")
    runs = name_runs(args.runs)
    for name, folder in runs.items():
        if not folder.is_dir():
            raise ConfigError(f"run folder {folder} (task {name!r}) does not exist")
    engine = Engine(
        runs,
        device=args.device,
        base=args.model,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        batching=not args.no_batching,
    )
    limits = Limits(args.max_body_bytes, args.max_inputs, args.max_chars, args.timeout_s, args.max_choices)
    token = args.token or os.environ.get("ADAPTUNE_SERVE_TOKEN") or None
    app = create_app(engine, limits=limits, token=token, adapter_root=root, base_name=args.model or engine.base_name)
    if not args.quiet:  # one JSON line per request on stderr
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access = logging.getLogger("adaptune.serve")
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        batches = f"batches of up to {args.max_batch_size} rows" if engine.batching else "batching off"
        print(
            f"adaptune: serving {', '.join(engine.tasks())} on http://{args.host}:{args.port}/ "
            f"({engine.kind}; {batches})",
            file=sys.stderr,
            flush=True,
        )
    run(app, host=args.host, port=args.port)
    return 0
