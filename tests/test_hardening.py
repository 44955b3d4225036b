"""The defects of the hardening audit (issue 21), each with a test that failed before its fix.

Numerics (C kernels under another default dtype or device, decoder padding, NaN in adapter files),
files and state (the folder swap, checkpoints that do not fit), the kernels' build folder and
notice, process-wide settings, long CSV fields, ``info`` checks, device and model messages, and an
independent reference of one adapted layer for BERT and LLaMA.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    H,
    fake_compiler,
    kill_tiny_run,
    one_error_line,
    save_tiny_causal_lm,
    tiny_model,
    tiny_tokenizer,
    train_argv,
    write_reviews_csv,
)
from safetensors.torch import load_file, save_file

import adaptune.training.checkpoint as ckpt
import adaptune.core.atomic as atomic
import adaptune.core.io as aio
from adaptune import AdapterConfig, Bottleneck, add_adapter
from adaptune.cpu import adapter_gemm
from adaptune.cpu import heap
from adaptune.cpu import kernels
from adaptune.cpu import native
from adaptune.core.inject import get_container
from adaptune.cli.parser import main
from adaptune.errors import AdapterFileError, TrainingError
from adaptune.models.loading import load_classifier, load_tokenizer

needs_kernel = pytest.mark.skipif(not adapter_gemm.available(), reason="no C compiler or no AVX2 CPU here")


# ---- 1. the C kernels allocate with their operands' dtype and device, not torch's defaults ----------


@needs_kernel
def test_adapter_kernel_under_a_float64_default_dtype(one_thread):
    """An fp32 adapter's no-grad add (the fused C path) after set_default_dtype(float64)."""
    torch.manual_seed(0)
    adapter = Bottleneck(64, AdapterConfig(size=16, init_std=0.2))
    h = torch.randn(50, 64)
    with torch.no_grad():
        want = h + adapter(h)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad():
            got = adapter.add_to(h)
            fused = adapter_gemm.adapter_forward(
                h, h, adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias, 1.0
            )
            grads = adapter_gemm.adapter_backward(
                h, torch.randn(50, 16, dtype=torch.float32), adapter.down.weight, adapter.up.weight, 1.0, True, False
            )
    finally:
        torch.set_default_dtype(previous)
    assert got.dtype == torch.float32 and fused[1].dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(t.dtype == torch.float32 for t in grads)


@needs_kernel
def test_kernels_under_the_meta_default_device(one_thread):
    """With another default device, CPU operands still get CPU outputs (never a foreign pointer)."""
    x, w, b = torch.randn(40, 32), torch.randn(16, 32), torch.randn(16)
    want = torch.addmm(b, x, w.t())
    q, k, v = (torch.randn(1, 2, 20, 16) for _ in range(3))
    ones = torch.ones(20000)
    torch.set_default_device("meta")
    try:
        got = adapter_gemm.linear(x, w, b)
        dropped = kernels.lean_dropout(ones, 0.5)
        attn, _ = kernels.lean_sdpa_attention(torch.nn.Module().train(), q, k, v, None, dropout=0.1, is_causal=False)
    finally:
        torch.set_default_device(None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert dropped.device.type == "cpu" and set(dropped.unique().tolist()) <= {0.0, 2.0}
    assert attn.device.type == "cpu" and torch.isfinite(attn).all()


# ---- 2. a decoder classifier pads with its tokenizer's pad id -----------------------------------------


@pytest.fixture(scope="module")
def llama_list_eos(tmp_path_factory):
    """A tiny LLaMA whose config has no pad id and a list of end-of-sequence ids (as newer LLaMA
    configs do), and whose tokenizer pads with its own pad token (not the eos)."""
    folder = save_tiny_causal_lm(tmp_path_factory.mktemp("llama-eos"), "llama")
    cfg = json.loads((folder / "config.json").read_text())
    tok = tiny_tokenizer()
    cfg.update(pad_token_id=None, eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|im_start|>")])
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_decoder_classifier_predictions_do_not_depend_on_padding(llama_list_eos):
    tok = load_tokenizer(str(llama_list_eos))
    assert tok.pad_token_id != tok.eos_token_id
    torch.manual_seed(0)
    model = load_classifier(str(llama_list_eos), 3).eval()
    assert model.config.pad_token_id == tok.pad_token_id  # an int, the tokenizer's
    short, long = "the sky is blue.", "what colour is the grass? tell me the colour of the sea please"
    with torch.no_grad():
        alone = model(**tok([short], return_tensors="pt")).logits
        padded = model(**tok([short, long], return_tensors="pt", padding=True)).logits[:1]
    torch.testing.assert_close(alone, padded, rtol=1e-4, atol=1e-5)


# ---- 4. an adapter file with NaN or infinite values is refused -----------------------------------------


def test_adapter_with_nan_values_is_refused(tmp_path):
    model = tiny_model("bert")
    add_adapter(model, "t", AdapterConfig(size=8))
    with torch.no_grad():
        get_container(model).sets["t"].adapters["0"]["attn"].up.weight[0, 0] = float("nan")
    aio.save_adapter(model, "t", tmp_path / "a")
    fresh = tiny_model("bert")
    with pytest.raises(AdapterFileError, match="NaN or infinite values in adapters.0.attn.up.weight"):
        aio.load_adapter(fresh, tmp_path / "a")
    assert get_container(fresh) is None or "t" not in get_container(fresh).sets  # nothing half-loaded


# ---- 5. the folder swap: never nothing at the path, never a silent restart -----------------------------


def _write(folder: Path, text: str):
    return lambda tmp: (tmp / "f.txt").write_text(text)


def test_swap_is_one_atomic_exchange_where_available(tmp_path, monkeypatch):
    target = tmp_path / "ck"
    aio.atomic_write_dir(target, _write(target, "old"), overwrite=False)
    calls = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append((a, b)), real(a, b)))
    aio.atomic_write_dir(target, _write(target, "new"), overwrite=True)
    assert (target / "f.txt").read_text() == "new"
    if sys.platform.startswith("linux"):
        assert calls == []  # one renameat2 exchange, no pair of renames with a gap between them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # nothing left beside it


def test_a_crash_between_the_two_renames_is_recovered(tmp_path, monkeypatch):
    """Where there is no atomic exchange: a crash after the first rename leaves the old folder aside;
    the next write, or loading a checkpoint, puts it back."""
    target = tmp_path / "ck"
    aio.atomic_write_dir(target, _write(target, "old"), overwrite=False)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real, count = os.replace, []

    def crash_on_second(a, b):
        count.append(1)
        if len(count) == 2:
            raise SystemExit("killed")
        return real(a, b)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(SystemExit):
        aio.atomic_write_dir(target, _write(target, "new"), overwrite=True)
    monkeypatch.setattr(os, "replace", real)
    assert not target.exists()  # the crash's state: nothing at the path, the old folder aside
    assert aio.recover_swap(target) and (target / "f.txt").read_text() == "old"


def test_resume_recovers_a_checkpoint_left_aside_and_says_when_there_is_none(tiny_model_dir, tmp_path, capsys):
    data = write_reviews_csv(tmp_path / "d.csv", n=40)
    run = tmp_path / "run"
    kill_tiny_run(run, tiny_model_dir, data, at_step=5)  # its checkpoint holds step 4
    (run / "checkpoint").rename(run / ".checkpoint.old-12345")  # as a crash in the middle of a swap leaves it
    assert main(["train", "-o", str(run), "--resume"]) == 0
    said = capsys.readouterr()
    assert "at step 4/" in said.out + said.err
    assert not (run / ".checkpoint.old-12345").exists()
    assert not any("step 0" in n for n in json.loads((run / "metrics.json").read_text())["notes"])
    # a run that stopped before its first checkpoint says that it starts again
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(run / "config.json", fresh / "config.json")
    assert main(["train", "-o", str(fresh), "--resume", "--quiet"]) == 0
    notes = json.loads((fresh / "metrics.json").read_text())["notes"]
    assert any("no checkpoint" in n and "step 0" in n for n in notes), notes


# ---- 6. a checkpoint that does not fit is refused before anything is restored --------------------------


def _checkpointed(tmp_path):
    model = tiny_model("bert")
    add_adapter(model, "t", AdapterConfig(size=8))
    from adaptune import train_strategy

    train_strategy(model, "adapters")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt.save_checkpoint(tmp_path / "ck", model, opt, sched, {"step": 3})
    return model, opt, sched


def _edit_state(folder: Path, edit) -> None:
    tensors = load_file(str(folder / ckpt.STATE))
    edit(tensors)
    save_file(tensors, str(folder / ckpt.STATE))


def test_checkpoint_missing_a_trained_parameter(tmp_path):
    model, opt, sched = _checkpointed(tmp_path)
    key = next(k for k in load_file(str(tmp_path / "ck" / ckpt.STATE)) if k.startswith("param."))
    _edit_state(tmp_path / "ck", lambda t: t.pop(key))
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(TrainingError, match="lacks trained parameter"):
        ckpt.load_checkpoint(tmp_path / "ck", model, opt, sched)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_checkpoint_with_a_mis_shaped_parameter(tmp_path):
    model, opt, sched = _checkpointed(tmp_path)
    key = next(
        k for k, v in load_file(str(tmp_path / "ck" / ckpt.STATE)).items() if k.startswith("param.") and v.dim() == 1
    )
    _edit_state(tmp_path / "ck", lambda t: t.__setitem__(key, t[key][:1].contiguous()))  # would broadcast
    with pytest.raises(TrainingError, match="of shape"):
        ckpt.load_checkpoint(tmp_path / "ck", model, opt, sched)


def test_checkpoint_of_another_number_of_gpus(tmp_path, monkeypatch):
    model, opt, sched = _checkpointed(tmp_path)
    meta = json.loads((tmp_path / "ck" / ckpt.META).read_text())
    meta["cuda_rng"] = True
    (tmp_path / "ck" / ckpt.META).write_text(json.dumps(meta))
    _edit_state(tmp_path / "ck", lambda t: t.__setitem__("rng.cuda.0", torch.get_rng_state()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(TrainingError, match="1 GPU.*sees 2"):
        ckpt.load_checkpoint(tmp_path / "ck", model, opt, sched)


# ---- 7, 8. the kernels' folder is private; the build is announced, bounded, and can be done ahead ------


@pytest.fixture
def fresh_native(monkeypatch):
    """native.library() computed anew in the test, and the real one back after it."""
    native.library.cache_clear()
    yield
    monkeypatch.undo()
    native.library.cache_clear()


@needs_kernel
def test_kernels_are_not_loaded_from_a_folder_others_can_write(tmp_path, monkeypatch, fresh_native):
    built = list(native.kernel_dir().glob("adaptune_native-*.so"))  # built there by needs_kernel
    assert built
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("ADAPTUNE_CACHE", str(blocker / "cache"))  # cannot be created: falls back to the temp dir
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "shared"))
    planted = tmp_path / "shared" / f"adaptune-{os.getuid()}" / "kernels"
    planted.mkdir(parents=True)
    for so in built:  # a library under the expected name, in a folder anyone may write
        shutil.copy(so, planted / so.name)
    os.chmod(planted, 0o777)
    assert native.library() is None
    assert "not safe" in native.why_not()


@needs_kernel
def test_kernels_fall_back_to_a_private_temp_folder(tmp_path, monkeypatch, fresh_native, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("ADAPTUNE_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with caplog.at_level("WARNING", logger="adaptune.cpu.native"):
        lib = native.library()
    assert lib is not None and Path(lib.path).parent == tmp_path / "tmp" / f"adaptune-{os.getuid()}" / "kernels"
    assert (Path(lib.path).parent.stat().st_mode & 0o077) == 0
    assert any("compiling" in r.getMessage() and "build-kernels" in r.getMessage() for r in caplog.records)


def test_kernel_build_is_bounded(tmp_path, monkeypatch, fresh_native):
    """A compiler that hangs costs at most BUILD_SECONDS in all, then torch runs."""
    import time

    monkeypatch.setenv("CC", str(fake_compiler(tmp_path, "sleep 30")))
    monkeypatch.setenv("ADAPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "BUILD_SECONDS", 2)
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("no AVX2 CPU: the kernels are not tried at all")
    start = time.monotonic()
    assert native.library() is None
    assert time.monotonic() - start < 10 and "not built" in native.why_not()


@needs_kernel
def test_build_kernels_command(capsys):
    assert main(["build-kernels"]) == 0
    out = capsys.readouterr().out
    assert "built and checked against torch" in out and ".so" in out


def test_build_kernels_command_without_a_compiler(monkeypatch, capsys, fresh_native, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ADAPTUNE_CACHE", str(tmp_path / "cache"))
    assert main(["build-kernels"]) == 1
    err = capsys.readouterr().err
    assert "not available here" in err and "Traceback" not in err


# ---- 9. library calls leave the process's malloc settings alone ----------------------------------------


class _RecordingLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, *args):
        self.calls.append(("mallopt", args))
        return 1

    def malloc_trim(self, *args):
        self.calls.append(("malloc_trim", args))
        return 1


def test_library_calls_do_not_change_malloc_settings(tiny_model_dir, tmp_path, monkeypatch):
    from adaptune.predict import Predictor
    from adaptune.training.train import TrainConfig, train

    libc = _RecordingLibc()
    monkeypatch.setattr(heap, "_glibc", lambda: libc)
    data = write_reviews_csv(tmp_path / "d.csv", n=24)
    cfg = TrainConfig(
        model=str(tiny_model_dir),
        data=str(data),
        text_column="review",
        label_column="score",
        epochs=1,
        batch_size=8,
        max_length=16,
        device="cpu",
    )
    train(cfg, tmp_path / "run", quiet=True)
    Predictor(tmp_path / "run").predict(["great and tasty"])
    assert libc.calls == []
    with heap.keep_freed_memory():  # the explicit opt-in still works
        pass
    assert libc.calls and libc.calls[0][0] == "mallopt"


# ---- 10. long CSV fields are read, and csv's process-wide limit is left as it was ----------------------


def test_csv_with_a_400_kb_document(tmp_path):
    from adaptune.data.loading import load_task_data

    path = tmp_path / "long.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerow(["word " * 80_000, "a"])  # 400 KB
        for i in range(30):
            w.writerow([f"short text {i}", "ab"[i % 2]])
    limit = csv.field_size_limit()
    data = load_task_data(str(path), text_column="text", label_column="label")
    assert max(len(t) for t in data.train.texts + data.dev.texts) == 400_000
    assert csv.field_size_limit() == limit


# ---- 11. info checks the tensors against the config ----------------------------------------------------


@pytest.fixture
def adapter_dir(tmp_path):
    model = tiny_model("bert")
    add_adapter(model, "t", AdapterConfig(size=8))
    return aio.save_adapter(model, "t", tmp_path / "a")


@pytest.mark.parametrize("field,value", [("size", 16), ("hidden_size", 48)])
def test_info_refuses_an_adapter_whose_config_disagrees_with_its_tensors(adapter_dir, capsys, field, value):
    meta = json.loads((adapter_dir / aio.CONFIG).read_text())
    (meta["config"] if field == "size" else meta["base"])[field] = value
    (adapter_dir / aio.CONFIG).write_text(json.dumps(meta))
    assert main(["info", str(adapter_dir)]) == 2
    one_error_line(capsys, "shape", "edited")


def test_info_without_a_hidden_size_in_the_base_identity(adapter_dir, capsys):
    """A custom ArchSpec's config may have no hidden size: info takes d from the tensors."""
    meta = json.loads((adapter_dir / aio.CONFIG).read_text())
    meta["base"]["hidden_size"] = None
    (adapter_dir / aio.CONFIG).write_text(json.dumps(meta))
    assert main(["info", str(adapter_dir)]) == 0
    out = capsys.readouterr().out
    assert f"2·8·{H} + {H} + 8" in out and "ok]" in out


# ---- 12. devices and model names in our words ----------------------------------------------------------


@pytest.mark.parametrize(
    "device,text", [("tpu9", "not a device name"), ("cuda:7", "cpu"), ("mps", "not available here")]
)
def test_unknown_or_absent_device(tiny_model_dir, tmp_path, capsys, device, text):
    data = write_reviews_csv(tmp_path / "d.csv", n=24)
    assert main(train_argv(tiny_model_dir, data, tmp_path / "r", "--device", device)) == 2
    one_error_line(capsys, repr(device), text)
    assert not (tmp_path / "r").exists()


def test_missing_model_folder_in_our_words(tmp_path, capsys):
    data = write_reviews_csv(tmp_path / "d.csv", n=24)
    missing = tmp_path / "no" / "such" / "model"
    assert main(train_argv(missing, data, tmp_path / "r")) == 2
    line = one_error_line(capsys, "no model folder", str(missing))
    assert "Repo id" not in line
    assert not (tmp_path / "r").exists()


# ---- 13. an independent reference of one adapted layer -------------------------------------------------


def _adapter(aset, layer: int, slot: str, z: torch.Tensor) -> torch.Tensor:
    """The bottleneck by hand: up(gelu(down(z))) times the scale."""
    b = aset.adapters[str(layer)][slot]
    return b.scale * (torch.nn.functional.gelu(z @ b.down.weight.T + b.down.bias) @ b.up.weight.T + b.up.bias)


def _norm(aset, suffix: str):
    (key,) = [k for k, p in aset.norm_paths.items() if p.endswith(suffix)]
    return aset.norms[key]


def _adapted(family: str, head: str = "seq-cls"):
    """A tiny model with a Houlsby adapter far from its init, and its hidden states on random ids."""
    model = tiny_model(family, head=head)
    add_adapter(model, "t", AdapterConfig(size=8))
    aset = get_container(model).sets["t"]
    _randomise(aset)
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = model.base_model(input_ids=ids, output_hidden_states=True).hidden_states
    return model, aset, states


def _randomise(aset, seed: int = 1) -> None:
    """Adapters and norm copies far from their init, so a misplaced one cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*aset.adapters.parameters(), *aset.norms.parameters()]:
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def test_bert_layer_with_adapters_equals_a_hand_written_reference():
    """Houlsby placement (Figure 2): each adapter on the sub-layer's output projection, before the
    residual add and the layer norm (the task's own copy)."""
    model, aset, states = _adapted("bert")
    x, layer, heads = states[0], model.bert.encoder.layer[0], model.config.num_attention_heads
    att = layer.attention.self

    def split(t):  # (B, T, d) -> (B, heads, T, dh)
        return t.view(*t.shape[:2], heads, -1).transpose(1, 2)

    with torch.no_grad():
        q, k, v = (split(x @ lin.weight.T + lin.bias) for lin in (att.query, att.key, att.value))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        ctx = (probs @ v).transpose(1, 2).reshape(x.shape)
        o = ctx @ layer.attention.output.dense.weight.T + layer.attention.output.dense.bias
        h1 = _norm(aset, "layer.0.attention.output.LayerNorm")(o + _adapter(aset, 0, "attn", o) + x)
        f = torch.nn.functional.gelu(h1 @ layer.intermediate.dense.weight.T + layer.intermediate.dense.bias)
        f = f @ layer.output.dense.weight.T + layer.output.dense.bias
        want = _norm(aset, "layer.0.output.LayerNorm")(f + _adapter(aset, 0, "ffn", f) + h1)
    torch.testing.assert_close(states[1], want, rtol=1e-4, atol=1e-5)


def _rms(norm, x):
    return norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)


def _rope(t, theta: float):
    dh, n = t.shape[-1], t.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh)
    ang = torch.outer(torch.arange(n, dtype=torch.float32), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    half = torch.cat([-t[..., dh // 2 :], t[..., : dh // 2]], -1)
    return t * cos + half * sin


def test_llama_layer_with_adapters_equals_a_hand_written_reference():
    """Pre-norm decoder: each adapter on o_proj's and down_proj's output, before the residual add."""
    model, aset, states = _adapted("llama", head="causal-lm")
    x, layer, cfg = states[0], model.model.layers[0], model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    att, mlp, theta = layer.self_attn, layer.mlp, cfg.rope_parameters["rope_theta"]

    def split(t, n):
        return t.view(*t.shape[:2], n, -1).transpose(1, 2)

    with torch.no_grad():
        n1 = _rms(_norm(aset, "layers.0.input_layernorm"), x)
        q = _rope(split(n1 @ att.q_proj.weight.T, heads), theta)
        k = _rope(split(n1 @ att.k_proj.weight.T, kv), theta).repeat_interleave(heads // kv, dim=1)
        v = split(n1 @ att.v_proj.weight.T, kv).repeat_interleave(heads // kv, dim=1)
        t = x.shape[1]
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        o = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(x.shape) @ att.o_proj.weight.T
        h = x + o + _adapter(aset, 0, "attn", o)
        n2 = _rms(_norm(aset, "layers.0.post_attention_layernorm"), h)
        f = (
            torch.nn.functional.silu(n2 @ mlp.gate_proj.weight.T) * (n2 @ mlp.up_proj.weight.T)
        ) @ mlp.down_proj.weight.T
        want = h + f + _adapter(aset, 0, "ffn", f)
    torch.testing.assert_close(states[1], want, rtol=1e-4, atol=1e-5)
