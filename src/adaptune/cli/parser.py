"""The ``adaptune`` command: a thin layer over the public Python functions.

Subcommands: ``train``, ``eval``, ``predict``, ``info``, ``params``, ``demo`` (the README's main
job), ``compare``, ``build-kernels``, and for causal LMs ``generate``, ``convert`` and ``lm-demo``.
Every ``train`` option is a field of :class:`adaptune.training.train.TrainConfig`. A user error prints one
line and exits with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from adaptune.errors import AdaptuneError
from adaptune.cli.options import COMPARE_TRAIN_OPTIONS, EVAL_DATA_OPTIONS, TRAIN_HELP, add_config_options
from adaptune.cli.parser_lm import add_lm_commands, add_serve_command


def build_parser() -> argparse.ArgumentParser:
    from adaptune import __version__

    parser = argparse.ArgumentParser(
        prog="adaptune", description="Adapter tuning (Houlsby et al. 2019) for transformers models."
    )
    parser.add_argument("--version", action="version", version=f"adaptune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_commands(sub)
    _add_adapter_commands(sub)
    _add_compare_command(sub)
    _add_demo_commands(sub)
    add_lm_commands(sub, _common)
    add_serve_command(sub, _common)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def _add_run_commands(sub) -> None:
    """The subcommands that train, evaluate and predict with a run folder."""
    from adaptune.training.train import TrainConfig

    p = sub.add_parser(
        "train",
        help="train a task adapter (or a baseline) and write a run folder",
        description="Train one task. Writes OUTPUT/config.json, metrics.json, task.json, tokenizer/ and adapter/ (or "
        "model/).",
    )
    p.add_argument("--output", "-o", required=True, help="run folder to create (must not exist unless --resume)")
    p.add_argument(
        "--resume", action="store_true", help="continue the unfinished run in --output with its saved configuration"
    )
    add_config_options(p, TrainConfig, TRAIN_HELP)
    _common(p)

    p = sub.add_parser(
        "fuse",
        help="train an AdapterFusion of finished adapter runs on a new task",
        description="Load the adapters of the given runs (frozen) and train, on --data, attention over their "
        "outputs in every layer (Pfeiffer et al. 2021) plus the task's head. The same as 'adaptune train --fuse "
        "RUN...'; the run folder's adapter/ carries the fused adapters, so it reloads on its own.",
    )
    p.add_argument(
        "--adapters",
        dest="fuse",
        nargs="+",
        required=True,
        metavar="RUN",
        help="adapter runs (or adapter folders) to fuse: at least two of one placement",
    )
    p.add_argument("--output", "-o", required=True, help="run folder to create (must not exist unless --resume)")
    p.add_argument("--resume", action="store_true", help="continue the unfinished run in --output")
    add_config_options(p, TrainConfig, {**TRAIN_HELP, "fuse": argparse.SUPPRESS})
    _common(p)

    p = sub.add_parser(
        "eval",
        help="metrics of a finished run on a dataset split",
        description="Evaluate a run's adapter (or model) on a split of its own data, or of --data.",
    )
    p.add_argument("run", help="run folder written by 'adaptune train'")
    p.add_argument("--split", choices=("dev", "test"), default="dev", help="which split (default: dev)")
    for name in EVAL_DATA_OPTIONS:
        p.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=int if name == "limit_eval" else str,
            default=None,
            help=TRAIN_HELP[name] + " (default: as in the run)",
        )
    p.add_argument("--device", default="auto", help=TRAIN_HELP["device"])
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    _common(p)

    p = sub.add_parser(
        "predict",
        help="label new texts with a finished run",
        description="Predict labels and probabilities. Texts come from arguments, --file (one per line), or standard "
        "input.",
    )
    p.add_argument("run", help="run folder written by 'adaptune train'")
    p.add_argument("texts", nargs="*", help="texts to label (default: read lines from --file or standard input)")
    p.add_argument("--file", "-f", help="file with one text per line ('-' = standard input)")
    p.add_argument(
        "--pair-sep", default="\t", help="separator of the two texts on a line, for pair tasks (default: tab)"
    )
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="RUN",
        help="serve another adapter run on the same base (repeatable); then each line is 'TASK<tab>TEXT' (pair, QA: "
        "'TASK<tab>TEXT<tab>PAIR'; multiple choice: 'TASK<tab>QUESTION<tab>CHOICE<tab>CHOICE...'), TASK a run "
        "folder's name, or the NAME of a run given as NAME=FOLDER",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per text")
    p.add_argument("--device", default="auto", help=TRAIN_HELP["device"])
    _common(p)


def _add_adapter_commands(sub) -> None:
    """The subcommands that inspect adapters, count parameters, build the CPU kernels."""

    p = sub.add_parser(
        "info",
        help="what an adapter folder (or run folder) contains",
        description="Placement, size, parameter count with the 2md+d+m breakdown, and the base model of an adapter.",
    )
    p.add_argument("path", help="adapter folder, or a run folder with adapter/")
    p.add_argument("--json", action="store_true", help="print as JSON")
    _common(p)

    p = sub.add_parser(
        "params",
        help="parameter table of every strategy on a model",
        description="Load a model, add an adapter, and print trainable parameters per strategy with the "
        "2md+d+m check.",
    )
    p.add_argument("--model", default="minilm", help=TRAIN_HELP["model"] + " (default: minilm)")
    p.add_argument("--adapter", default="houlsby", help=TRAIN_HELP["adapter"] + " (default: houlsby)")
    p.add_argument("--adapter-size", type=int, default=64, help="bottleneck size m (default: 64)")
    p.add_argument("--top-k", type=int, default=2, help="k for the top-k row (default: 2)")
    _common(p)

    p = sub.add_parser(
        "build-kernels",
        help="build and check the CPU kernels now, instead of on first use",
        description="Compile the C kernels (csrc/) for this machine into the cache, load them and check "
        "them against torch, so that no library call builds them on first use. Exits 1 "
        "where they cannot run here (training then uses torch's operators).",
    )
    _common(p)


def _add_compare_command(sub) -> None:
    """The subcommands that run the paper's comparison."""
    from adaptune.training.train import TrainConfig

    p = sub.add_parser(
        "compare",
        help="the paper's experiments: a grid of strategies, tables and plots",
        description="Train full, top-k, layer-norm, head and adapter (houlsby/pfeiffer/parallel) models over a "
        "small grid on one or more tasks, pick each strategy's best configuration on dev, report test, "
        "and plot quality vs trained parameters, the layer ablation and robustness. Re-running the "
        "same command continues an interrupted compare.",
    )
    p.add_argument(
        "--output", "-o", default="runs/compare", help="folder for every run and the reports (default: runs/compare)"
    )
    p.add_argument(
        "--tasks", nargs="+", default=["reviews"], help="data sources, one adapter per task (default: reviews)"
    )
    p.add_argument(
        "--methods", nargs="+", default=None, help="subset of: full top-k layernorm head houlsby pfeiffer parallel"
    )
    p.add_argument("--sizes", nargs="+", type=int, default=None, help="adapter sizes (default: 8 64 256)")
    p.add_argument("--top-ks", nargs="+", type=int, default=None, help="k values for top-k (default: 1 2 3)")
    p.add_argument(
        "--lr-factors",
        nargs="+",
        type=float,
        default=None,
        help="learning rates as factors of each strategy's default (default: 0.33 1 3)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds, scores averaged (default: 0)")
    p.add_argument(
        "--init-stds",
        nargs="+",
        type=float,
        default=None,
        help="init sweep of Houlsby adapters (default: 1e-4 1e-3 1e-2 1e-1)",
    )
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=None,
        help="shrink the grid, then the data, to fit about this many minutes",
    )
    p.add_argument("--no-ablation", dest="ablation", action="store_false", help="skip the layer-span ablation")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="write no PNG figures")
    add_config_options(p, TrainConfig, TRAIN_HELP, only=COMPARE_TRAIN_OPTIONS)
    _common(p)


def _add_demo_commands(sub) -> None:
    """The subcommands that run the main job and the language-model demo."""

    p = sub.add_parser(
        "demo",
        help="the main job: Houlsby adapter vs full fine-tuning on the embedded reviews",
        description="Train a Houlsby adapter and full fine-tuning on the embedded fine-food reviews with "
        "all-MiniLM-L6-v2 and print dev accuracy and parameter fractions side by side.",
    )
    p.add_argument("--output", "-o", default="runs/demo", help="folder for both runs (default: runs/demo)")
    p.add_argument(
        "--limit-train",
        type=int,
        default=1000,
        help="training examples used (default: 1000 of 3600, to finish in about 10 minutes on 2 cores)",
    )
    p.add_argument("--epochs", type=int, default=3, help="epochs for both runs (default: 3)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per review (default: 128)")
    p.add_argument("--resume", action="store_true", help="continue unfinished runs in --output")
    _common(p)

    p = sub.add_parser(
        "lm-demo",
        help="Houlsby adapter on SmolLM2-135M-Instruct with the embedded conversations",
        description="Instruction-tune a Houlsby adapter on SmolLM2-135M-Instruct with chatterbot-corpus "
        "conversations, "
        "report held-out perplexity of the base vs the adapted model, and show replies of both.",
    )
    p.add_argument(
        "--output", "-o", default="runs/lm-demo", help="run folder (default: runs/lm-demo; an unfinished run resumes)"
    )
    p.add_argument("--model", default="smollm2", help="causal LM (default: smollm2)")
    p.add_argument("--quantize", default="none", help="frozen base in int8 or int4 (torchao; default: none)")
    p.add_argument(
        "--limit-train",
        type=int,
        default=960,
        help="training conversations (default: 960 of 1710, about 10 minutes on 2 cores)",
    )
    p.add_argument("--limit-eval", type=int, default=100, help="dev and test conversations each (default: 100)")
    p.add_argument(
        "--epochs",
        type=int,
        default=1,
        help="epochs (default: 1; a second epoch over-fits 640 conversations at lr 1e-3)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="conversations per step (default: 16)")
    p.add_argument("--adapter-size", type=int, default=64, help="bottleneck size m (default: 64)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per conversation (default: 128)")
    p.add_argument(
        "--eval-generate",
        type=int,
        default=24,
        help="test conversations answered greedily for exact match (default: 24)",
    )
    p.add_argument(
        "--prompts",
        nargs="*",
        default=["Do you like music?", "What is your favorite food?"],
        help="prompts to show replies for",
    )
    _common(p)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # texts after an option (predict RUN --also RUN2 TEXT ...) are texts too
        if (
            getattr(args, "command", None) == "predict"
            and args.file is None
            and not any(e.startswith("-") for e in extra)
        ):
            args.texts = [*args.texts, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from adaptune.cli import adapter_commands
        from adaptune.cli import commands
        from adaptune.cli import lm_commands
        from adaptune.cli import serve_commands
        from adaptune.cpu.heap import keep_freed_memory, return_freed_memory

        # this process's CPU work reuses freed memory instead of faulting it back in (it exits
        # after), unless the run asked to save memory: then freed blocks go back at once
        saving = getattr(args, "quantize", "none") not in (None, "none") or getattr(
            args, "gradient_checkpointing", False
        )
        with (return_freed_memory if saving else keep_freed_memory)(give_back=False):
            name = args.command.replace("-", "_")
            module = next(m for m in (commands, adapter_commands, lm_commands, serve_commands) if hasattr(m, name))
            return getattr(module, name)(args) or 0
    except AdaptuneError as e:
        if args.debug:
            raise
        print(f"adaptune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adaptune: interrupted; a train run continues with --resume", file=sys.stderr)
        return 130
    except (OSError, MemoryError) as e:
        if args.debug:
            raise
        print(f"adaptune: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug of ours: still one line, the traceback with --debug
        if args.debug:
            raise
        print(
            f"adaptune: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
