"""Training a large model on modest hardware: a quantised frozen base, gradient checkpointing and
accumulation, early stopping, the run's log (JSON Lines and TensorBoard), the HF Trainer."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from conftest import TINY_CONFIGS, tiny_batch, write_reviews_csv

from adaptune import AdapterConfig, add_adapter, load_adapter, save_adapter, train_strategy
from adaptune.core.io import fingerprint
from adaptune.lm.causal_lm import response_index
from adaptune.training.config import TrainConfig
from adaptune.training.monitor import early_stop_reason
from adaptune.training.steps import make_optimizer, training_step


def _model(family: str = "bert", causal: bool = False, dropout: float = 0.0, seed: int = 0, size: int = 8):
    torch.manual_seed(seed)
    cfg = TINY_CONFIGS[family]()
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "classifier_dropout"):
        if hasattr(cfg, name) or name == "classifier_dropout":
            setattr(cfg, name, dropout)
    cls = T.AutoModelForCausalLM if causal else T.AutoModelForSequenceClassification
    model = cls.from_config(cfg, attn_implementation="eager")
    add_adapter(model, "t", AdapterConfig.preset("houlsby", size=size))
    train_strategy(model, "adapters")
    return model


def _trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---- gradient accumulation ---------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["classification", "causal-lm"])
def test_accumulated_micro_batches_equal_one_big_batch(causal):
    """Dropout off: 4 micro-batches, each padded to its own longest, give the step of the whole
    batch (weights within 1e-6), normalised by the examples or the response tokens of the step."""
    family = "llama" if causal else "bert"
    batch = tiny_batch(batch=8, length=9, seed=3)
    batch["attention_mask"][3, -4:] = 0
    if causal:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        labels[:, :2] = -100
        labels[5, :6] = -100  # rows with different numbers of response tokens
    else:
        labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    task = "causal-lm" if causal else "classification"
    results = []
    for parts in (1, 4):
        model = _model(family, causal)
        model.train()
        opt, sched = make_optimizer(model, TrainConfig(), 10)
        rows = [list(range(k, k + 8 // parts)) for k in range(0, 8, 8 // parts)]
        micro = []
        for r in rows:
            width = int(batch["attention_mask"][r].sum(1).max())  # each micro-batch padded to its own longest
            micro.append({k: v[r, :width] for k, v in batch.items()} | {"labels": labels[r][..., :width]})
        if causal:
            for m in micro:
                m["labels"] = m["labels"] if m["labels"].dim() == 2 else m["labels"]
        index = [response_index(m["labels"]) for m in micro] if causal else None
        arg = micro if parts > 1 else micro[0]
        idx = index if parts > 1 else (index[0] if causal else None)
        loss = training_step(model, arg, opt, sched, task_type=task, max_grad_norm=1.0, lm_index=idx)
        results.append((float(loss), _trained(model)))
    (loss_one, one), (loss_acc, acc) = results
    assert loss_acc == pytest.approx(loss_one, abs=1e-6)
    for name in one:
        torch.testing.assert_close(acc[name], one[name], rtol=0, atol=1e-6)


# ---- gradient checkpointing ----------------------------------------------------------------------


def _grads(model, batch, labels, causal: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    if causal:
        out = model(**batch, labels=labels).loss
    else:
        out = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
    out.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("rows", [64, 2400], ids=["short", "c-kernel-sized"])
def test_checkpointing_gives_the_same_gradients(family, dropout, rows):
    """With adapters inside the checkpointed layers: the same gradients within 1e-6; with dropout on
    too (the RNG state is restored on recompute, so the masks repeat), and with the lean kernels,
    at batch sizes where the adapter's C kernels would run (from 2,048 rows)."""
    from adaptune.cpu.kernels import use_lean_kernels
    from adaptune.training.steps import _checkpoint_layers

    causal = family == "llama"
    batch = tiny_batch(batch=16, length=rows // 16)  # 16 x 150: a shape torch's recomputation miscounted
    labels = batch["input_ids"] if causal else torch.tensor([0, 1] * 8)
    grads = []
    for checkpoint in (False, True):
        model = _model(family, causal, dropout=dropout, size=16)
        use_lean_kernels(model)
        if checkpoint:
            _checkpoint_layers(model)
        model.train()
        torch.manual_seed(42)
        grads.append(_grads(model, batch, labels, causal))
    plain, ckpt = grads
    assert set(plain) == set(ckpt) and any(n.startswith("adaptune.") for n in plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=1e-6)


# ---- a quantised frozen base -----------------------------------------------------------------------


def test_int8_base_trains_adapters_and_the_adapter_loads_on_the_full_base(tmp_path):
    pytest.importorskip("torchao")
    from adaptune.models.quantize import quantize_base, weight_bytes

    model = _model("llama", causal=True)
    full_print, full_bytes = fingerprint(model), weight_bytes(model)
    # q, k, v, o, gate, up, down in 4 layers, the input embedding, and the output layer (its own
    # int8 linear when untied, or reading the embedding's int8 table when tied)
    assert quantize_base(model, "int8") == 4 * 7 + 2
    assert weight_bytes(model) < full_bytes and fingerprint(model) == full_print
    batch = tiny_batch(batch=4)
    model.train()
    kept = []  # what autograd keeps for backward: never a full-precision copy of a quantised weight

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch, labels=batch["input_ids"]).loss
    q_proj = model.model.layers[0].self_attn.q_proj
    assert any(t is q_proj.weight for t in kept)
    assert not any(
        type(t) is torch.Tensor and t.shape == q_proj.weight.shape and t.dtype == torch.float32 for t in kept
    )
    loss.backward()
    lowest = model.adaptune.sets["t"].adapters["0"]["attn"].down.weight  # below 4 layers of int8 weights
    assert lowest.grad is not None and lowest.grad.abs().sum() > 0
    save_adapter(model, "t", tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["base"]["quantized"] == "int8" and saved["base"]["fingerprint"] == full_print
    full = _model("llama", causal=True, seed=0)
    load_adapter(full, tmp_path / "a", name="back")  # the full base takes it (same fingerprint)
    torch.testing.assert_close(full.adaptune.sets["back"].adapters["0"]["attn"].down.weight, lowest.detach())


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_int8_embedding_and_tied_output_layer(tied):
    """The input embedding becomes int8 rows (each value within half a step of its row's scale); a
    tied output layer reads the same table, stored once; logits stay close to the full model's and
    generation runs; the weights take under 0.3 of their fp32 bytes."""
    pytest.importorskip("torchao")
    from adaptune.models.quantize import Int8Embedding, Int8TiedHead, quantize_base, weight_bytes

    torch.manual_seed(0)
    cfg = TINY_CONFIGS["llama"]()
    cfg.tie_word_embeddings = tied
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    add_adapter(model, "t", AdapterConfig.preset("houlsby", size=8))
    train_strategy(model, "adapters")
    original = model.get_input_embeddings().weight.detach().clone()
    ids = tiny_batch(batch=2)["input_ids"]
    with torch.no_grad():
        before, full_bytes = model(input_ids=ids).logits, weight_bytes(model)
    quantize_base(model, "int8")
    table = model.get_input_embeddings()
    assert isinstance(table, Int8Embedding) and table.qweight.dtype == torch.int8
    assert ((table.dequantize() - original).abs() <= table.scale[:, None] / 2 + 1e-7).all()
    assert isinstance(model.get_output_embeddings(), Int8TiedHead) == tied
    if tied:  # one table: the model's buffers hold the int8 embedding once
        assert sum(b.dtype == torch.int8 and b.shape == original.shape for b in model.buffers()) == 1
    with torch.no_grad():
        after = model(input_ids=ids).logits
        out = model.generate(input_ids=ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert (after - before).abs().max() < 0.05 * before.abs().max()
    assert out.shape == (1, 7)
    model.tie_weights()  # transformers' own call: nothing float left to tie, and it says nothing
    assert isinstance(model.get_output_embeddings(), Int8TiedHead) == tied
    with pytest.raises(AttributeError, match="int8 embedding"):
        model.resize_token_embeddings(cfg.vocab_size + 8)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert (weight_bytes(model) - trainable) < 0.3 * (full_bytes - trainable)


def test_quantising_unmaps_the_weights_file(tmp_path):
    """A base read from safetensors holds views of the mapped file; after quantising, what stays
    float is copied out, so the file is unmapped (its pages no longer resident in the process)."""
    pytest.importorskip("torchao")
    import gc

    from conftest import save_tiny_causal_lm

    from adaptune.models.quantize import quantize_base

    folder = tmp_path / "lm"
    save_tiny_causal_lm(folder)
    weights = str((folder / "model.safetensors").resolve())

    def mapped() -> bool:
        with open("/proc/self/maps") as f:
            return any(line.rstrip().endswith(weights) for line in f)

    model = T.AutoModelForCausalLM.from_pretrained(folder)
    add_adapter(model, "t", AdapterConfig.preset("houlsby", size=8))
    train_strategy(model, "adapters")
    if not mapped():
        pytest.skip("this transformers copies the weights on loading (no mapping to release)")
    quantize_base(model, "int8")
    gc.collect()
    assert not mapped()
    assert model(input_ids=torch.tensor([[3, 4, 5]])).logits.isfinite().all()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("strategy", ["adapters", "full"])
def test_chunked_lm_loss_equals_the_full_logits_loss(family, strategy, monkeypatch):
    """The causal-LM loss from the backbone's hidden states, a few rows of logits at a time, gives
    the loss and every gradient of the loss over the whole (N, V) logits (the output layer's too,
    where it trains), int8 tied output layer included."""
    from adaptune.lm import causal_lm
    from adaptune.models.quantize import Int8TiedHead, quantize_base

    def build(tied: bool):
        torch.manual_seed(0)
        cfg = TINY_CONFIGS[family]()
        cfg.tie_word_embeddings = tied
        model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
        if strategy == "adapters":
            add_adapter(model, "t", AdapterConfig.preset("houlsby", size=8))
        train_strategy(model, strategy)
        return model

    batch = tiny_batch(batch=3, length=11, seed=2)
    labels = batch["input_ids"].clone()
    labels[:, :4] = -100
    labels[2, :9] = -100
    index = response_index(labels)
    monkeypatch.setattr(causal_lm, "CHUNK_ELEMENTS", 7 * TINY_CONFIGS[family]().vocab_size)  # 7 rows a chunk
    calls = []
    chunked_loss = causal_lm._LinearCrossEntropy.apply
    monkeypatch.setattr(causal_lm._LinearCrossEntropy, "apply", lambda *a: calls.append(1) or chunked_loss(*a))
    for quantized in [False, True] if strategy == "adapters" and family == "llama" else [False]:
        chunked, plain = build(tied=quantized), build(tied=quantized)  # the int8 case: a tied output layer
        if quantized:
            pytest.importorskip("torchao")
            quantize_base(chunked, "int8")
            quantize_base(plain, "int8")
            assert isinstance(chunked.get_output_embeddings(), Int8TiedHead)
        loss, count = causal_lm.lm_loss_sum(chunked, batch, labels)
        assert len(calls) == 1 + quantized  # the chunked loss ran
        logits, targets = causal_lm.response_logits(plain, batch, index=index)
        reference = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        assert int(count) == len(targets) > 7  # more than one chunk
        torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-5)
        (2 * loss).backward()
        (2 * reference).backward()
        grads = [
            (n, p.grad, q.grad) for (n, p), q in zip(chunked.named_parameters(), plain.parameters()) if p.requires_grad
        ]
        assert grads and all(g is not None for _, g, _ in grads)
        for name, g, h in grads:
            # float rounding only: the chunks sum the rows in another order (gradients of a summed loss)
            torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-5, msg=f"{name} (int8 base: {quantized})")


def test_quantize_refuses_strategies_that_train_the_base():
    from adaptune import ConfigError

    with pytest.raises(ConfigError, match="quantised"):
        TrainConfig(quantize="int8", strategy="full")
    with pytest.raises(ConfigError, match="quantize must be one of"):
        TrainConfig(quantize="int3")


# ---- early stopping ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, patience, stops_at",
    [
        ([0.5, 0.6, 0.55, 0.58, 0.59], 3, 5),  # best at 2, then three evaluations without beating it
        ([0.5, 0.6, 0.55, 0.61, 0.59, 0.6], 3, None),  # a new best at 4 resets the count
        ([0.5, 0.5, 0.5], 2, 3),  # equal is not better
        ([0.5, 0.4], 0, None),  # off
    ],
)
def test_early_stopping_on_a_scripted_metric_sequence(values, patience, stops_at):
    history, best_step, best, stopped = [], None, None, None
    for step, value in enumerate(values, 1):
        history.append({"step": step, "macro_f1": value})
        if best is None or value > best:
            best, best_step = value, step
        if stopped is None and early_stop_reason(history, best_step, "macro_f1", patience):
            stopped = step
    assert stopped == stops_at


def test_a_run_stops_early_keeps_the_best_weights_and_says_why(tiny_model_dir, tmp_path, monkeypatch):
    """A scripted dev metric (best at the 2nd evaluation): --early-stop 2 stops at the 4th."""
    from adaptune.training import loop
    from adaptune.training.train import train

    scripted = iter([0.3, 0.7, 0.6, 0.65, 0.9, 0.9])
    real = loop.Run.score

    def score(self, split):
        metrics = real(self, split)
        if split == "dev":
            metrics["macro_f1"] = next(scripted)
        return metrics

    monkeypatch.setattr(loop.Run, "score", score)
    data = write_reviews_csv(tmp_path / "d.csv", n=48)
    cfg = TrainConfig(
        model=str(tiny_model_dir), data=str(data), text_column="review", label_column="score",
        epochs=6, batch_size=8, eval_every=2, early_stop=2, device="cpu",
    )  # fmt: skip
    result = train(cfg, tmp_path / "run", quiet=True)
    assert [h["step"] for h in result["history"]] == [2, 4, 6, 8]
    assert result["best_step"] == 4 and result["dev"]["macro_f1"] == 0.7
    assert "stopped early at step 8" in result["stopped_early"] and "step 4" in result["stopped_early"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["stopped_early"] == result["stopped_early"]


# ---- the run's log ---------------------------------------------------------------------------------------


def test_log_jsonl_and_tensorboard_hold_the_run(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from adaptune.training.train import train

    data = write_reviews_csv(tmp_path / "d.csv", n=40)
    cfg = TrainConfig(
        model=str(tiny_model_dir), data=str(data), text_column="review", label_column="score",
        epochs=2, batch_size=8, device="cpu", log_dir=str(tmp_path / "tb"),
    )  # fmt: skip
    result = train(cfg, tmp_path / "run", quiet=True)
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["kind"] == "train"]
    assert [x["step"] for x in steps] == list(range(1, result["steps"] + 1))
    assert all(x["loss"] > 0 and x["lr"] > 0 and x["grad_norm"] > 0 for x in steps)
    assert [x["step"] for x in lines if x["kind"] == "dev"] == [h["step"] for h in result["history"]]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "dev/macro_f1", "speed/examples_per_s"} <= tags
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [x["step"] for x in steps]
    assert losses[0].value == pytest.approx(steps[0]["loss"], rel=1e-6)


# ---- the Hugging Face Trainer ------------------------------------------------------------------------------


def test_a_trainer_run_saves_an_adapter_that_adaptune_predict_loads(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("accelerate")
    from adaptune.cli.parser import main
    from adaptune.models.loading import load_tokenizer
    from adaptune.training.hf import AdapterRunCallback

    tok = load_tokenizer(str(tiny_model_dir))
    model = T.AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=2)
    add_adapter(model, "adapter", AdapterConfig.preset("houlsby", size=8))
    train_strategy(model, "adapters")
    texts = [f"this coffee is {w}" for w in ("great", "awful", "tasty", "stale")] * 10
    rows = [dict(tok(t, truncation=True, max_length=16), labels=i % 2) for i, t in enumerate(texts)]
    callback = AdapterRunCallback(
        tmp_path / "run", base=str(tiny_model_dir), tokenizer=tok, label_names=["good", "bad"], max_length=16
    )
    args = T.TrainingArguments(
        str(tmp_path / "trainer"), max_steps=10, per_device_train_batch_size=4, save_strategy="no",
        report_to=[], use_cpu=True, learning_rate=1e-3, logging_strategy="no",
    )  # fmt: skip
    before = model.adaptune.sets["adapter"].adapters["0"]["ffn"].up.weight.detach().clone()
    trainer = T.Trainer(
        model=model, args=args, train_dataset=rows, data_collator=T.DataCollatorWithPadding(tok), callbacks=[callback]
    )
    trainer.train()
    assert not torch.equal(before, model.adaptune.sets["adapter"].adapters["0"]["ffn"].up.weight)
    capsys.readouterr()  # the Trainer's own summary
    assert main(["predict", str(tmp_path / "run"), "this coffee is great", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert row["label"] in ("good", "bad") and set(row["probabilities"]) == {"good", "bad"}


def test_slow_steps_are_reported_every_few_seconds(monkeypatch):
    """The loop reads the losses every 16 steps, or sooner when steps are slow (a large model on a
    CPU), so the progress bar never shows a loss minutes old."""
    from adaptune.training import losses

    log = losses.LossLog()
    clock = [100.0]
    monkeypatch.setattr(losses.time, "perf_counter", lambda: clock[0])
    log.last_read = clock[0]
    log.add(1, torch.tensor(0.5))
    assert not log.due()
    clock[0] += losses.REPORT_SECONDS
    assert log.due()
    assert log.read(1e-3) == (0.5, []) and not log.due()
    for step in range(2, 2 + losses.REPORT_EVERY):
        log.add(step, torch.tensor(0.4))
    assert log.due()  # 16 quick steps
