"""Lean dropout, attention and GELU (src/adaptune/cpu/kernels.py, csrc/attention.c, csrc/gelu.c): same results
as the plain math, given the same mask."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_model

import adaptune.cpu.kernels as K
from adaptune import AdapterConfig, add_adapter, train_strategy
from adaptune.cpu import native


def test_keep_mask_rate_and_shape():
    torch.manual_seed(0)
    keep = K.keep_mask((200, 500), 0.1, torch.device("cpu"))
    assert keep.dtype == torch.bool and keep.shape == (200, 500)
    assert abs(keep.float().mean().item() - 0.9) < 0.005
    assert not torch.equal(keep, K.keep_mask((200, 500), 0.1, torch.device("cpu")))  # fresh draws
    assert K.keep_mask((10,), 0.0, torch.device("cpu")).all()


@pytest.fixture
def fixed_mask(monkeypatch):
    """The torch versions (not the C kernels, which draw their own masks), every keep_mask call
    returning the same seeded draw, so lean and reference use one mask."""

    def fixed(shape, p, device):
        g = torch.Generator().manual_seed(7)
        return torch.rand(tuple(shape), generator=g) >= p

    monkeypatch.setattr(K, "keep_mask", fixed)
    previous = K.set_native(False)
    yield fixed
    K.set_native(previous)


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


def _mask_case(case: str, b: int, t: int):
    """The boolean mask of a test case (None for causal and none) and an attention module for it."""
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

    return mask, Module


@pytest.mark.parametrize("case", ["padding", "causal", "dead-row", "none"])
def test_attention_equals_the_math_with_gradients(fixed_mask, case):
    torch.manual_seed(0)
    b, h, t, d, p = 2, 3, 5, 4, 0.2
    q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
    mask, Module = _mask_case(case, b, t)
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


def _assert_lean_step_equals_plain(model, ref, batch):
    """``model`` under the lean kernels in training mode, ``ref`` (its twin) plain in eval mode:
    one forward and backward each give the same logits and every parameter's gradient."""
    labels = torch.tensor([0, 1, 1])
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


def test_lean_training_step_equals_plain_when_dropout_keeps_everything(fixed_mask, monkeypatch):
    """Every element kept (p ~ 0, yet on the training path): a lean forward and backward equal the
    plain model's, values and every gradient."""
    monkeypatch.setattr(K, "keep_mask", lambda shape, p, device: torch.ones(tuple(shape), dtype=torch.bool))
    model = tiny_model("bert")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 1e-7  # training path taken, scale 1/(1 - 1e-7)
    model.config.attention_probs_dropout_prob = 1e-7
    _assert_lean_step_equals_plain(model, tiny_model("bert"), tiny_batch())


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
    slots = {
        id(model.bert.encoder.layer[i].get_submodule(p))
        for i in range(4)
        for p in ("attention.output.dropout", "output.dropout")
    }
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


# ---- the C attention kernel (csrc/attention.c): the same math, its own dropout draws ----

needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler or no AVX2 CPU here")


@pytest.fixture
def kernel_masks(monkeypatch):
    """Records the kept mask of every C attention forward (and proves the kernel ran)."""
    masks = []
    real = K._attention_forward

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        masks.append(result[2])
        return result

    monkeypatch.setattr(K, "_attention_forward", spy)
    return masks


def _heads_view(b, t, h, d, g=None):
    """(B, H, T, d) transposed out of a (B, T, H, d) tensor, as a projection hands it over."""
    return torch.randn(b, t, h, d, generator=g).transpose(1, 2).requires_grad_()


@needs_native
@pytest.mark.parametrize("case", ["padding", "causal", "dead-row", "none"])
@pytest.mark.parametrize("t,d", [(5, 16), (37, 32), (128, 32), (20, 64)])
def test_native_attention_equals_the_math_with_gradients(kernel_masks, case, t, d):
    """Tail rows and columns (T not a multiple of 6, 8 or 16), every mask kind, head sizes 16-64:
    values and the gradients of q, k and v equal the math given the kernel's own kept mask."""
    g = torch.Generator().manual_seed(t * 100 + d)
    b, h, p = 2, 3, 0.2
    q, k, v = (_heads_view(b, t, h, d, g) for _ in range(3))
    mask, Module = _mask_case(case, b, t)
    out, _ = K.lean_sdpa_attention(Module().train(), q, k, v, None if case == "causal" else mask, dropout=p)
    (keep,) = kernel_masks
    assert keep.shape == (b, h, t, t) and keep.dtype == torch.bool
    ref = _reference_attention(q, k, v, mask, keep, p, d**-0.5).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    got, want = torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(got, want)
    assert all(x.shape == y.shape for x, y in zip(got, (q, k, v)))


@needs_native
def test_native_dropout_rate_and_seeding(kernel_masks):
    """Kept with probability 1 - p; fresh draws per call; torch.manual_seed repeats a run."""
    q = k = v = _heads_view(4, 128, 4, 16)
    module = torch.nn.Module().train()
    torch.manual_seed(3)
    first, _ = K.lean_sdpa_attention(module, q, k, v, None, dropout=0.3, is_causal=False)
    second, _ = K.lean_sdpa_attention(module, q, k, v, None, dropout=0.3, is_causal=False)
    torch.manual_seed(3)
    again, _ = K.lean_sdpa_attention(module, q, k, v, None, dropout=0.3, is_causal=False)
    a, b, c = kernel_masks
    assert abs(a.float().mean().item() - 0.7) < 0.005  # 262,144 draws: sd 0.0009
    assert not torch.equal(a, b) and torch.equal(a, c) and torch.equal(first, again)
    assert not torch.equal(first, second)


@needs_native
def test_native_attention_same_bits_at_any_thread_count(kernel_masks):
    """Pairs of (batch, head) split over threads: each has its own random stream, so two threads
    give one thread's bits, forward and backward."""
    if not native.library().parallel:
        pytest.skip("the kernels were built without a shared OpenMP runtime: one thread only")
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            q, k, v = (_heads_view(3, 40, 4, 32, torch.Generator().manual_seed(i)) for i in range(3))
            torch.manual_seed(0)
            out, _ = K.lean_sdpa_attention(torch.nn.Module().train(), q, k, v, None, dropout=0.1, is_causal=True)
            results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(x, y) for x, y in zip(*results))


def test_torch_attention_runs_where_the_kernel_does_not_apply(kernel_masks):
    """Head size not a multiple of 16, or the kernel switched off: the torch version, same math."""
    q, k, v = (_heads_view(2, 9, 2, 8) for _ in range(3))
    module = torch.nn.Module().train()
    K.lean_sdpa_attention(module, q, k, v, None, dropout=0.1, is_causal=False)
    q, k, v = (_heads_view(2, 9, 2, 16) for _ in range(3))
    previous = K.set_native(False)
    try:
        out, _ = K.lean_sdpa_attention(module, q, k, v, None, dropout=0.1, is_causal=False)
    finally:
        K.set_native(previous)
    assert kernel_masks == [] and out.shape == (2, 9, 2, 16)


@needs_native
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_native_training_step_equals_plain_when_dropout_keeps_everything(
    kernel_masks, gelu_calls, monkeypatch, family
):
    """A model whose heads are 16 wide (so the kernel runs), p small enough that every draw is
    kept (1e-6 rounds to 0 / 65536): a lean forward and backward equal the plain model's, values
    and every gradient; for LLaMA through the causal mask and grouped key-value heads, for BERT
    through the C GELU as well (its size threshold lowered to this small model)."""
    import transformers as T

    from adaptune.cpu import lean_gelu

    monkeypatch.setattr(lean_gelu, "GELU_MIN_ENTRIES", 1)

    def build():
        torch.manual_seed(0)
        if family == "bert":
            cfg = T.BertConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                vocab_size=100,
                attention_probs_dropout_prob=1e-6,
                hidden_dropout_prob=1e-6,
            )
        else:
            cfg = T.LlamaConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                intermediate_size=64,
                vocab_size=100,
                attention_dropout=1e-6,
                pad_token_id=0,
            )
        return T.AutoModelForSequenceClassification.from_config(cfg)

    _assert_lean_step_equals_plain(build(), build(), tiny_batch(length=23))
    assert len(kernel_masks) == 2 and all(m.all() for m in kernel_masks)
    assert gelu_calls == ({"forward": 2, "backward": 2} if family == "bert" else {"forward": 0, "backward": 0})


@needs_native
def test_native_dropout_scales_what_it_keeps_with_gradient():
    """The C dropout: every entry either x / (1 - p) or 0, about 1 - p of them kept (a size that
    leaves a tail block), and the gradient masked and scaled the same way."""
    x = torch.randn(3, 8195, requires_grad=True)
    y = K.lean_dropout(x, 0.25)
    assert y.grad_fn is not None and "NativeDropout" in type(y.grad_fn).__name__
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(grad, torch.where(kept, g / 0.75, 0.0))


@needs_native
def test_native_dropout_seeding_threads_and_fallback():
    """torch.manual_seed repeats the draws, fresh calls differ, two threads give one thread's bits,
    and a non-contiguous input takes the torch version (still a dropout)."""
    x = torch.randn(64, 1000)
    torch.manual_seed(1)
    a, b = K.lean_dropout(x, 0.1), K.lean_dropout(x, 0.1)
    torch.manual_seed(1)
    assert torch.equal(K.lean_dropout(x, 0.1), a) and not torch.equal(a, b)
    if native.library().parallel:
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            torch.manual_seed(1)
            assert torch.equal(K.lean_dropout(x, 0.1), a)
        finally:
            torch.set_num_threads(before)
    xt = x.t().requires_grad_()
    y = K.lean_dropout(xt, 0.1)
    assert "NativeDropout" not in type(y.grad_fn).__name__
    kept = y != 0
    torch.testing.assert_close(y[kept], xt[kept] / 0.9)


# ---- the C GELU (csrc/gelu.c): torch's exact GELU up to float rounding ----


def _gelu_inputs(n: int) -> torch.Tensor:
    """Tails, the steep middle and large values, in shuffled order (n not a multiple of 8)."""
    g = torch.Generator().manual_seed(n)
    x = torch.cat([torch.linspace(-12, 12, n // 2), 3 * torch.randn(n - n // 2, generator=g)])
    return x[torch.randperm(n, generator=g)]


@needs_native
@pytest.mark.parametrize("shape", [(16387,), (3, 8195), (64, 1536)])
def test_native_gelu_equals_torch_with_gradient(gelu_calls, shape):
    """Forward and gradient of the lean GELU equal the exact GELU within float tolerance (the
    absolute error of the erfc approximation is below 1e-6 everywhere), tail entries included.
    The reference is the exact GELU in float64: torch's own float32 GELU is itself up to 1.2e-6 off
    it on some processors (an AVX-512 Xeon), more than this kernel."""
    x = _gelu_inputs(int(torch.tensor(shape).prod())).view(shape).requires_grad_()
    y = K.lean_gelu(x)
    assert "NativeGELU" in type(y.grad_fn).__name__
    x64 = x.detach().double().requires_grad_()
    want = torch.nn.functional.gelu(x64)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(y)
    torch.testing.assert_close(
        torch.autograd.grad(y, x, grad)[0].double(),
        torch.autograd.grad(want, x64, grad.double())[0],
        rtol=1e-5,
        atol=1e-6,
    )
    assert gelu_calls == {"forward": 1, "backward": 1}


@needs_native
def test_native_gelu_same_bits_at_any_thread_count():
    """Blocks split over threads, each entry computed on its own: two threads give one's bits."""
    if not native.library().parallel:
        pytest.skip("the kernels were built without a shared OpenMP runtime: one thread only")
    x, grad = _gelu_inputs(100003), torch.randn(100003)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append((K.gelu(x), K.gelu_backward(grad, x)))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results))
    torch.testing.assert_close(results[0][0].double(), torch.nn.functional.gelu(x.double()), rtol=1e-5, atol=1e-6)


def test_torch_gelu_runs_where_the_kernel_does_not_apply(gelu_calls):
    """Too few entries, float64, a transposed view, no gradient recorded through lean_gelu, or the
    kernels switched off: torch's own GELU, bit for bit."""
    small = torch.randn(100, requires_grad=True)
    cases = [
        small,
        torch.randn(40000, dtype=torch.float64, requires_grad=True),
        torch.randn(200, 200).t().requires_grad_(),
    ]
    for x in cases:
        assert torch.equal(K.lean_gelu(x), torch.nn.functional.gelu(x))
    big = torch.randn(40000, requires_grad=True)
    with torch.no_grad():
        assert torch.equal(K.lean_gelu(big), torch.nn.functional.gelu(big))
    previous = K.set_native(False)
    try:
        assert torch.equal(K.lean_gelu(big), torch.nn.functional.gelu(big))
        assert torch.equal(
            K.gelu_backward(big.detach(), big.detach()), torch.ops.aten.gelu_backward(big.detach(), big.detach())
        )
    finally:
        K.set_native(previous)
    assert gelu_calls == {"forward": 0, "backward": 0}


def test_use_lean_kernels_routes_transformers_gelu_and_back():
    """BERT's exact GELU modules call lean_gelu under the lean kernels and F.gelu again after;
    other activations (the tanh approximation) are left alone."""
    from transformers.activations import ACT2FN

    model = tiny_model("bert")
    tanh_gelu = ACT2FN["gelu_new"]
    model.add_module("extra_act", tanh_gelu)
    gelus = [m for m in model.modules() if type(m).__name__ == "GELUActivation"]
    assert gelus
    K.use_lean_kernels(model)
    assert all(m.act is K.lean_gelu for m in gelus) and not hasattr(tanh_gelu, "act")
    K.use_lean_kernels(model, enable=False)
    assert all(m.act is torch.nn.functional.gelu for m in gelus)


# ---- on by default for CPU training (issue 28) ----------------------------------------------------------


def test_training_on_the_cpu_uses_the_lean_kernels_by_default(tiny_model_dir):
    from adaptune.training.train import TrainConfig, build_model

    cfg = TrainConfig(model=str(tiny_model_dir), device="cpu")
    assert cfg.lean_kernels is None and cfg.lean_on(torch.device("cpu"))
    model, _ = build_model(cfg, 2)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(type(m) is K.LeanDropout for m in dropouts)
    assert model.config._attn_implementation == K._ATTN_NAME
    # on another device the plain modules train (the model is only built here, not moved)
    other, _ = build_model(cfg, 2, torch.device("cuda"))
    assert not any(isinstance(m, K.LeanDropout) for m in other.modules())
    assert not TrainConfig(model=str(tiny_model_dir), lean_kernels=False).lean_on(torch.device("cpu"))
    assert TrainConfig(model=str(tiny_model_dir), lean_kernels=True).lean_on(torch.device("cuda"))


def test_no_lean_kernels_reproduces_torchs_dropout_stream(tiny_model_dir):
    """--no-lean-kernels: the same training-mode outputs and gradients, bit for bit, as the model
    built by hand with transformers and torch alone, from the same seed."""
    from adaptune.models.loading import load_classifier
    from adaptune.training.train import ADAPTER_NAME, TrainConfig, build_model

    cfg = TrainConfig(model=str(tiny_model_dir), lean_kernels=False, device="cpu")
    ours, _ = build_model(cfg, 2)
    torch.manual_seed(cfg.seed)
    plain = load_classifier(str(tiny_model_dir), 2)
    add_adapter(plain, ADAPTER_NAME, cfg.adapter_config())
    train_strategy(plain, "adapters")
    batch = {"input_ids": torch.randint(1000, 2000, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    outs = []
    for model in (ours, plain):
        model.train()
        torch.manual_seed(123)
        logits = model(**batch).logits
        logits.sum().backward()
        outs.append((logits, [p.grad for p in model.parameters() if p.requires_grad]))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))
    # and the default (lean) path draws another dropout stream from the same seed
    lean, _ = build_model(TrainConfig(model=str(tiny_model_dir), device="cpu"), 2)
    lean.train()
    torch.manual_seed(123)
    assert not torch.equal(lean(**batch).logits, outs[0][0])
