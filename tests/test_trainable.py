"""Which parameters train, per strategy (src/adaptune/core/trainable.py).

The core check (PEFT ``test_only_params_are_updated``): after one real optimisation step, exactly
the parameters the strategy selects have changed, and every one of them has. The expected sets
are written here from parameter *names*, independently of the library's module selection.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_model

from adaptune import (
    STRATEGIES,
    AdapterConfig,
    ConfigError,
    add_adapter,
    count_parameters,
    list_adapters,
    train_strategy,
)

LABELS = torch.tensor([0, 1, 1])


def one_step(model, opt="adamw"):
    """One optimisation step on a real loss; returns the state_dict keys whose values changed.

    The optimiser gets *every* parameter, so a wrongly unfrozen one would move too. Adam moves any
    parameter with a non-zero gradient by ~lr; weight decay is off so nothing moves without one.
    """
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    optim = (
        torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0) if opt == "adamw" else torch.optim.SGD(params, lr=10.0)
    )
    loss = model(**tiny_batch(), labels=LABELS).loss
    assert torch.isfinite(loss)
    loss.backward()
    optim.step()
    after = model.state_dict()
    assert set(after) == set(before)
    return {k for k in before if not torch.equal(before[k], after[k])}


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---- strategy "adapters" on every family -----------------------------------------------------


def test_adapters_strategy_trains_exactly_the_active_adapter(family):
    model = tiny_model(family)
    base_keys = set(model.state_dict())
    add_adapter(model, "task", "houlsby")
    counts = train_strategy(model, "adapters")
    changed = one_step(model)

    adapter_keys = {k for k in model.state_dict() if k.startswith("adaptune.sets.task.")}
    # The set holds its own layer norms and head: those change, the base's must not.
    assert any(".norms." in k for k in adapter_keys) and any(".head." in k for k in adapter_keys)
    assert len([k for k in adapter_keys if ".adapters." in k]) == 8 * 4  # 8 bottlenecks x 4 tensors
    assert changed == adapter_keys
    assert not changed & base_keys
    assert trainable_names(model) == adapter_keys
    assert counts.trainable == list_adapters(model)[0]["params"]


def test_adapters_strategy_with_sgd():
    model = tiny_model("roberta")
    add_adapter(model, "task", "pfeiffer")
    train_strategy(model, "adapters")
    assert one_step(model, opt="sgd") == {k for k in model.state_dict() if k.startswith("adaptune.")}


def test_adapters_without_norm_and_head_copies_train_only_bottlenecks():
    model = tiny_model("bert")
    add_adapter(model, "task", AdapterConfig(size=8, train_layer_norms=False, train_head=False, train_pooler=False))
    train_strategy(model, "adapters")
    changed = one_step(model)
    assert changed == {k for k in model.state_dict() if k.startswith("adaptune.sets.task.adapters.")}


def test_only_the_active_of_two_adapters_trains():
    model = tiny_model("llama")
    add_adapter(model, "a", "houlsby")
    # now active; with the preset's zero up-projection the down-projection would get a zero
    # gradient on the very first step (as in LoRA), so start both projections non-zero here
    add_adapter(model, "b", AdapterConfig.preset("parallel", zero_init_up=False))
    counts = train_strategy(model, "adapters")
    b_keys = {k for k in model.state_dict() if k.startswith("adaptune.sets.b.")}
    # The inactive set gets no gradient anyway, so check the selection itself too.
    assert trainable_names(model) == b_keys
    assert counts.trainable == list_adapters(model)[1]["params"] < counts.adapters
    assert one_step(model) == b_keys


# ---- base-model strategies -------------------------------------------------------------------

# Per family, by parameter name: the prefix of layer i, the modules above the layers, the head,
# and what counts as a layer norm.
NAMES = {
    "bert": dict(
        layer="bert.encoder.layer.{}.",
        post=("bert.pooler.",),
        head=("classifier.",),
        pooler=("bert.pooler.",),
        norm=lambda n: "LayerNorm" in n,
    ),
    "llama": dict(
        layer="model.layers.{}.",
        post=("model.norm.",),
        head=("score.",),
        norm=lambda n: n.endswith("layernorm.weight") or n == "model.norm.weight",
    ),
    "gpt2": dict(
        layer="transformer.h.{}.",
        post=("transformer.ln_f.",),
        head=("score.",),
        norm=lambda n: ".ln_" in n,
    ),
    "distilbert": dict(
        layer="distilbert.transformer.layer.{}.",
        post=(),
        head=("pre_classifier.", "classifier."),
        norm=lambda n: "layer_norm" in n or "LayerNorm" in n,
    ),
}


def expected_trainable(model, family, strategy, k=2, pooler=True):
    rule = NAMES[family]
    names = [n for n, _ in model.named_parameters()]
    # the pooler (BERT's) belongs to the task head unless train_pooler=False
    head = {n for n in names if n.startswith(rule["head"] + (rule.get("pooler", ()) if pooler else ()))}
    if strategy == "full":
        return set(names)
    if strategy == "head":
        return head
    if strategy == "layernorm":
        return {n for n in names if rule["norm"](n)} | head
    top = tuple(rule["layer"].format(i) for i in range(4 - k, 4)) + rule["post"]
    return {n for n in names if n.startswith(top)} | head


@pytest.mark.parametrize("strategy", ["full", "top-k", "layernorm", "head"])
@pytest.mark.parametrize("family_", sorted(NAMES))
def test_base_strategies_train_exactly_the_selection(family_, strategy):
    model = tiny_model(family_)
    expected = expected_trainable(model, family_, strategy)
    counts = train_strategy(model, strategy, k=2 if strategy == "top-k" else None)
    assert trainable_names(model) == expected
    assert one_step(model) == expected
    assert counts.trainable == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    assert counts.adapters == 0


@pytest.mark.parametrize("strategy", ["layernorm", "head"])
def test_train_pooler_false_keeps_the_pooler_frozen(strategy):
    model = tiny_model("bert")
    expected = expected_trainable(model, "bert", strategy, pooler=False)
    train_strategy(model, strategy, train_pooler=False)
    assert not any(n.startswith("bert.pooler.") for n in expected)
    assert trainable_names(model) == expected


def test_train_strategy_freezes_what_an_earlier_call_unfroze():
    model = tiny_model("bert")
    train_strategy(model, "full")
    counts = train_strategy(model, "head")
    head = {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    assert trainable_names(model) == head
    assert counts.trainable == sum(p.numel() for n, p in model.named_parameters() if n in head)


def test_full_then_adapters_keeps_the_base_frozen():
    model = tiny_model("bert")
    train_strategy(model, "full")
    add_adapter(model, "t", "houlsby")
    train_strategy(model, "adapters")
    assert all(n.startswith("adaptune.") for n in trainable_names(model))


# ---- counts ----------------------------------------------------------------------------------


def test_param_counts_and_percent():
    model = tiny_model("bert")
    total = sum(p.numel() for p in model.parameters())
    full = train_strategy(model, "full")
    assert full.trainable == full.base == total and full.percent == 100.0

    d, m = model.config.hidden_size, 16
    add_adapter(model, "t", AdapterConfig(size=m, train_layer_norms=False, train_head=False, train_pooler=False))
    counts = train_strategy(model, "adapters")
    assert counts.base == total  # adapters are not part of the base
    assert counts.adapters == counts.trainable == 8 * (2 * m * d + d + m)
    assert counts.percent == pytest.approx(100 * counts.trainable / total)
    assert 0 < counts.percent < 100
    assert count_parameters(model) == counts


def test_count_parameters_counts_tied_weights_once():
    model = tiny_model("gpt2", head="causal-lm")
    assert model.lm_head.weight is model.transformer.wte.weight
    counts = count_parameters(model)
    with_duplicates = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert counts.base == with_duplicates - model.lm_head.weight.numel()
    train_strategy(model, "full")
    assert count_parameters(model).trainable == counts.base


def test_top_k_with_k_equal_to_depth_is_every_layer():
    model = tiny_model("bert")
    train_strategy(model, "top-k", k=4)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("bert.embeddings.") for n in frozen)


# ---- errors ----------------------------------------------------------------------------------


def test_unknown_strategy_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown strategy 'lora'") as err:
        train_strategy(tiny_model("bert"), "lora")
    for s in STRATEGIES:
        assert s in str(err.value)


def test_adapters_strategy_needs_an_active_adapter():
    model = tiny_model("bert")
    with pytest.raises(ConfigError, match="needs an active adapter"):
        train_strategy(model, "adapters")
    add_adapter(model, "t", activate=False)
    with pytest.raises(ConfigError, match="needs an active adapter"):
        train_strategy(model, "adapters")


@pytest.mark.parametrize("strategy", ["full", "top-k", "layernorm", "head"])
def test_base_strategies_refuse_an_active_adapter(strategy):
    model = tiny_model("bert")
    add_adapter(model, "t")
    with pytest.raises(ConfigError, match="set_active"):
        train_strategy(model, strategy, k=1)


@pytest.mark.parametrize("k", [None, 0, 5, -1])
def test_top_k_needs_a_valid_k(k):
    with pytest.raises(ConfigError, match="k between 1 and 4"):
        train_strategy(tiny_model("bert"), "top-k", k=k)


def test_head_strategy_needs_a_head():
    import transformers as T

    backbone_only = T.AutoModel.from_config(tiny_model("bert").config)
    with pytest.raises(ConfigError, match="needs a model with a task head"):
        train_strategy(backbone_only, "head")
