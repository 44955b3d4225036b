"""Data for causal language models: conversations, chat templates and response-only labels.

A training example is a conversation: a list of ``{"role", "content"}`` messages (``system``,
``user``, ``assistant``). Sources:

- ``"chatterbot"``: the English conversations of the PyPI package ``chatterbot-corpus`` (BSD),
  embedded demo data. Every two consecutive lines of a dialogue become a prompt/response pair.
- a ``.jsonl`` / ``.json`` file whose records hold either ``messages`` (a list of messages) or a
  ``prompt`` and a ``response`` (also accepted: ``instruction``/``input``/``output``,
  ``question``/``answer``), with an optional ``system``.

:func:`encode_conversations` renders each conversation with the tokenizer's chat template (a plain
``User:`` / ``Assistant:`` layout when it has none) and labels only the assistant turns: every
other token gets the label ``-100`` and adds nothing to the loss. The text is tokenised turn by
turn, exactly as generation later sees it: the prompt up to and including the template's
"assistant starts here" marker, then the response with its end-of-turn token, which the model learns
to emit so that generation stops.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adaptune.data.loading import seeded_subset
from adaptune.errors import DataError

IGNORE = -100  # label of a token that is not trained on (torch's cross_entropy default ignore_index)
ROLES = ("system", "user", "assistant")
DEMO = "chatterbot"

# Used when the tokenizer has no chat template (GPT-2 and other base models).
PLAIN_ROLE_PREFIX = {"system": "", "user": "User: ", "assistant": "Assistant: "}

_PAIR_KEYS = (("prompt", "response"), ("instruction", "output"), ("question", "answer"))


@dataclass
class ChatData:
    """Conversations split into train / dev / test; ``notes`` say what was done to them."""

    train: list[list[dict]]
    dev: list[list[dict]]
    test: list[list[dict]]
    description: str
    notes: list[str] = field(default_factory=list)


def is_chat_source(source: str) -> bool:
    """Whether ``source`` names conversation data (the demo, or a JSON Lines file of conversations)."""
    if source == DEMO:
        return True
    path = Path(source)
    if path.suffix.lower() not in (".jsonl", ".ndjson", ".json") or not path.is_file():
        return False
    try:
        with path.open(encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        record = json.loads(first)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # the classification reader reports what is wrong with the file
    if isinstance(record, list):  # a .json array: look at its first record
        record = record[0] if record else {}
    return isinstance(record, dict) and (
        "messages" in record or any(p in record and r in record for p, r in _PAIR_KEYS)
    )


# ---------------------------------------------------------------------------------------- sources


def chatterbot_pairs() -> list[list[dict]]:
    """The chatterbot-corpus English dialogues as prompt/response conversations, in file order."""
    try:
        import chatterbot_corpus
        import yaml
    except ImportError:
        raise DataError(
            "the 'chatterbot' demo data needs chatterbot-corpus and pyyaml: pip install 'adaptune[lm]'"
        ) from None
    folder = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    pairs = []
    for path in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for dialogue in doc.get("conversations") or []:
            lines = [str(x).strip() for x in dialogue if x is not None and str(x).strip()]
            for prompt, response in zip(lines, lines[1:]):
                pairs.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    if not pairs:
        raise DataError(f"no conversations found under {folder}; reinstall chatterbot-corpus")
    return pairs


def _record_to_messages(record: dict, where: str) -> list[dict]:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f'{where}: \'messages\' must be a non-empty list of {{"role", "content"}} objects')
        out = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(
                    f"{where}: every message needs a role ({', '.join(ROLES)}) and a text content, got {m!r}"
                )
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise DataError(f"{where}: the conversation has no assistant message to learn")
        return out
    for p, r in _PAIR_KEYS:
        if p in record and r in record:
            prompt, response = record[p], record[r]
            if p == "instruction" and record.get("input"):
                prompt = f"{prompt}\n\n{record['input']}"
            if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
                raise DataError(f"{where}: {p!r} and {r!r} must be texts and the {r} non-empty")
            system = record.get("system")
            head = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
            return head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    raise DataError(f"{where}: a record needs 'messages', or 'prompt' and 'response'; it has {sorted(record)}")


def read_conversations(path: str | Path) -> list[list[dict]]:
    """Conversations from a JSON Lines file (or a JSON array) of records."""
    from adaptune.data.sources import _read_json

    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    table = _read_json(path)
    n = len(next(iter(table.columns.values())))
    records = [{k: v[i] for k, v in table.columns.items() if v[i] is not None} for i in range(n)]
    return [_record_to_messages(r, f"record {i + 1} of {path}") for i, r in enumerate(records)]


def load_chat_data(
    source: str,
    *,
    dev_file: str | None = None,
    test_file: str | None = None,
    dev_fraction: float = 0.1,
    seed: int = 0,
    limit_train: int | None = None,
    limit_eval: int | None = None,
) -> ChatData:
    """Train / dev / test conversations from ``source``.

    Without a dev (or test) file, a seeded share of ``dev_fraction`` is held out for each. Held-out
    conversations never share their first user message with a training one (the demo corpus repeats
    greetings across files), so dev and test measure answers to unseen prompts.

    Raises:
        DataError: the source is missing or malformed.
    """
    notes: list[str] = []
    if source == DEMO:
        convs, what = chatterbot_pairs(), "chatterbot-corpus English conversations"
    else:
        convs, what = read_conversations(source), Path(source).name
    dev = read_conversations(dev_file) if dev_file else None
    test = read_conversations(test_file) if test_file else None
    if dev is None or test is None:
        convs, held = _hold_out(convs, dev_fraction * ((dev is None) + (test is None)), seed)
        if dev is None and test is None:
            half = len(held) // 2
            dev, test = held[:half], held[half:]
        elif dev is None:
            dev = held
        else:
            test = held
        notes.append(
            f"held out {len(held)} conversations by first prompt ({dev_fraction * 100:g}% each for "
            f"{'dev and test' if dev_file is None and test_file is None else 'dev' if dev_file is None else 'test'}, "
            f"seed {seed})"
        )
    if not convs or not dev:
        raise DataError(f"{source} has too few conversations to hold out dev and test; add more or pass --dev-file")
    train = seeded_subset(convs, limit_train, seed, 1, "train", notes, "conversations")
    dev = seeded_subset(dev, limit_eval, seed, 2, "dev", notes, "conversations")
    test = seeded_subset(test, limit_eval, seed, 3, "test", notes, "conversations")
    description = f"{what}, {len(train)}/{len(dev)}/{len(test)} train/dev/test conversations"
    return ChatData(train, dev, test, description, notes)


def _hold_out(convs: list[list[dict]], fraction: float, seed: int) -> tuple[list, list]:
    """Split by the first user message, so the same prompt never lands on both sides."""

    def key(c):
        return next((m["content"].strip().lower() for m in c if m["role"] == "user"), "")

    prompts = sorted({key(c) for c in convs})
    rng = np.random.default_rng([seed, 0])
    held = (
        set(rng.choice(prompts, size=max(1, int(round(len(prompts) * fraction))), replace=False).tolist())
        if prompts
        else set()
    )
    keep = [c for c in convs if key(c) not in held]
    out = [c for c in convs if key(c) in held]
    order = rng.permutation(len(out))
    return keep, [out[i] for i in order]


# --------------------------------------------------------------------------------------- encoding


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    """The conversation as text: the tokenizer's chat template, or the plain layout."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(_plain_turn(tokenizer, m) for m in messages)
    return text + (PLAIN_ROLE_PREFIX["assistant"] if add_generation_prompt else "")


def _plain_turn(tokenizer, m: dict) -> str:
    if m["role"] == "assistant":
        return PLAIN_ROLE_PREFIX["assistant"] + m["content"] + (tokenizer.eos_token or "") + "\n"
    return PLAIN_ROLE_PREFIX[m["role"]] + m["content"] + "\n"


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids that ask the model for the next assistant turn (what generation starts from)."""
    return _tokens(tokenizer, render(tokenizer, messages, add_generation_prompt=True), first=True)


def _tokens(tokenizer, text: str, first: bool) -> list[int]:
    # Special tokens (BOS) are added once, at the start of the conversation, when the tokenizer
    # adds them and the template has not already written them.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if first and bos is not None and getattr(tokenizer, "add_bos_token", False) and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return list(ids)


def encode_conversation(tokenizer, messages: list[dict], max_length: int) -> dict | None:
    """``input_ids`` and per-token ``label`` (``-100`` outside assistant turns), or ``None``.

    Each assistant turn is cut at the point where the rendered text of the conversation up to it
    (with the generation prompt) ends; the tokens before are prompt, the tokens from there to the end of
    that turn are response. ``None`` when truncation to ``max_length`` leaves no response token.
    """
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # text already tokenised
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        full = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(
                "the tokenizer's chat template does not render a conversation as a growing prefix; "
                "its turns cannot be labelled (use prompt/response pairs)"
            )
        part = _tokens(tokenizer, prompt[len(done) :], first=not ids)
        ids += part
        labels += [IGNORE] * len(part)
        answer = _tokens(tokenizer, full[len(prompt) :], first=False)
        ids += answer
        labels += answer
        done = full
    ids, labels = ids[:max_length], labels[:max_length]
    if all(v == IGNORE for v in labels[1:]):  # the first token is never predicted
        return None
    return {"input_ids": ids, "label": labels}


def encode_conversations(conversations: list[list[dict]], tokenizer, max_length: int) -> tuple[list[dict], int]:
    """Encode every conversation; returns the features and how many were dropped by truncation."""
    features = [encode_conversation(tokenizer, c, max_length) for c in conversations]
    kept = [f for f in features if f is not None]
    return kept, len(features) - len(kept)
