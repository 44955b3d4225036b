"""Lean dropout and attention (src/adaptune/kernels.py): same results as the plain math, given the same mask."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_model

import adaptune.kernels as K
from adaptune import AdapterConfig, add_adapter, train_strategy


def test_keep_mask_rate_and_shape():
    torch.manual_seed(0)
    keep = K.keep_mask((200, 500), 0.1, torch.device("cpu"))
    assert keep.dtype == torch.bool and keep.shape == (200, 500)
    assert abs(keep.float().mean().item() - 0.9) < 0.005
    assert not torch.equal(keep, K.keep_mask((200, 500), 0.1, torch.device("cpu")))  # fresh draws
    assert K.keep_mask((10,), 0.0, torch.device("cpu")).all()


@pytest.fixture
def fixed_mask(monkeypatch):
    """Every keep_mask call returns the same seeded draw, so lean and reference use one mask."""
    def fixed(shape, p, device):
        g = torch.Generator().manual_seed(7)
        return torch.rand(tuple(shape), generator=g) >= p

    monkeypatch.setattr(K, "keep_mask", fixed)
    return fixed


def test_dropout_equals_mask_times_scale_with_gradient(fixed_mask):
    x = torch.randn(4, 6, 8, requires_grad=True)
    y = K.lean_dropout(x, 0.25)
    keep = fixed_mask(x.shape, 0.25, x.device)
    ref = x * keep / 0.75
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])
    assert K.lean_dropout(x, 0.25, training=False) is x


def _reference_attention(q, k, v, mask, keep, p, scale):
    s = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows attend to nothing
    return (probs * keep / (1 - p)) @ v


@pytest.mark.parametrize("case", ["padding", "causal", "dead-row", "none"])
def test_attention_equals_the_math_with_gradients(fixed_mask, case):
    torch.manual_seed(0)
    b, h, t, d, p = 2, 3, 5, 4, 0.2
    q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
    mask = torch.ones(b, 1, t, t, dtype=torch.bool)
    if case == "padding":
        mask[0, ..., -2:] = False
    elif case == "causal":
        mask = torch.ones(t, t, dtype=torch.bool).tril()
    elif case == "dead-row":
        mask[1, 0, 2, :] = False
    elif case == "none":
        mask = None

    class Module(torch.nn.Module):
        is_causal = case == "causal"

    module = Module().train()
    out, _ = K.lean_sdpa_attention(module, q, k, v, None if case == "causal" else mask, dropout=p)
    keep = fixed_mask((b, h, t, t), p, q.device)
    ref = _reference_attention(q, k, v, mask, keep, p, d**-0.5).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g))


@pytest.mark.parametrize("family", ["bert", "roberta", "llama", "gpt2", "distilbert"])
def test_lean_model_matches_plain_outside_training_and_trains(family):
    model = tiny_model(family)
    add_adapter(model, "t", "houlsby")
    batch = tiny_batch()
    with torch.no_grad():
        plain = model(**batch).logits
    assert K.use_lean_kernels(model) > 0
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain)  # eval: the plain kernels run
    train_strategy(model, "adapters")
    model.train()
    model(**batch, labels=torch.tensor([0, 1, 1])).loss.backward()
    assert all(p.grad is not None for p in model.adaptune.parameters())
    K.use_lean_kernels(model, enable=False)
    assert not any(isinstance(m, K.LeanDropout) for m in model.modules())
    assert getattr(model.config, "_attn_implementation", "sdpa") in ("sdpa", "eager")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain)


def test_lean_training_step_equals_plain_when_dropout_keeps_everything(fixed_mask, monkeypatch):
    """Every element kept (p ~ 0, yet on the training path): a lean forward and backward equal the
    plain model's, values and every gradient."""
    monkeypatch.setattr(K, "keep_mask", lambda shape, p, device: torch.ones(tuple(shape), dtype=torch.bool))
    model = tiny_model("bert")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 1e-7  # training path taken, scale 1/(1 - 1e-7)
    model.config.attention_probs_dropout_prob = 1e-7
    ref = tiny_model("bert")
    batch, labels = tiny_batch(), torch.tensor([0, 1, 1])
    ref.eval()
    r = ref(**batch, labels=labels)
    r.loss.backward()
    K.use_lean_kernels(model)
    model.train()
    out = model(**batch, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(out.logits, r.logits, rtol=1e-5, atol=1e-6)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("lean_first", [True, False])
def test_lean_dropout_runs_under_adapters_on_the_same_module_in_either_order(lean_first, monkeypatch):
    """BERT's adapters sit on the output dropouts: both the lean kernel and the adapter must run there,
    whichever came first, and switching lean kernels off (or removing the adapter) undoes only that."""
    from adaptune import remove_adapter

    calls = []
    real = K.lean_dropout
    monkeypatch.setattr(K, "lean_dropout", lambda x, p, training=True: calls.append(p) or real(x, p, training))
    model, batch = tiny_model("bert"), tiny_batch()
    with torch.no_grad():
        base = model(**batch).logits
    if lean_first:
        K.use_lean_kernels(model)
    add_adapter(model, "t", AdapterConfig(size=8, init_std=0.1))
    if not lean_first:
        K.use_lean_kernels(model)
    slots = {id(model.bert.encoder.layer[i].get_submodule(p)) for i in range(4)
             for p in ("attention.output.dropout", "output.dropout")}
    assert all(type(m) is K.LeanDropout for m in model.modules() if id(m) in slots)
    with torch.no_grad():
        adapted = model(**batch).logits
    assert len(calls) >= len(slots)  # every dropout ran lean, the adapted ones included
    assert not torch.allclose(adapted, base)  # ... and the adapters ran too
    calls.clear()
    K.use_lean_kernels(model, enable=False)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, adapted)
    assert not calls
    K.use_lean_kernels(model)
    remove_adapter(model, "t")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base)
    assert len(calls) >= len(slots)
