"""Adding, removing and switching named adapters on a model (src/adaptune/core/inject.py).

Every supported family is tested on a tiny random-config model from conftest.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers as T
from conftest import FAMILIES, tiny_batch, tiny_model

from adaptune import (
    ARCHITECTURES,
    AdapterConfig,
    ArchitectureError,
    ArchSpec,
    ConfigError,
    SlotSpec,
    active_adapter,
    add_adapter,
    list_adapters,
    remove_adapter,
    set_active,
    train_strategy,
    using_adapters,
)

PRE_LN = {"gpt2", "llama", "mistral", "qwen2"}  # residual stream of a tiny random model is ~0.02


@torch.no_grad()
def outputs(model, batch=None):
    out = model(**(batch or tiny_batch()), output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def perturb(module, std=0.2, seed=1):
    """Give every tensor of ``module`` a clear push away from its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def hook_count(model):
    """Forward hooks and instance ``forward``s (routed modules) on the model. Take the baseline after
    a first forward: transformers adds its own output-recording hooks lazily on the first call."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + ("forward" in m.__dict__) for m in model.modules())


def rel_change(new, old):
    return ((new - old).norm() / old.norm()).item()


# ---- a fresh adapter starts as the base model ------------------------------------------------


PRESET_NAMES = ["houlsby", "pfeiffer", "houlsby-ffn", "parallel"]


def _pfeiffer_refused(model, family, preset) -> bool:
    """Pfeiffer's placement reads the norm after the residual add: pre-norm families refuse it."""
    if preset != "pfeiffer" or family not in PRE_LN:
        return False
    with pytest.raises(ArchitectureError, match="houlsby-ffn"):
        add_adapter(model, "t", "pfeiffer")
    assert list_adapters(model) == [] and not hasattr(model, "adaptune")  # nothing half-added
    return True


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_zero_init_adapter_gives_exactly_the_base_output(family, preset):
    model = tiny_model(family)
    if _pfeiffer_refused(model, family, preset):
        return
    logits0, hidden0 = outputs(model)
    aset = add_adapter(model, "t", AdapterConfig.preset(preset, init_std=0.0))
    assert len(aset.norms) > 0 and len(aset.head) > 0  # the task copies are in the path too
    logits1, hidden1 = outputs(model)
    assert torch.equal(logits1, logits0)
    assert torch.equal(hidden1, hidden0)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_fresh_adapter_leaves_outputs_nearly_unchanged(family, preset):
    model = tiny_model(family)
    if _pfeiffer_refused(model, family, preset):
        return
    logits0, hidden0 = outputs(model)
    cfg = AdapterConfig.preset(preset)
    if preset == "parallel":
        # He et al.'s parallel adapter starts with a zero up-projection: exactly the base model.
        add_adapter(model, "t", cfg)
        assert torch.equal(outputs(model)[1], hidden0)
        # Without that, the branch reads the sub-layer's normalised *input* (~1 per unit) and adds
        # it, times scale 4, to a residual stream that in a tiny random pre-LN model is only ~0.02
        # wide; at init_std 1e-2 that is a ~40 % change there, so use 1e-3 for the check below.
        remove_adapter(model, "t")
        cfg = dataclasses.replace(cfg, zero_init_up=False, init_std=1e-3 if family in PRE_LN else cfg.init_std)
    add_adapter(model, "t", cfg)
    logits1, hidden1 = outputs(model)
    assert not torch.equal(hidden1, hidden0)  # the adapter is really in the forward pass
    # The parallel branch reads the sub-layer input, and Pfeiffer's the normed sum of input and
    # output, both wider than the output a Houlsby adapter reads, so their fresh contribution is
    # larger (still ~1 %).
    assert rel_change(hidden1, hidden0) < (3e-2 if preset in ("parallel", "pfeiffer") else 5e-3)
    torch.testing.assert_close(logits1, logits0, rtol=0, atol=2e-3)

    # The same adapter with a non-near-identity init moves the output far more: the tolerance
    # above is tight enough to catch an init that ignored init_std.
    big = tiny_model(family)
    add_adapter(big, "t", dataclasses.replace(cfg, init_std=0.3))
    assert rel_change(outputs(big)[1], hidden0) > 10 * rel_change(hidden1, hidden0)


# ---- the adapter sits where the table says, with the right formula ---------------------------


def _sub_layer_input(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_adapter_transforms_the_named_sub_layer_output(family, mode):
    """out -> out + a(out) (sequential) or out + scale * a(x_in) (parallel), at every slot."""
    model = tiny_model(family)
    spec = ARCHITECTURES[model.config.model_type]
    layer = model.base_model.get_submodule(spec.layers)[1]
    seen = {}

    def keep(key):
        def hook(module, args, kwargs, out=None):
            if out is None:
                seen[key] = (args, kwargs)
            else:
                seen[key] = out[0] if isinstance(out, tuple) else out

        return hook

    for slot in ("attn", "ffn"):
        paths = spec.slot(slot)
        layer.get_submodule(paths.output).register_forward_pre_hook(keep((slot, "out-args")), with_kwargs=True)
        layer.get_submodule(paths.input).register_forward_pre_hook(keep((slot, "in")), with_kwargs=True)
        # What the rest of the layer receives: the output module's output, adapter included.
        layer.get_submodule(paths.output).register_forward_hook(keep((slot, "adapted")), with_kwargs=True)
    cfg = AdapterConfig(size=8, mode=mode, scale=4.0 if mode == "parallel" else 1.0, init_std=0.1)
    aset = add_adapter(model, "t", cfg)
    outputs(model)
    for slot in ("attn", "ffn"):
        a = aset.bottleneck(1, slot)
        out_mod = layer.get_submodule(spec.slot(slot).output)
        args, kwargs = seen[(slot, "out-args")]
        with torch.no_grad():  # the output module's own forward, without the adapter
            raw = type(out_mod).forward(out_mod, *args, **kwargs)
            seen[(slot, "out")] = raw[0] if isinstance(raw, tuple) else raw
            branch = a(seen[(slot, "out")] if mode == "sequential" else _sub_layer_input(*seen[(slot, "in")]))
        assert branch.abs().max() > 0
        torch.testing.assert_close(seen[(slot, "adapted")], seen[(slot, "out")] + branch)


def test_every_adapter_is_in_the_forward_pass(family):
    model = tiny_model(family)
    cfg = AdapterConfig(size=4, init_std=0.0, train_layer_norms=False, train_head=False)
    aset = add_adapter(model, "t", cfg)
    logits0, hidden0 = outputs(model)
    n = 0
    for layer_id, slots in aset.adapters.items():
        for slot, bottleneck in slots.items():
            with torch.no_grad():
                bottleneck.up.bias.fill_(0.5)
            assert not torch.equal(outputs(model)[1], hidden0), (layer_id, slot)
            with torch.no_grad():
                bottleneck.up.bias.zero_()
            n += 1
    assert n == 8  # 4 layers x 2 slots
    assert torch.equal(outputs(model)[1], hidden0)


def test_frozen_embedding_norm_stops_backward_at_the_first_adapter(family):
    """train_embedding_norm=False: no task copy of the norm before layer 0, so nothing below the
    first adapter needs a gradient (layer 0's attention block runs outside autograd); the other
    norm copies and every adapter still train. Models with no such norm are unaffected."""
    from adaptune.core.architectures import input_norm_paths, layer_list, spec_for

    seen, norm_keys, grads = {}, {}, {}
    for flag in (True, False):
        model = tiny_model(family)
        aset = add_adapter(model, "t", AdapterConfig.preset("houlsby", size=4, train_embedding_norm=flag))
        train_strategy(model, "adapters")
        spec = spec_for(model)
        # What reaches the first adapter: the input of the module it is hooked on.
        first = layer_list(model, spec)[0].get_submodule(spec.slot("attn").output)
        first.register_forward_pre_hook(lambda m, args, flag=flag: seen.__setitem__(flag, args[0].requires_grad))
        out = model(**tiny_batch()).logits
        out.float().pow(2).mean().backward()
        norm_keys[flag] = set(aset.norms.keys())
        grads[flag] = {
            n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0
        }
        assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "adapters" in n)
    dropped = {k.replace(".", "-") for k in input_norm_paths(spec)}  # the same spec for every model of the family
    assert norm_keys[True] - norm_keys[False] == dropped and norm_keys[False] <= norm_keys[True]
    assert len(grads[True]) - len(grads[False]) == 2 * len(dropped)  # weight and bias of each dropped copy
    if dropped:  # BERT-like: the embedding norm feeds layer 0's attention
        assert seen[True] and not seen[False]
    else:  # pre-LN families: layer 0's own (trained) norm sits before its attention either way
        assert seen[True] == seen[False]


@pytest.mark.parametrize(
    "cfg,n_adapters",
    [
        (AdapterConfig.preset("houlsby", size=8), 4 * 2),
        (AdapterConfig.preset("houlsby-ffn", size=8), 4 * 1),
        (AdapterConfig.preset("houlsby", size=5, layers=(0, -1)), 2 * 2),
        (AdapterConfig.preset("parallel", size=3, layers=(2,)), 1 * 1),
    ],
    ids=["houlsby", "houlsby-ffn", "houlsby-2-layers", "parallel-1-layer"],
)
def test_bottleneck_params_follow_the_closed_formula(family, cfg, n_adapters):
    model = tiny_model(family)
    d, m = 32, cfg.size  # conftest's hidden width
    aset = add_adapter(model, "t", cfg)
    row = list_adapters(model)[0]
    assert row["num_adapters"] == n_adapters == cfg.num_adapters(4)
    assert row["bottleneck_params"] == n_adapters * (2 * m * d + d + m)
    assert sum(p.numel() for p in aset.adapters.parameters()) == row["bottleneck_params"]


# ---- nothing of the base model is renamed or replaced ----------------------------------------


def test_base_state_dict_keys_are_unchanged(family):
    model = tiny_model(family)
    before = model.state_dict()
    add_adapter(model, "a", "houlsby")
    add_adapter(model, "b", "parallel")
    after = model.state_dict()
    assert set(before) <= set(after)
    new = set(after) - set(before)
    assert new and all(k.startswith("adaptune.") for k in new)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    # A checkpoint of the plain model still loads into the adapted one, and vice versa.
    model.load_state_dict(before, strict=False)
    plain = tiny_model(family)
    plain.load_state_dict({k: v for k, v in after.items() if k in before})


# ---- many tasks on one base ------------------------------------------------------------------


def _train_one_step(model, lr=1e-2):
    labels = torch.tensor([0, 1, 1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model(**tiny_batch(), labels=labels).loss.backward()
    opt.step()


def test_two_tasks_share_one_base(family):
    from adaptune import train_strategy

    model = tiny_model(family)
    base_logits, base_hidden = outputs(model)
    add_adapter(model, "a", AdapterConfig.preset("houlsby", size=8))
    add_adapter(model, "b", AdapterConfig.preset("houlsby-ffn", size=4), activate=False)
    assert active_adapter(model) == "a"
    perturb(model.adaptune.sets["b"], seed=2)

    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    train_strategy(model, "adapters")
    _train_one_step(model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, snapshot[k])}
    assert changed == {k for k in snapshot if k.startswith("adaptune.sets.a.")}

    out_a = outputs(model)[1]
    set_active(model, "b")
    assert active_adapter(model) == "b"
    out_b = outputs(model)[1]
    assert rel_change(out_a, base_hidden) > 1e-3 and rel_change(out_b, base_hidden) > 1e-3
    assert rel_change(out_a, out_b) > 1e-3
    set_active(model, None)
    assert active_adapter(model) is None
    logits, hidden = outputs(model)
    assert torch.equal(logits, base_logits) and torch.equal(hidden, base_hidden)
    set_active(model, "a")
    assert torch.equal(outputs(model)[1], out_a)

    rows = {r["name"]: r for r in list_adapters(model)}
    assert set(rows) == {"a", "b"}
    assert rows["a"]["active"] and not rows["b"]["active"]
    assert rows["a"]["num_adapters"] == 8 and rows["b"]["num_adapters"] == 4
    assert rows["a"]["config"].size == 8 and rows["b"]["config"].slots == ("ffn",)


def test_remove_adapter_restores_the_base(family):
    model = tiny_model(family)
    logits0, hidden0 = outputs(model)
    hooks0 = hook_count(model)
    add_adapter(model, "a", "houlsby")
    add_adapter(model, "b", "parallel")
    perturb(model.adaptune)
    assert hook_count(model) > hooks0

    remove_adapter(model, "b")  # the active one
    assert [r["name"] for r in list_adapters(model)] == ["a"]
    assert active_adapter(model) is None
    assert torch.equal(outputs(model)[1], hidden0)
    set_active(model, "a")
    assert not torch.equal(outputs(model)[1], hidden0)  # "a" still works after b's hooks went

    remove_adapter(model, "a")
    assert list_adapters(model) == []
    assert hook_count(model) == hooks0
    assert not any(k.startswith("adaptune.") for k in model.state_dict())
    logits, hidden = outputs(model)
    assert torch.equal(logits, logits0) and torch.equal(hidden, hidden0)


def test_list_adapters_counts():
    model = tiny_model("bert")
    assert list_adapters(model) == []
    d, m = model.config.hidden_size, 8
    add_adapter(model, "a", AdapterConfig.preset("houlsby", size=m))
    add_adapter(
        model,
        "b",
        AdapterConfig.preset(
            "pfeiffer", size=m, layers=(0, -1), train_layer_norms=False, train_head=False, train_pooler=False
        ),
    )
    rows = {r["name"]: r for r in list_adapters(model)}
    norm_numel = sum(p.numel() for n, p in model.bert.named_parameters() if "LayerNorm" in n)
    head_numel = sum(p.numel() for p in model.classifier.parameters())
    pooler_numel = d * d + d
    assert rows["a"]["bottleneck_params"] == 8 * (2 * m * d + d + m)
    assert rows["a"]["norm_params"] == norm_numel and rows["a"]["head_params"] == head_numel
    assert rows["a"]["pooler_params"] == pooler_numel
    assert rows["a"]["params"] == 8 * (2 * m * d + d + m) + norm_numel + head_numel + pooler_numel
    assert rows["b"]["num_adapters"] == 2
    assert rows["b"]["bottleneck_params"] == rows["b"]["params"] == 2 * (2 * m * d + d + m)
    assert rows["b"]["norm_params"] == rows["b"]["head_params"] == 0
    assert [r["active"] for r in list_adapters(model)] == [False, True]


def test_layers_subset_only_adapts_those_layers():
    model = tiny_model("bert")
    aset = add_adapter(model, "t", AdapterConfig.preset("houlsby", layers=(0, -1)))
    assert sorted(aset.adapters) == ["0", "3"]
    assert aset.bottleneck(1, "attn") is None and aset.bottleneck(3, "ffn") is not None


def test_without_norm_and_head_copies():
    model = tiny_model("llama")
    aset = add_adapter(model, "t", AdapterConfig(size=4, train_layer_norms=False, train_head=False))
    assert len(aset.norms) == 0 and len(aset.head) == 0
    assert all(".adapters." in k for k in model.state_dict() if k.startswith("adaptune."))


def test_adapter_follows_the_model_dtype():
    model = tiny_model("bert").to(torch.bfloat16)
    aset = add_adapter(model, "t", "houlsby")
    assert {p.dtype for p in aset.parameters()} == {torch.bfloat16}
    outputs(model)


# ---- bad requests ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "1task", "my.task", "a b", None, 3])
def test_invalid_names(name):
    model = tiny_model("bert")
    with pytest.raises(ConfigError, match="invalid"):
        add_adapter(model, name)
    assert list_adapters(model) == []


def test_duplicate_name_and_unknown_name():
    model = tiny_model("bert")
    add_adapter(model, "a")
    with pytest.raises(ConfigError, match="already exists"):
        add_adapter(model, "a", "pfeiffer")
    assert list_adapters(model)[0]["config"] == AdapterConfig.preset("houlsby")
    with pytest.raises(ConfigError, match=r"no adapter named 'x'.*\['a'\]"):
        set_active(model, "x")
    with pytest.raises(ConfigError, match="no adapter named 'x'"):
        remove_adapter(model, "x")
    assert active_adapter(model) == "a"


def test_layer_index_out_of_range_adds_nothing():
    model = tiny_model("bert")
    outputs(model)
    hooks0 = hook_count(model)
    with pytest.raises(ConfigError, match="layer index 4 is out of range"):
        add_adapter(model, "t", AdapterConfig(layers=(0, 4)))
    assert list_adapters(model) == [] and hook_count(model) == hooks0
    assert not any(k.startswith("adaptune.") for k in model.state_dict())


# ---- families: supported, custom, wrong table ------------------------------------------------


def _tiny_opt():
    torch.manual_seed(0)
    cfg = T.OPTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        vocab_size=100,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
        pad_token_id=1,
    )
    return T.AutoModelForSequenceClassification.from_config(cfg).eval()


OPT_SPEC = ArchSpec(
    layers="decoder.layers",
    attn=SlotSpec(output="self_attn.out_proj", input="self_attn", norm="self_attn_layer_norm"),
    ffn=SlotSpec(output="fc2", input="fc1", norm="final_layer_norm"),
    extra_norms=("decoder.final_layer_norm",),
)


def test_unsupported_family_names_the_supported_ones():
    model = _tiny_opt()
    with pytest.raises(ArchitectureError, match="model type 'opt' is not supported") as err:
        add_adapter(model, "t")
    for family in FAMILIES:
        assert family in str(err.value)
    assert "arch=" in str(err.value)  # says how to go on
    assert not hasattr(model, "adaptune")


def test_custom_arch_spec_on_an_unsupported_family():
    model = _tiny_opt()
    batch = tiny_batch()
    logits0, hidden0 = outputs(model, batch)
    aset = add_adapter(model, "t", AdapterConfig(size=4, init_std=0.0), arch=OPT_SPEC)
    assert list_adapters(model)[0]["num_adapters"] == 4 and len(aset.norms) == 5
    assert torch.equal(outputs(model, batch)[1], hidden0)
    perturb(aset.adapters)
    assert not torch.allclose(outputs(model, batch)[1], hidden0, atol=1e-3)
    set_active(model, None)
    assert torch.equal(outputs(model, batch)[0], logits0)


def test_custom_arch_spec_matches_the_built_in_row():
    """A BERT treated as an unknown family, with the BERT row passed as arch=, behaves the same."""
    custom = tiny_model("bert")
    custom.config.model_type = "my-bert"
    with pytest.raises(ArchitectureError, match="'my-bert' is not supported"):
        add_adapter(custom, "t")
    spec = ArchSpec(
        layers="encoder.layer",
        attn=SlotSpec(output="attention.output.dropout", input="attention", norm="attention.output.LayerNorm"),
        ffn=SlotSpec(output="output.dropout", input="intermediate", norm="output.LayerNorm"),
        extra_norms=("embeddings.LayerNorm",),
        pooler="pooler",
    )
    a = add_adapter(custom, "t", "houlsby", arch=spec)
    perturb(a)
    builtin = tiny_model("bert")
    b = add_adapter(builtin, "t", "houlsby")
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(outputs(custom), outputs(builtin))
    assert not torch.allclose(outputs(custom)[1], outputs(tiny_model("bert"))[1], atol=1e-3)


@pytest.mark.parametrize(
    "field,value,path",
    [
        ("layers", "encoder.layers", "encoder.layers"),
        ("ffn", SlotSpec(output="output.drop", input="intermediate", norm="output.LayerNorm"), "output.drop"),
        (
            "attn",
            SlotSpec(output="attention.output.dropout", input="attention", norm="attention.ln"),
            "encoder.layer.0.attention.ln",
        ),
        ("extra_norms", ("embeddings.Norm",), "embeddings.Norm"),
    ],
)
def test_wrong_path_names_the_path_and_adds_nothing(field, value, path):
    model = tiny_model("bert")
    logits0 = outputs(model)[0]
    hooks0 = hook_count(model)
    bad = dataclasses.replace(ARCHITECTURES["bert"], **{field: value})
    with pytest.raises(ArchitectureError, match=f"no module at '{path}'"):
        add_adapter(model, "t", arch=bad)
    assert list_adapters(model) == [] and hook_count(model) == hooks0
    assert torch.equal(outputs(model)[0], logits0)
    # The corrected table now takes effect (it is not shadowed by the failed attempt).
    add_adapter(model, "t", AdapterConfig(init_std=0.0), arch=ARCHITECTURES["bert"])
    assert list_adapters(model)[0]["num_adapters"] == 8


def test_an_output_module_that_is_also_a_copied_norm_is_refused_and_adds_nothing():
    """A table whose adapter output is a layer norm the adapters also copy: either route would
    silently bypass the other, so it is an error, whichever of two sets brings which."""
    overlap = dataclasses.replace(
        ARCHITECTURES["bert"], ffn=SlotSpec(output="output.LayerNorm", input="intermediate", norm="output.LayerNorm")
    )
    model = tiny_model("bert")
    outputs(model)
    hooks0 = hook_count(model)
    with pytest.raises(ArchitectureError, match="both a sub-layer output and a layer norm"):
        add_adapter(model, "t", "houlsby", arch=overlap)
    assert list_adapters(model) == [] and hook_count(model) == hooks0
    add_adapter(model, "bare", AdapterConfig(train_layer_norms=False, train_head=False), arch=overlap)
    with pytest.raises(ArchitectureError, match="both a sub-layer output and a layer norm"):
        add_adapter(model, "t", "houlsby")
    assert [r["name"] for r in list_adapters(model)] == ["bare"]


def test_removing_an_adapter_under_another_wrapper_keeps_the_wrapper(family):
    """Code that wrapped a routed module's forward after the adapter came (device-placement hooks
    do) keeps its wrapper when the adapter is removed; the adapter inside no longer runs."""
    model = tiny_model(family)
    logits0, hidden0 = outputs(model)
    perturb(add_adapter(model, "t", "houlsby"))
    calls = []
    wrapped = []
    for m in model.modules():
        if "forward" in m.__dict__:

            def wrapper(*args, inner=m.forward, **kwargs):
                calls.append(1)
                return inner(*args, **kwargs)

            m.forward = wrapper
            wrapped.append((m, wrapper))
    adapted = outputs(model)[1]
    assert calls and not torch.allclose(adapted, hidden0, atol=1e-3)
    remove_adapter(model, "t")
    assert all(m.__dict__.get("forward") is w for m, w in wrapped)
    calls.clear()
    logits, hidden = outputs(model)
    assert calls and torch.equal(hidden, hidden0) and torch.equal(logits, logits0)


def test_wrong_parallel_input_path_is_reported():
    bad = dataclasses.replace(
        ARCHITECTURES["bert"], ffn=SlotSpec(output="output.dropout", input="inter", norm="output.LayerNorm")
    )
    model = tiny_model("bert")
    add_adapter(model, "seq", "houlsby-ffn", arch=bad)  # sequential adapters never read the input path
    with pytest.raises(ArchitectureError, match="no module at 'inter'"):
        add_adapter(model, "par", "parallel")
    assert [r["name"] for r in list_adapters(model)] == ["seq"]


def test_another_arch_after_adapters_exist_is_an_error():
    model = tiny_model("bert")
    add_adapter(model, "a")
    other = dataclasses.replace(ARCHITECTURES["bert"], extra_norms=())
    with pytest.raises(ArchitectureError, match="another ArchSpec"):
        add_adapter(model, "b", arch=other)
    add_adapter(model, "b", arch=ARCHITECTURES["bert"])  # the same table is fine
    assert len(list_adapters(model)) == 2


# ---- the optimised path equals the plain one -------------------------------------------------


def _reference_twin(family, aset, spec):
    """A twin of the base whose own norms and head carry the task's copies, with plain hooks
    ``out + adapter(out)`` (or ``+ adapter(x_in)``): the unoptimised meaning of the adapter."""
    twin = tiny_model(family)
    base = twin.base_model
    for key, path in aset.norm_paths.items():
        base.get_submodule(path).load_state_dict(aset.norms[key].state_dict())
    for key, path in aset.pooler_paths.items():
        base.get_submodule(path).load_state_dict(aset.pooler[key].state_dict())
    for name, mod in aset.head.items():
        getattr(twin, name).load_state_dict(mod.state_dict())
    layers = base.get_submodule(spec.layers)
    stash = {}
    for layer_id, slots in aset.adapters.items():
        for slot, adapter in slots.items():
            paths, key = spec.slot(slot), (layer_id, slot)
            if aset.config.mode == "parallel":
                layers[int(layer_id)].get_submodule(paths.input).register_forward_pre_hook(
                    lambda m, a, kw, key=key: stash.__setitem__(key, _sub_layer_input(a, kw)), with_kwargs=True
                )

            def hook(m, args, kwargs, out, adapter=adapter, key=key):
                h = out[0] if isinstance(out, tuple) else out
                h = h + adapter(stash.pop(key) if key in stash else h)
                return (h, *out[1:]) if isinstance(out, tuple) else h

            layers[int(layer_id)].get_submodule(paths.output).register_forward_hook(hook, with_kwargs=True)
    return twin


@pytest.mark.parametrize("preset", ["houlsby", "parallel"])
def test_routed_norms_head_and_fused_add_equal_the_plain_path(family, preset):
    """Outputs and every gradient match the plain hooks on a twin holding the task's norms/head."""
    model = tiny_model(family)
    aset = add_adapter(model, "t", AdapterConfig.preset(preset, size=8, zero_init_up=False))
    perturb(aset, std=0.1)
    twin = _reference_twin(family, aset, ARCHITECTURES[family])
    train_strategy(model, "adapters")
    labels = torch.tensor([0, 1, 1])
    out = model(**tiny_batch(), labels=labels, output_hidden_states=True)
    ref = twin(**tiny_batch(), labels=labels, output_hidden_states=True)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.hidden_states[-1], ref.hidden_states[-1])
    out.loss.backward()
    ref.loss.backward()
    for key, path in aset.norm_paths.items():
        for pname, p in aset.norms[key].named_parameters():
            torch.testing.assert_close(p.grad, twin.base_model.get_submodule(path).get_parameter(pname).grad)
    for name, mod in aset.head.items():
        for pname, p in mod.named_parameters():
            torch.testing.assert_close(p.grad, getattr(twin, name).get_parameter(pname).grad)
    for key, path in aset.pooler_paths.items():
        for pname, p in aset.pooler[key].named_parameters():
            torch.testing.assert_close(p.grad, twin.base_model.get_submodule(path).get_parameter(pname).grad)
    for pname, p in aset.adapters.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, pname
    # The plain base is untouched: no gradient reached it.
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("adaptune."))


def test_a_task_norm_copy_replaces_the_base_norm_instead_of_running_after_it():
    model = tiny_model("bert")
    outputs(model)
    calls = []
    real = torch.nn.functional.layer_norm

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    torch.nn.functional.layer_norm = counting
    try:
        outputs(model)
        plain = len(calls)
        add_adapter(model, "t", "houlsby")
        calls.clear()
        outputs(model)
    finally:
        torch.nn.functional.layer_norm = real
    assert plain == 2 * 4 + 1 and len(calls) == plain  # 2 per layer + embeddings, never twice
    ln = model.bert.encoder.layer[0].output.LayerNorm
    assert "forward" in ln.__dict__
    remove_adapter(model, "t")
    assert "forward" not in ln.__dict__  # the class's own forward again


# ---- mixed-task batches ----------------------------------------------------------------------


def _three_tasks(family):
    model = tiny_model(family)
    for i, (name, cfg) in enumerate(
        [
            ("a", AdapterConfig.preset("houlsby", size=8)),
            ("b", AdapterConfig.preset("houlsby-ffn", size=4, train_layer_norms=False)),
            ("c", AdapterConfig.preset("parallel", size=4, zero_init_up=False, layers=(0, 2))),
        ]
    ):
        perturb(add_adapter(model, name, cfg), std=0.1, seed=i + 1)
    return model


def test_mixed_task_batch_equals_each_task_run_alone(family):
    model = _three_tasks(family)
    batch = tiny_batch(batch=6)
    rows = ["a", "b", "a", None, "c", "b"]
    set_active(model, rows)
    logits, hidden = outputs(model, batch)
    for name in ("a", "b", "c", None):
        idx = [i for i, r in enumerate(rows) if r == name]
        set_active(model, name)
        alone_logits, alone_hidden = outputs(model, {k: v[idx] for k, v in batch.items()})
        torch.testing.assert_close(logits[idx], alone_logits, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(hidden[idx], alone_hidden, rtol=1e-6, atol=1e-6)
    assert rel_change(logits[0], logits[1]) > 1e-3  # the tasks really differ


def test_mixed_task_gradients_equal_the_sum_of_separate_runs():
    model = _three_tasks("bert")
    batch, labels = tiny_batch(batch=4), torch.tensor([0, 1, 1, 0])
    rows = ["a", "b", "b", "a"]
    with using_adapters(model, rows):
        model(**batch, labels=labels).logits.sum().backward()
    mixed = {n: p.grad.clone() for n, p in model.adaptune.named_parameters() if p.grad is not None}
    model.zero_grad()
    for name in ("a", "b"):
        idx = [i for i, r in enumerate(rows) if r == name]
        with using_adapters(model, name):
            model(**{k: v[idx] for k, v in batch.items()}).logits.sum().backward()
    separate = {n: p.grad for n, p in model.adaptune.named_parameters() if p.grad is not None}
    assert set(mixed) == set(separate) and any(n.startswith("sets.b.") for n in mixed)
    for n in mixed:
        torch.testing.assert_close(mixed[n], separate[n], rtol=1e-5, atol=1e-6)


def test_per_row_routing_api():
    model = _three_tasks("bert")
    set_active(model, ["a", "a", "a"])  # one task for every row: the single-task path
    assert active_adapter(model) == ("a", "a", "a")
    with using_adapters(model, ["b", None, "c"]):
        assert active_adapter(model) == ("b", None, "c")
        assert [r["active"] for r in list_adapters(model)] == [False, True, True]
        with pytest.raises(ConfigError, match="name 3 rows but the batch has 2"):
            outputs(model, tiny_batch(batch=2))
    assert active_adapter(model) == ("a", "a", "a")
    with pytest.raises(ConfigError, match=r"unknown \['x'\]"):
        set_active(model, ["a", "x"])
    remove_adapter(model, "a")
    assert active_adapter(model) is None


def test_deepcopy_gives_an_independent_adapted_model(family):
    """copy.deepcopy of an adapted model runs the copy's own adapters, norm and head copies and
    dropout settings; changing or removing them leaves the original untouched."""
    import copy

    from adaptune.cpu.kernels import use_lean_kernels

    model = tiny_model(family)
    perturb(add_adapter(model, "t", AdapterConfig.preset("houlsby", size=4)))
    use_lean_kernels(model)
    ref = outputs(model)[0]
    twin = copy.deepcopy(model)
    torch.testing.assert_close(outputs(twin)[0], ref)
    with torch.no_grad():
        for p in twin.adaptune.parameters():
            p.zero_()
    assert not torch.allclose(outputs(twin)[0], ref)
    assert torch.equal(outputs(model)[0], ref)
    twin.train()  # the twin's dropout is on; the original's lean dropout must still read its own flag
    assert torch.equal(outputs(model)[0], ref)
    remove_adapter(twin, "t")
    set_active(twin, None)
    assert torch.equal(outputs(model)[0], ref) and active_adapter(model) == "t"


def test_task_copies_of_routed_modules_do_not_copy_the_container():
    """A second task's norm copy is made from a base norm that already carries our route; the
    route (which holds every task's adapters) is left out of that copy, and the copy computes
    the plain norm."""
    import gc

    from adaptune.core.adapter_set import _fresh_copy
    from adaptune.core.inject import AdapterContainer

    model = tiny_model("bert")
    add_adapter(model, "a", AdapterConfig.preset("houlsby", size=4))
    ln = model.bert.encoder.layer[0].output.LayerNorm
    gc.collect()
    gc.disable()  # a copied container would otherwise only live until the next collection
    try:
        before = sum(isinstance(o, AdapterContainer) for o in gc.get_objects())
        twin = _fresh_copy(ln)
        after = sum(isinstance(o, AdapterContainer) for o in gc.get_objects())
    finally:
        gc.enable()
    assert after == before
    assert "forward" not in twin.__dict__ and not twin._forward_hooks
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(twin(x), torch.nn.functional.layer_norm(x, (32,), ln.weight, ln.bias, ln.eps))
