"""Text generation from a causal LM, with any of several task adapters active per request.

One :class:`Generator` holds one base model in memory. Adapters from run folders (or adapter
folders) are added to it under names and switched per call — ``adapter="chat"``, another name,
or ``None`` for the plain base model — without reloading anything. Generation itself is
``transformers``' ``generate`` (greedy, or sampling with temperature / top-k / top-p); the adapters
act inside every forward step (routed forwards of the base's modules), so the KV cache and every
decoding option of ``transformers`` work unchanged.

Example::

    gen = Generator("runs/chat")                 # base model of the run + its adapter as "chat"
    gen.generate("How are you?")                 # with the adapter
    gen.generate("How are you?", adapter=None)   # the base model
    gen.add_adapter("runs/jokes", name="jokes")  # a second task on the same loaded model
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Callable

import torch

from adaptune.lm.chat import prompt_ids
from adaptune.training.checkpoint import read_json
from adaptune.errors import ConfigError
from adaptune.core.inject import list_adapters, set_active

_KEEP = object()  # "adapter not given": the generator's default adapter


def _run_parts(path: Path) -> tuple[dict | None, Path | None]:
    """(training config, adapter folder) of a run folder, or (None, folder) of an adapter folder."""
    if (path / "adapter_config.json").is_file():
        return None, path
    if (path / "config.json").is_file() and (path / "adapter").is_dir():
        return read_json(path / "config.json", "train"), path / "adapter"
    if (path / "config.json").is_file() and (path / "model").is_dir():
        return read_json(path / "config.json", "train"), None
    return None, None


class Generator:
    """A causal LM loaded once, with named adapters to generate with.

    Args:
        source: a run folder of ``adaptune train`` on a causal LM (its base model is loaded and its
            adapter added under the run folder's name, and made the default), or a model name / folder
            (``"smollm2"``, a ``transformers`` causal-LM folder, a ``.gguf`` file).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        dtype: weights' dtype on the device (default float32; ``torch.bfloat16`` halves memory on GPU).

    Raises:
        ConfigError: the source is neither a run of a causal LM nor a loadable causal LM.
    """

    def __init__(self, source: str | os.PathLike, *, device: str = "auto", dtype: torch.dtype | None = None) -> None:
        from adaptune.models.loading import load_causal_lm, load_tokenizer
        from adaptune.models.loading import pick_device

        path = Path(source)
        train_cfg, adapter_dir = _run_parts(path) if path.is_dir() else (None, None)
        if path.is_dir() and (path / "model").is_dir() and train_cfg is not None:
            model_path, tok_path = str(path / "model"), str(path / "tokenizer")  # a full / top-k fine-tuned run
        elif train_cfg is not None:
            model_path, tok_path = train_cfg["model"], str(path / "tokenizer")
        elif adapter_dir is not None:
            raise ConfigError(f"{path} is an adapter folder; pass the base model and use add_adapter({str(path)!r})")
        else:
            model_path, tok_path = str(source), str(source)
        self.device = pick_device(device)
        self.tokenizer = load_tokenizer(tok_path)
        self.model = load_causal_lm(model_path, dtype=dtype).to(self.device).eval()
        self.default: str | None = None
        if adapter_dir is not None:
            self.default = self.add_adapter(adapter_dir, name=_safe_name(path.name))
            set_active(self.model, self.default)  # self.model alone behaves as the trained model

    def add_adapter(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Load an adapter (its folder, or a run folder holding ``adapter/``) under ``name``."""
        from adaptune.core.io import load_adapter

        p = Path(path)
        _, adapter_dir = _run_parts(p) if p.is_dir() else (None, None)
        if adapter_dir is None:
            raise ConfigError(f"{path} holds no adapter: pass a run folder with adapter/ or an adapter folder")
        name = name or _safe_name(
            p.name if adapter_dir.name == "adapter" and adapter_dir.parent == p else adapter_dir.name
        )
        load_adapter(self.model, adapter_dir, name=name, activate=False)
        self.model.to(self.device)
        return name

    @property
    def adapters(self) -> list[str]:
        return [row["name"] for row in list_adapters(self.model)]

    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[dict],
        *,
        adapter: str | None | object = _KEEP,
        system: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stream: Callable[[str], None] | None = None,
    ) -> str:
        """The assistant's reply to ``prompt`` (a user message, or a list of chat messages).

        Args:
            adapter: name of the adapter to use, ``None`` for the base model; default: the
                generator's own (the run's adapter, else the base model).
            system: a system message put first (else the chat template's default, if any).
            max_new_tokens: most tokens generated; generation stops earlier at end-of-turn.
            temperature: 0 is greedy decoding; above 0 samples.
            top_k, top_p: sampling filters (0 and 1.0 = off).
            seed: seed of the sampling (reproducible replies).
            stream: called with each new piece of text as soon as it is decoded.
        """
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ConfigError("temperature must be >= 0, top_p in (0, 1] and top_k >= 0")
        name = self.default if adapter is _KEEP else adapter
        if name is not None and name not in self.adapters:
            raise ConfigError(f"no adapter named {name!r}; loaded: {self.adapters or 'none'}")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system:
            messages = [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]
        ids = torch.tensor([prompt_ids(self.tokenizer, messages)], device=self.device)
        set_active(self.model, name)
        if seed is not None:
            torch.manual_seed(seed)
        sampling = temperature > 0
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_k=top_k if sampling and top_k else None,
            top_p=top_p if sampling and top_p < 1 else None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        if stream is not None:
            kwargs["streamer"] = _CallbackStreamer(self.tokenizer, stream)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def _safe_name(text: str) -> str:
    import re

    name = re.sub(r"[^A-Za-z0-9_-]", "_", text) or "adapter"
    return name if not name[0].isdigit() else "a" + name


class _CallbackStreamer:
    """A ``transformers`` streamer that hands each newly decoded piece of the reply to a callback."""

    def __init__(self, tokenizer, callback: Callable[[str], None]) -> None:
        from transformers import TextStreamer

        class _S(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    callback(text)

        self._inner = _S(tokenizer, skip_prompt=True, skip_special_tokens=True)

    def put(self, value) -> None:
        self._inner.put(value)

    def end(self) -> None:
        self._inner.end()


def exact_match(model, tokenizer, conversations: list[list[dict]], *, device, max_new_tokens: int = 48) -> float:
    """Share of conversations whose greedy reply equals the reference last assistant turn
    (after :func:`adaptune.lm.causal_lm.normalise_answer`). Uses the model's active adapter."""
    from adaptune.lm.causal_lm import normalise_answer

    was_training = model.training
    model.eval()
    hits = 0
    with torch.no_grad():
        for conv in conversations:
            last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
            ids = torch.tensor([prompt_ids(tokenizer, conv[:last])], device=device)
            # a reply longer than the reference by more than a few tokens cannot match it
            budget = min(
                max_new_tokens, len(tokenizer(conv[last]["content"], add_special_tokens=False)["input_ids"]) + 4
            )
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=budget,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            hits += normalise_answer(reply) == normalise_answer(conv[last]["content"])
    model.train(was_training)
    return hits / max(len(conversations), 1)
