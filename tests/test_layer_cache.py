"""Frozen lower layers: dropout off below the cut, and the kept outputs equal recomputing them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from adaptune import AdapterConfig, add_adapter
from adaptune.data.loading import bucket_batches, collate
from adaptune.errors import ConfigError
from adaptune.training.layer_cache import FrozenBelow, find_cut
from adaptune.core.trainable import train_strategy
from adaptune.training.train import TrainConfig, build_model, train

from conftest import V, tiny_model, write_reviews_csv

TOP = AdapterConfig(size=8, layers=(2, 3), train_layer_norms=False)  # adapters in the top 2 of 4 layers


def _examples(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 11, (n,), generator=g).tolist()
    return [
        {"input_ids": torch.randint(3, V, (t,), generator=g).tolist(), "label": i % 2} for i, t in enumerate(lengths)
    ]


def _model(family="bert", config=TOP, strategy="adapters", k=None):
    model = tiny_model(family)
    if strategy == "adapters":
        add_adapter(model, "task", config)
    train_strategy(model, strategy, k=k)
    return model.train()


def _run(model, frozen, examples, epochs=3):
    """Plain SGD steps over bucketed batches (new batches each epoch); losses and whether each step reused."""
    torch.manual_seed(1)  # the same dropout draws above the cut in both runs
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses, reused = [], []
    for epoch in range(epochs):
        for idx in bucket_batches(
            [len(e["input_ids"]) for e in examples], 4, shuffle=True, epoch=epoch, bucket_size=1
        ):
            batch = collate([examples[i] for i in idx], 0)
            labels = batch.pop("labels")
            with frozen.step(idx) as hit:
                loss = nn.functional.cross_entropy(model(**batch).logits, labels)
                loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            reused.append(hit)
    return losses, reused


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_kept_states_train_like_recomputing(family):
    examples = _examples()
    lengths = [len(e["input_ids"]) for e in examples]
    plain, cached = _model(family), _model(family)
    calls = []
    layer0 = cached.base_model.get_submodule(cached.adaptune.spec.layers)[0]
    next(m for m in layer0.modules() if isinstance(m, nn.Linear)).register_forward_hook(lambda *a: calls.append(1))
    ref = FrozenBelow(plain, cache=False, lengths=lengths)
    fast = FrozenBelow(cached, cache=True, lengths=lengths)
    assert fast.cut == 2 and len(fast.store) == 0
    want, plain_hits = _run(plain, ref, examples)
    got, hits = _run(cached, fast, examples)
    per_epoch = len(hits) // 3
    assert not any(plain_hits) and not any(hits[:per_epoch]) and all(hits[per_epoch:])
    assert len(calls) == per_epoch  # layer 0's weights ran in the first epoch only
    assert sorted(fast.store) == list(range(len(examples)))
    assert all(fast.store[i].shape == (lengths[i], 32) for i in fast.store)  # unpadded rows
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert got[per_epoch:] != got[:per_epoch]  # it did train: later epochs see changed adapters
    for (name, a), b in zip(plain.named_parameters(), cached.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_dropout_is_off_below_the_cut_only():
    model = _model()
    frozen = FrozenBelow(model, cache=False, lengths=[5])
    layers = model.base_model.encoder.layer
    model.train()  # as after an evaluation
    with frozen.step([0]):
        assert not model.base_model.embeddings.training
        assert not any(m.training for layer in layers[:2] for m in layer.modules())
        assert all(m.training for layer in layers[2:] for m in layer.modules())
        assert model.base_model.pooler.training and model.dropout.training


def test_cut_of_each_strategy():
    assert find_cut(_model(strategy="top-k", k=1))[0] == 3
    assert find_cut(_model(strategy="full"))[0] == 0
    assert find_cut(_model(strategy="head"))[0] == 4
    cut, what = find_cut(_model(config=AdapterConfig(size=8, layers=(3,))))  # norm copies of every layer train
    assert cut == 0 and "layer-norm copy" in what


def test_kept_states_with_top_k():
    examples = _examples(8)
    lengths = [len(e["input_ids"]) for e in examples]
    plain, cached = _model(strategy="top-k", k=2), _model(strategy="top-k", k=2)
    want, _ = _run(plain, FrozenBelow(plain, cache=False, lengths=lengths), examples, epochs=2)
    got, hits = _run(cached, FrozenBelow(cached, cache=True, lengths=lengths), examples, epochs=2)
    assert hits[-1] and got == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    "config, strategy, message",
    [
        (
            AdapterConfig(size=8, layers=(2, 3)),
            "adapters",
            "--no-train-layer-norms",
        ),  # layer-norm copies of every layer
        (AdapterConfig(size=8, train_layer_norms=False), "adapters", "layer 0"),  # adapters in every layer
        (None, "full", "embeddings"),
        (None, "head", "only the head"),
    ],
)
def test_refuses_when_something_trains_below_the_cut(config, strategy, message):
    model = _model(config=config, strategy=strategy)
    with pytest.raises(ConfigError, match=message):
        FrozenBelow(model, cache=True, lengths=[5])
    FrozenBelow(model, cache=False, lengths=[5])  # dropout off alone is always possible


def test_refuses_past_the_memory_limit():
    with pytest.raises(ConfigError, match="GiB of hidden states"):
        FrozenBelow(_model(), cache=True, lengths=[100] * 10, max_bytes=1000)


def test_train_config_states_the_dropout_option():
    with pytest.raises(ConfigError, match="--no-frozen-dropout"):
        TrainConfig(cache_frozen_layers=True)
    TrainConfig(cache_frozen_layers=True, frozen_dropout=False)


def _cfg(model_dir, data, **kw):
    base = dict(
        model=str(model_dir),
        data=str(data),
        text_column="review",
        label_column="score",
        epochs=3,
        batch_size=8,
        max_length=24,
        lr=3e-3,
        device="cpu",
        adapter_layers=(1,),
        train_layer_norms=False,
        frozen_dropout=False,
    )
    return TrainConfig(**{**base, **kw})


def test_training_with_the_cache_equals_training_without(tiny_model_dir, tmp_path):
    data = write_reviews_csv(tmp_path / "reviews.csv", n=80)
    with_cache = train(_cfg(tiny_model_dir, data, cache_frozen_layers=True), tmp_path / "cached", quiet=True)
    without = train(_cfg(tiny_model_dir, data), tmp_path / "plain", quiet=True)
    assert any("kept after the first epoch" in n for n in with_cache["notes"])
    for a, b in zip(with_cache["history"], without["history"]):
        assert a["accuracy"] == b["accuracy"]
    got, want = (
        load_file(tmp_path / "cached/adapter/adapter.safetensors"),
        load_file(tmp_path / "plain/adapter/adapter.safetensors"),
    )
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)


def test_train_refuses_the_cache_before_writing_anything(tiny_model_dir, tmp_path):
    data = write_reviews_csv(tmp_path / "reviews.csv", n=40)
    with pytest.raises(ConfigError, match="--no-train-layer-norms"):
        train(
            _cfg(tiny_model_dir, data, cache_frozen_layers=True, train_layer_norms=True), tmp_path / "run", quiet=True
        )
    assert not (tmp_path / "run").exists()


def test_lean_kernels_option_is_applied_to_every_strategy(tiny_model_dir):
    from adaptune.cpu import kernels

    for strategy in ("adapters", "full"):
        model, _ = build_model(TrainConfig(model=str(tiny_model_dir), strategy=strategy, lean_kernels=True), 2)
        dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
        assert dropouts and all(type(m) is kernels.LeanDropout for m in dropouts)
        plain, _ = build_model(TrainConfig(model=str(tiny_model_dir), strategy=strategy, lean_kernels=False), 2)
        assert not any(isinstance(m, kernels.LeanDropout) for m in plain.modules())
