"""Stack (adapters run one after another) and weighted averaging of adapters."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_model

from adaptune import AdapterConfig, ConfigError, Stack, add_adapter, average_adapters, set_active, train_strategy


def _bare(preset="houlsby", **kw):
    """An adapter without norm/head/pooler copies: a Stack's output then depends on its bottlenecks only."""
    return AdapterConfig.preset(preset, size=4, train_layer_norms=False, train_head=False, train_pooler=False, **kw)


def _out(model):
    """The top layer's hidden states (the tiny random head's logits are too small to show much)."""
    with torch.no_grad():
        return model(**tiny_batch(), output_hidden_states=True).hidden_states[-1]


def _randomise(aset, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in aset.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("preset", ["houlsby", "pfeiffer", "parallel"])
def test_stack_runs_its_adapters_one_after_another(preset):
    model = tiny_model("bert")
    _randomise(add_adapter(model, "a", _bare(preset)), 1)
    _randomise(add_adapter(model, "b", _bare(preset)), 2)
    add_adapter(model, "zero", _bare(preset, init_std=0.0))
    alone = {}
    for name in ("a", "b"):
        set_active(model, name)
        alone[name] = _out(model)
    set_active(model, Stack("a", "zero"))  # an identity adapter on top changes nothing
    torch.testing.assert_close(_out(model), alone["a"], rtol=0, atol=1e-6)
    set_active(model, Stack("zero", "b"))
    torch.testing.assert_close(_out(model), alone["b"], rtol=0, atol=1e-6)
    set_active(model, Stack("a", "b"))
    ab = _out(model)
    set_active(model, Stack("b", "a"))
    ba = _out(model)
    for other in (alone["a"], alone["b"]):  # both run
        assert (ab - other).abs().max() > 1e-4
    if preset == "parallel":  # both read the sub-layer's input: their sum, in either order
        torch.testing.assert_close(ab, ba, rtol=0, atol=1e-5)
    else:  # the second reads what the first returned: the order matters
        assert (ab - ba).abs().max() > 1e-4


def test_stack_of_houlsby_adapters_is_their_composition():
    model = tiny_model("bert")
    a = add_adapter(model, "a", _bare())
    b = add_adapter(model, "b", _bare())
    _randomise(a, 3)
    _randomise(b, 4)
    set_active(model, Stack("a", "b"))
    stacked = _out(model)
    # the same by hand: one adapter whose every bottleneck is b(a(h)) is not a bottleneck, so check
    # one sub-layer: h -> h + a(h) -> that + b(that)
    h = torch.randn(2, 5, 32)
    one = a.bottleneck(0, "ffn").add_to(h)
    both = b.bottleneck(0, "ffn").add_to(one)
    container = model.adaptune
    out = container._on_output(0, "ffn", h)
    torch.testing.assert_close(out, both, rtol=0, atol=1e-6)
    assert stacked.shape[0] == 3


def test_stack_trains_only_the_top_adapter_when_asked():
    model = tiny_model("bert")
    a = add_adapter(model, "a", _bare())
    b = add_adapter(model, "b", AdapterConfig.preset("houlsby", size=4))
    set_active(model, Stack("a", "b", train="top"))
    train_strategy(model, "adapters")
    assert not any(p.requires_grad for p in a.parameters()) and all(p.requires_grad for p in b.parameters())
    model(**tiny_batch(), labels=torch.tensor([0, 1, 0])).loss.backward()
    assert all(p.grad is None for p in a.parameters())
    assert all(p.grad is not None for p in b.adapters.parameters()) and b.head.classifier.weight.grad is not None
    set_active(model, Stack("a", "b"))
    train_strategy(model, "adapters")
    assert all(p.requires_grad for p in a.parameters())


def test_bad_stacks_are_refused():
    model = tiny_model("bert")
    add_adapter(model, "a", _bare())
    for bad, message in [
        (lambda: Stack("a"), "at least two"),
        (lambda: Stack("a", "a"), "once"),
        (lambda: Stack("a", "b", train="bottom"), "'all' or 'top'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            bad()
    with pytest.raises(ConfigError, match=r"\['nope'\]"):
        set_active(model, Stack("a", "nope"))


def test_the_average_of_identical_adapters_is_that_adapter():
    model = tiny_model("bert")
    a = add_adapter(model, "a", AdapterConfig.preset("houlsby", size=4))
    _randomise(a, 5)
    b = add_adapter(model, "b", AdapterConfig.preset("houlsby", size=4))
    b.load_state_dict(a.state_dict())
    set_active(model, "a")
    expected = _out(model)
    for name, weights, normalize in [("w37", [0.3, 0.7], True), ("w22", [2.0, 2.0], True), ("raw", [0.5, 0.5], False)]:
        avg = average_adapters(model, name, ["a", "b"], weights, normalize=normalize)
        for k, v in avg.state_dict().items():
            torch.testing.assert_close(v, a.state_dict()[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(_out(model), expected, rtol=0, atol=1e-6)


def test_average_is_the_weighted_sum_of_the_tensors():
    model = tiny_model("bert")
    a, b = (add_adapter(model, n, AdapterConfig.preset("pfeiffer", size=4)) for n in "ab")
    _randomise(a, 6)
    _randomise(b, 7)
    avg = average_adapters(model, "avg", {"a": 1.0, "b": 3.0})  # normalised: 0.25, 0.75
    for k, v in avg.state_dict().items():
        torch.testing.assert_close(v, 0.25 * a.state_dict()[k] + 0.75 * b.state_dict()[k], rtol=0, atol=1e-6)
    raw = average_adapters(model, "diff", ["a", "b"], [1.0, -1.0], normalize=False)  # task arithmetic
    k = "adapters.0.ffn.up.weight"
    torch.testing.assert_close(raw.state_dict()[k], a.state_dict()[k] - b.state_dict()[k], rtol=0, atol=1e-6)


def test_bad_averages_are_refused():
    model = tiny_model("bert")
    add_adapter(model, "a", AdapterConfig.preset("houlsby", size=4))
    add_adapter(model, "b", AdapterConfig.preset("houlsby", size=8))
    add_adapter(model, "c", AdapterConfig.preset("houlsby", size=4))
    with pytest.raises(ConfigError, match="different configurations"):
        average_adapters(model, "x", ["a", "b"])
    with pytest.raises(ConfigError, match="sum to 0"):
        average_adapters(model, "x", ["a", "c"], [1.0, -1.0])
    with pytest.raises(ConfigError, match="one weight per adapter"):
        average_adapters(model, "x", ["a", "c"], [1.0])
    with pytest.raises(ConfigError, match="finite"):
        average_adapters(model, "x", ["a", "c"], [1.0, float("nan")])
    with pytest.raises(ConfigError, match="no adapter named 'zz'"):
        average_adapters(model, "x", ["a", "zz"])
    assert set(model.adaptune.sets) == {"a", "b", "c"}  # nothing half-added
