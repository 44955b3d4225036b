"""Saving and loading one adapter: round trip, exact file contents, strict failures (src/adaptune/core/io.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers as T
from conftest import tiny_batch, tiny_model
from safetensors.torch import load_file, save_file

import adaptune
import adaptune.core.io as aio
from adaptune import (
    AdapterConfig,
    AdapterFileError,
    ConfigError,
    active_adapter,
    add_adapter,
    fingerprint,
    list_adapters,
    load_adapter,
    read_adapter_config,
    save_adapter,
    set_active,
)

WEIGHTS, CONFIG = "adapter.safetensors", "adapter_config.json"


@torch.no_grad()
def hidden(model):
    out = model(**tiny_batch(), output_hidden_states=True)
    return torch.cat([out.logits.flatten(), out.hidden_states[-1].flatten()])


def perturb(module, std=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ---- round trip ------------------------------------------------------------------------------


def test_save_load_round_trip_into_a_fresh_twin(family, tmp_path):
    model = tiny_model(family)
    base = hidden(model)
    aset = add_adapter(model, "task", AdapterConfig.preset("houlsby", size=8))
    perturb(aset)
    adapted = hidden(model)
    # First prove the adapter matters, so the round trip cannot pass vacuously.
    assert (adapted - base).abs().max() > 1e-2

    save_adapter(model, "task", tmp_path / "task")
    twin = tiny_model(family, seed=0)
    assert torch.equal(hidden(twin), base)  # really the same base
    assert load_adapter(twin, tmp_path / "task") == "task"
    assert active_adapter(twin) == "task"
    torch.testing.assert_close(hidden(twin), adapted, rtol=0, atol=1e-6)
    set_active(twin, None)
    assert torch.equal(hidden(twin), base)


@pytest.mark.parametrize("family_", ["bert", "llama"])
@pytest.mark.parametrize(
    "cfg",
    [
        AdapterConfig.preset("parallel", size=4),
        AdapterConfig.preset("houlsby-ffn", size=4, layers=(0, -1), nonlinearity="relu"),
        AdapterConfig(size=4, slots=("attn",), train_layer_norms=False, train_head=False, scale=2.0),
    ],
    ids=["parallel", "ffn-subset", "attn-only-no-copies"],
)
def test_round_trip_keeps_the_config(family_, cfg, tmp_path):
    model = tiny_model(family_)
    base = hidden(model)
    perturb(add_adapter(model, "task", cfg))
    adapted = hidden(model)
    assert (adapted - base).abs().max() > 1e-3
    save_adapter(model, "task", tmp_path / "a")
    twin = tiny_model(family_)
    load_adapter(twin, tmp_path / "a", name="again")
    assert list_adapters(twin)[0]["config"] == cfg
    torch.testing.assert_close(hidden(twin), adapted, rtol=0, atol=1e-6)


def test_load_next_to_other_adapters(tmp_path):
    model = tiny_model("bert")
    perturb(add_adapter(model, "a", AdapterConfig(size=4)))
    out_a = hidden(model)
    save_adapter(model, "a", tmp_path / "a")
    twin = tiny_model("bert")
    perturb(add_adapter(twin, "other", AdapterConfig(size=4)), seed=5)
    out_other = hidden(twin)
    assert load_adapter(twin, tmp_path / "a", activate=False) == "a"
    assert active_adapter(twin) == "other"
    assert torch.equal(hidden(twin), out_other)
    set_active(twin, "a")
    torch.testing.assert_close(hidden(twin), out_a, rtol=0, atol=1e-6)
    # The same file under a second name: two independent copies.
    load_adapter(twin, tmp_path / "a", name="a2")
    assert [r["name"] for r in list_adapters(twin)] == ["other", "a", "a2"]
    with pytest.raises(ConfigError, match="already exists"):
        load_adapter(twin, tmp_path / "a")


# ---- what is in the folder -------------------------------------------------------------------


def test_saved_keys_are_exactly_the_task_tensors(tmp_path):
    model = tiny_model("bert")
    add_adapter(model, "task", AdapterConfig.preset("houlsby", size=8))
    save_adapter(model, "task", tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [WEIGHTS, CONFIG]
    tensors = load_file(tmp_path / "a" / WEIGHTS)

    expected = set()
    for i in range(4):
        for slot in ("attn", "ffn"):
            for proj in ("down", "up"):
                expected |= {f"adapters.{i}.{slot}.{proj}.weight", f"adapters.{i}.{slot}.{proj}.bias"}
        for norm in ("attention-output-LayerNorm", "output-LayerNorm"):
            expected |= {f"norms.encoder-layer-{i}-{norm}.weight", f"norms.encoder-layer-{i}-{norm}.bias"}
    expected |= {"norms.embeddings-LayerNorm.weight", "norms.embeddings-LayerNorm.bias"}
    expected |= {"head.classifier.weight", "head.classifier.bias"}
    expected |= {"pooler.pooler.dense.weight", "pooler.pooler.dense.bias"}  # BERT's pooler, part of the task head
    assert set(tensors) == expected
    assert tensors["adapters.0.attn.down.weight"].shape == (8, 32)
    assert tensors["adapters.3.ffn.up.weight"].shape == (32, 8)
    assert tensors["head.classifier.weight"].shape == (2, 32)
    # Nothing of the shared base is in the file.
    assert sum(t.numel() for t in tensors.values()) == list_adapters(model)[0]["params"]


def test_saved_keys_without_norm_and_head_copies(tmp_path):
    model = tiny_model("llama")
    add_adapter(model, "task", AdapterConfig.preset("houlsby-ffn", size=4, train_layer_norms=False, train_head=False))
    save_adapter(model, "task", tmp_path / "a")
    expected = {f"adapters.{i}.ffn.{p}.{w}" for i in range(4) for p in ("down", "up") for w in ("weight", "bias")}
    assert set(load_file(tmp_path / "a" / WEIGHTS)) == expected


def test_config_json_is_stamped(tmp_path):
    model = tiny_model("bert")
    cfg = AdapterConfig.preset("pfeiffer", size=8)
    add_adapter(model, "task", cfg)
    save_adapter(model, "task", tmp_path / "a", extra={"labels": ["neg", "pos"]})
    meta = json.loads((tmp_path / "a" / CONFIG).read_text())
    assert meta["format"] == 1 and meta["adaptune_version"] == adaptune.__version__
    assert meta["name"] == "task" and meta["extra"] == {"labels": ["neg", "pos"]}
    assert AdapterConfig.from_dict(meta["config"]) == cfg
    assert meta["base"] == {
        "model_type": "bert",
        "hidden_size": 32,
        "num_layers": 4,
        "fingerprint": fingerprint(model),
    }
    assert meta["tensors"] == sorted(load_file(tmp_path / "a" / WEIGHTS))
    read = read_adapter_config(tmp_path / "a")
    assert read["config"] == cfg and read["extra"] == meta["extra"]


def test_fingerprint_tracks_base_weights_only():
    model = tiny_model("bert")
    fp = fingerprint(model)
    assert fingerprint(tiny_model("bert", seed=0)) == fp
    assert fingerprint(tiny_model("bert", seed=1)) != fp
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # the head is the task's, not the base's
    perturb(add_adapter(model, "t"))
    assert fingerprint(model) == fp
    assert fingerprint(model.to(torch.bfloat16)) == fp  # same checkpoint in another dtype
    with torch.no_grad():
        model.bert.embeddings.LayerNorm.weight.add_(0.5)
    assert fingerprint(model) != fp


# ---- saving is atomic and never overwrites by accident ---------------------------------------


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    model = tiny_model("bert")
    aset = add_adapter(model, "task", AdapterConfig(size=4))
    target = save_adapter(model, "task", tmp_path / "a")
    first = (target / WEIGHTS).read_bytes()
    perturb(aset)
    with pytest.raises(AdapterFileError, match="already exists.*overwrite=True"):
        save_adapter(model, "task", target)
    assert (target / WEIGHTS).read_bytes() == first
    save_adapter(model, "task", target, overwrite=True)
    assert (target / WEIGHTS).read_bytes() != first
    twin = tiny_model("bert")
    load_adapter(twin, target)
    torch.testing.assert_close(hidden(twin), hidden(model), rtol=0, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp or old folders left


def test_crash_during_save_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("bert")
    add_adapter(model, "task", AdapterConfig(size=4))

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(aio, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_adapter(model, "task", tmp_path / "a")
    assert not (tmp_path / "a").exists()
    assert list(tmp_path.iterdir()) == []


def test_crash_during_overwrite_keeps_the_old_folder(tmp_path, monkeypatch):
    model = tiny_model("bert")
    add_adapter(model, "task", AdapterConfig(size=4))
    save_adapter(model, "task", tmp_path / "a")
    old = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(aio, "save_file", crash)
    with pytest.raises(RuntimeError):
        save_adapter(model, "task", tmp_path / "a", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == old
    assert leftovers(tmp_path) == []


def test_save_unknown_adapter(tmp_path):
    model = tiny_model("bert")
    with pytest.raises(ConfigError, match="no adapter named 'x'"):
        save_adapter(model, "x", tmp_path / "a")
    assert not (tmp_path / "a").exists()


# ---- every bad file is an AdapterFileError, and leaves the model as it was -------------------


@pytest.fixture
def saved(tmp_path):
    """A trained-looking bert adapter of size 8 in tmp_path/'good'."""
    model = tiny_model("bert")
    perturb(add_adapter(model, "task", AdapterConfig.preset("houlsby", size=8)))
    return save_adapter(model, "task", tmp_path / "good")


@pytest.fixture
def target():
    """A bert twin that already carries another adapter, so 'unchanged' is not trivially []."""
    model = tiny_model("bert")
    perturb(add_adapter(model, "other", AdapterConfig(size=4)))
    return model


def copy_of(saved, tmp_path, name="bad"):
    dst = tmp_path / name
    shutil.copytree(saved, dst)
    return dst


def edit_json(folder, change):
    meta = json.loads((folder / CONFIG).read_text())
    change(meta)
    (folder / CONFIG).write_text(json.dumps(meta))


def assert_load_fails(model, folder, *patterns, **kwargs):
    before = [(r["name"], r["active"]) for r in list_adapters(model)]
    out = hidden(model)
    with pytest.raises(AdapterFileError) as err:
        load_adapter(model, folder, **kwargs)
    message = str(err.value)
    for pattern in patterns:
        assert pattern in message, message
    assert "\n" not in message  # one line, as the CLI prints it
    assert [(r["name"], r["active"]) for r in list_adapters(model)] == before
    assert not any(k.startswith("adaptune.sets.task.") for k in model.state_dict())
    assert torch.equal(hidden(model), out)
    return message


def test_good_file_loads_onto_the_target(saved, target):
    assert load_adapter(target, saved) == "task"  # the baseline the failures below depart from


def test_folder_missing(target, tmp_path):
    assert_load_fails(target, tmp_path / "nope", "nope", "is not an adapter folder")


def test_path_is_a_file(target, saved):
    assert_load_fails(target, saved / WEIGHTS, "is not an adapter folder")


@pytest.mark.parametrize("missing", [WEIGHTS, CONFIG])
def test_file_missing(target, saved, tmp_path, missing):
    bad = copy_of(saved, tmp_path)
    (bad / missing).unlink()
    assert_load_fails(target, bad, f"missing {missing}")


def test_config_not_json(target, saved, tmp_path):
    bad = copy_of(saved, tmp_path)
    text = (bad / CONFIG).read_text()
    (bad / CONFIG).write_text(text[: len(text) // 2])
    assert_load_fails(target, bad, CONFIG, "not valid JSON")


def test_config_not_an_object(target, saved, tmp_path):
    bad = copy_of(saved, tmp_path)
    (bad / CONFIG).write_text("[1, 2]")
    assert_load_fails(target, bad, "JSON object")


def test_unknown_top_level_field(target, saved, tmp_path):
    bad = copy_of(saved, tmp_path)
    edit_json(bad, lambda m: m.update(lora_rank=8))
    assert_load_fails(target, bad, "unknown field", "lora_rank")


def test_unknown_config_field(target, saved, tmp_path):
    bad = copy_of(saved, tmp_path)
    edit_json(bad, lambda m: m["config"].update(bottleneck=8))
    assert_load_fails(target, bad, CONFIG, "unknown adapter config field", "bottleneck")


@pytest.mark.parametrize(
    "field,value", [("size", 0), ("slots", ["mlp"]), ("mode", "serial"), ("layers", ["0"]), ("train_head", "false")]
)
def test_invalid_config_value(target, saved, tmp_path, field, value):
    bad = copy_of(saved, tmp_path)
    edit_json(bad, lambda m: m["config"].update({field: value}))
    assert_load_fails(target, bad, CONFIG, field)


def test_config_section_missing(target, saved, tmp_path):
    bad = copy_of(saved, tmp_path)
    edit_json(bad, lambda m: m.pop("config"))
    assert_load_fails(target, bad, CONFIG, "JSON object")


def test_other_format(target, saved, tmp_path):
    bad = copy_of(saved, tmp_path)
    edit_json(bad, lambda m: m.update(format=2))
    assert_load_fails(target, bad, "format 2")


def test_truncated_weights(target, saved, tmp_path):
    bad = copy_of(saved, tmp_path)
    data = (bad / WEIGHTS).read_bytes()
    (bad / WEIGHTS).write_bytes(data[: len(data) // 2])
    assert_load_fails(target, bad, WEIGHTS, "truncated or damaged")


@pytest.mark.parametrize("where", ["length", "header"])
def test_corrupted_weights_header(target, saved, tmp_path, where):
    bad = copy_of(saved, tmp_path)
    data = bytearray((bad / WEIGHTS).read_bytes())
    span = slice(0, 8) if where == "length" else slice(8, 40)  # u64 header length, then JSON header
    data[span] = b"\xff" * (span.stop - span.start)
    (bad / WEIGHTS).write_bytes(bytes(data))
    assert_load_fails(target, bad, WEIGHTS, "truncated or damaged")


def test_weights_file_is_garbage(target, saved, tmp_path):
    bad = copy_of(saved, tmp_path)
    (bad / WEIGHTS).write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy().tobytes()
    )
    assert_load_fails(target, bad, WEIGHTS)


def test_corrupted_tensor_bytes(target, saved, tmp_path):
    """Flipped data bytes under an intact header: only the checksum in the JSON can tell."""
    bad = copy_of(saved, tmp_path)
    data = bytearray((bad / WEIGHTS).read_bytes())
    data[-64:] = b"\x7f" * 64
    (bad / WEIGHTS).write_bytes(bytes(data))
    assert_load_fails(target, bad, WEIGHTS, "checksum", "corrupted")


def rewrite_tensors(folder, change):
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})


def test_missing_tensor(target, saved, tmp_path):
    bad = copy_of(saved, tmp_path)
    rewrite_tensors(bad, lambda t: (t.pop("adapters.2.ffn.up.bias"), t.pop("head.classifier.weight")))
    msg = assert_load_fails(target, bad, "missing", "adapters.2.ffn.up.bias", "head.classifier.weight")
    assert "unexpected" not in msg


def test_unexpected_tensor(target, saved, tmp_path):
    bad = copy_of(saved, tmp_path)
    rewrite_tensors(bad, lambda t: t.update({"adapters.9.ffn.up.bias": torch.zeros(32), "lora.A": torch.zeros(2)}))
    msg = assert_load_fails(target, bad, "unexpected", "adapters.9.ffn.up.bias", "lora.A")
    assert "missing" not in msg


def test_many_missing_tensors_are_summarised(target, saved, tmp_path):
    bad = copy_of(saved, tmp_path)
    rewrite_tensors(bad, lambda t: [t.pop(k) for k in [k for k in t if k.startswith("adapters.0.")]])
    assert_load_fails(target, bad, "missing", "adapters.0.attn.down.bias", "(+3 more)")


def test_shape_mismatch_from_edited_config(target, saved, tmp_path):
    bad = copy_of(saved, tmp_path)
    edit_json(bad, lambda m: m["config"].update(size=16))
    assert_load_fails(target, bad, "shape mismatch", "adapters.0.attn.down.weight (8, 32) vs (16, 32)")


def test_a_head_of_another_width_loads_at_its_own_width(tmp_path):
    """Tasks with different label counts share one base: the head copy takes the saved width."""
    model = tiny_model("bert")  # 2 labels
    perturb(add_adapter(model, "task", AdapterConfig.preset("houlsby", size=8)))
    with torch.no_grad():
        expected = model(**tiny_batch()).logits
    save_adapter(model, "task", tmp_path / "task")
    twin = tiny_model("bert", num_labels=3)
    assert fingerprint(twin) == fingerprint(tiny_model("bert"))  # same backbone: only the head differs
    load_adapter(twin, tmp_path / "task")
    with torch.no_grad():
        got = twin(**tiny_batch()).logits
        assert got.shape == expected.shape == (expected.shape[0], 2)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        set_active(twin, None)
        assert twin(**tiny_batch()).logits.shape[-1] == 3  # the base keeps its own head
        set_active(twin, ["task"] + [None] * (expected.shape[0] - 1))
        mixed = twin(**tiny_batch()).logits  # rows padded with NaN to the widest head
    torch.testing.assert_close(mixed[0, :2], expected[0], rtol=0, atol=1e-6)
    assert torch.isnan(mixed[0, 2])


def test_a_head_of_another_input_width_is_refused(target, saved, tmp_path):
    bad = copy_of(saved, tmp_path)
    rewrite_tensors(bad, lambda t: t.update({"head.classifier.weight": torch.zeros(2, 16)}))
    assert_load_fails(target, bad, "shape mismatch", "head.classifier.weight (2, 16) vs (2, 32)")


def test_different_base_weights(saved):
    other = tiny_model("bert", seed=1)
    assert_load_fails(other, saved, "different base weights", "fingerprint", "check_base=False")
    # Deliberately skipping the check is possible, and then the file does load.
    assert load_adapter(other, saved, check_base=False) == "task"


def _bert(**overrides):
    torch.manual_seed(0)
    cfg = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, vocab_size=100)
    cfg.update(overrides)
    return T.AutoModelForSequenceClassification.from_config(T.BertConfig(**cfg, num_labels=2)).eval()


@pytest.mark.parametrize(
    "make,key",
    [
        (lambda: tiny_model("roberta"), "model_type='bert'"),
        (lambda: _bert(hidden_size=48), "hidden_size=32"),
        (lambda: _bert(num_hidden_layers=2), "num_layers=4"),
    ],
    ids=["family", "hidden-size", "depth"],
)
def test_different_base_model(saved, make, key):
    assert_load_fails(make(), saved, "was made for a base model with", key)


def test_base_section_missing(target, saved, tmp_path):
    bad = copy_of(saved, tmp_path)
    edit_json(bad, lambda m: m.pop("base"))
    assert_load_fails(target, bad, "was made for a base model with model_type=None")
