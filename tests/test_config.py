"""AdapterConfig: presets, JSON round trip, validation (src/adaptune/core/config.py)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from adaptune import PRESETS, AdapterConfig, AdaptuneError, ConfigError


# ---- presets ---------------------------------------------------------------------------------


def test_presets_place_adapters_as_in_the_papers():
    houlsby = AdapterConfig.preset("houlsby")
    assert houlsby.slots == ("attn", "ffn") and houlsby.mode == "sequential" and houlsby.scale == 1.0
    pfeiffer = AdapterConfig.preset("pfeiffer")
    assert pfeiffer.slots == ("ffn",) and pfeiffer.mode == "sequential" and pfeiffer.scale == 1.0
    parallel = AdapterConfig.preset("parallel")
    assert parallel.slots == ("ffn",) and parallel.mode == "parallel" and parallel.scale == 4.0
    assert set(PRESETS) == {"houlsby", "pfeiffer", "houlsby-ffn", "parallel"}
    with pytest.raises(ConfigError, match="norm_before is for sequential"):
        AdapterConfig.preset("parallel", norm_before=True)


def test_default_is_houlsby_setup():
    # The paper's setup: both slots, near-identity init, layer norms and head trained per task.
    cfg = AdapterConfig()
    assert cfg == AdapterConfig.preset("houlsby")
    assert cfg.init_std == 1e-2 and cfg.nonlinearity == "gelu" and cfg.layers is None
    assert cfg.train_layer_norms and cfg.train_head


def test_preset_overrides_do_not_mutate_the_shared_preset():
    before = PRESETS["pfeiffer"]
    cfg = AdapterConfig.preset("pfeiffer", size=8, layers=[0, -1])
    assert cfg.size == 8 and cfg.layers == (0, -1) and cfg.slots == ("ffn",)
    assert PRESETS["pfeiffer"] is before and PRESETS["pfeiffer"].size == 64


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown adapter preset 'lora'") as err:
        AdapterConfig.preset("lora")
    for name in PRESETS:
        assert name in str(err.value)


def test_unknown_override_field_is_an_error():
    with pytest.raises(TypeError):
        AdapterConfig.preset("houlsby", bottleneck=8)


def test_config_is_frozen_and_hashable():
    cfg = AdapterConfig(slots=["ffn"], layers=[1, 2])
    assert cfg.slots == ("ffn",) and cfg.layers == (1, 2)  # lists from JSON become tuples
    assert hash(cfg) == hash(AdapterConfig(slots=("ffn",), layers=(1, 2)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.size = 8


# ---- JSON ------------------------------------------------------------------------------------

ROUND_TRIP = [
    AdapterConfig(),
    AdapterConfig.preset("pfeiffer", size=8),
    AdapterConfig.preset("parallel", init_std=0.0),
    AdapterConfig(
        size=3,
        slots=("attn",),
        nonlinearity="relu",
        init_std=1e-3,
        scale=0.5,
        layers=(0, -1),
        train_layer_norms=False,
        train_head=False,
    ),
]


@pytest.mark.parametrize("cfg", ROUND_TRIP, ids=lambda c: f"{c.mode}-{c.slots}-{c.size}")
def test_json_round_trip(cfg):
    text = cfg.to_json()
    data = json.loads(text)
    # Plain JSON types only: lists, not tuples; every field present.
    assert set(data) == {f.name for f in dataclasses.fields(AdapterConfig)}
    assert isinstance(data["slots"], list)
    assert data["layers"] is None or isinstance(data["layers"], list)
    back = AdapterConfig.from_json(text)
    assert back == cfg
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg


def test_from_dict_fills_defaults_for_missing_fields():
    assert AdapterConfig.from_dict({"size": 8}) == AdapterConfig(size=8)


def test_from_dict_rejects_unknown_field():
    with pytest.raises(ConfigError, match="unknown adapter config field.*'bottleneck_size'"):
        AdapterConfig.from_dict({"size": 8, "bottleneck_size": 8})


@pytest.mark.parametrize("data", [[1, 2], "houlsby", None, 3])
def test_from_dict_rejects_non_objects(data):
    with pytest.raises(ConfigError, match="JSON object"):
        AdapterConfig.from_dict(data)


def test_from_json_rejects_invalid_json():
    with pytest.raises(ConfigError, match="not valid JSON"):
        AdapterConfig.from_json('{"size": 8,')


# ---- validation ------------------------------------------------------------------------------

BAD = [
    ({"size": 0}, "size"),
    ({"size": -4}, "size"),
    ({"size": 8.0}, "size"),
    ({"size": True}, "size"),
    ({"size": "8"}, "size"),
    ({"slots": ()}, "slots"),
    ({"slots": ("mlp",)}, "slots"),
    ({"slots": ("ffn", "ffn")}, "slots"),
    ({"mode": "serial"}, "mode"),
    ({"nonlinearity": "swish"}, "nonlinearity"),
    ({"init_std": -0.1}, "init_std"),
    ({"init_std": math.inf}, "init_std"),
    ({"init_std": math.nan}, "init_std"),
    ({"init_std": None}, "init_std"),
    ({"scale": math.inf}, "scale"),
    ({"scale": math.nan}, "scale"),
    ({"scale": "4"}, "scale"),
    ({"layers": ()}, "layers"),
    ({"layers": ("0",)}, "layers"),
    ({"layers": (1.5,)}, "layers"),
    ({"layers": 3}, "layers"),
    ({"train_head": "false"}, "train_head"),
    ({"train_layer_norms": None}, "train_layer_norms"),
    ({"train_embedding_norm": "false"}, "train_embedding_norm"),
]


@pytest.mark.parametrize("kwargs,field", BAD, ids=[f"{k}={v!r}" for (kw, _) in BAD for k, v in kw.items()])
def test_invalid_values_raise_config_error_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        AdapterConfig(**kwargs)
    # The same value arriving from a JSON file is caught the same way.
    with pytest.raises(ConfigError, match=field):
        AdapterConfig.from_dict(kwargs)


def test_config_error_is_a_value_error_and_an_adaptune_error():
    with pytest.raises(ValueError):
        AdapterConfig(size=0)
    with pytest.raises(AdaptuneError):
        AdapterConfig(size=0)


def test_every_nonlinearity_and_mode_is_accepted():
    from adaptune.core.config import MODES, NONLINEARITIES

    for act in NONLINEARITIES:
        assert AdapterConfig(nonlinearity=act).nonlinearity == act
    for mode in MODES:
        assert AdapterConfig(mode=mode).mode == mode


# ---- layers ----------------------------------------------------------------------------------


def test_resolve_layers():
    assert AdapterConfig().resolve_layers(4) == [0, 1, 2, 3]
    assert AdapterConfig(layers=(-1, 0)).resolve_layers(4) == [0, 3]
    assert AdapterConfig(layers=(3, -1, 1)).resolve_layers(4) == [1, 3]  # duplicates collapse
    assert AdapterConfig(layers=(-4,)).resolve_layers(4) == [0]


@pytest.mark.parametrize("index", [4, 7, -5])
def test_layer_index_out_of_range(index):
    cfg = AdapterConfig(layers=(0, index))
    with pytest.raises(ConfigError, match=rf"layer index {index} is out of range for a model with 4 layers"):
        cfg.resolve_layers(4)
    with pytest.raises(ConfigError):
        cfg.num_adapters(4)


def test_num_adapters_and_params_per_adapter():
    assert AdapterConfig.preset("houlsby").num_adapters(4) == 8
    assert AdapterConfig.preset("pfeiffer").num_adapters(4) == 4
    assert AdapterConfig.preset("houlsby", layers=(0, -1)).num_adapters(12) == 4
    for m, d in [(1, 1), (8, 32), (64, 768)]:
        assert AdapterConfig(size=m).params_per_adapter(d) == 2 * m * d + d + m
