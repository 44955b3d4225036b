"""The adapter path under ``torch.compile`` and without host synchronisation (issue: GPU path).

- Every family of the placement table compiles with ``fullgraph=True`` (no graph break) for a
  forward with one adapter, a mixed-task batch and the gradients of a training step; compiled
  equals eager within 1e-5 (dropout off).
- Switching the active adapter or the rows' tasks runs the same graph (the routing is tensor data).
- A training step reads nothing back from the device (no ``.item()``, no data-dependent shapes);
  a non-finite loss skips the update on the device.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import transformers as T
from torch._dynamo.backends.debugging import aot_eager
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import FAMILIES, TINY_CONFIGS, tiny_batch
from adaptune import AdapterConfig, add_adapter, set_active
from adaptune.lm.causal_lm import response_index
from adaptune.training.config import TrainConfig
from adaptune.training.steps import make_optimizer, training_step

CAUSAL = {"gpt2", "llama", "mistral", "qwen2"}


def _model(family: str, causal: bool = False, seed: int = 0) -> torch.nn.Module:
    """A 2-layer model of ``family`` (tracing time grows with depth) on eager attention: transformers'
    SDPA mask reads the padding mask back in eager mode to skip building it (not under a trace)."""
    torch.manual_seed(seed)
    cfg = TINY_CONFIGS[family]()
    cfg.num_hidden_layers = 2
    cls = T.AutoModelForCausalLM if causal else T.AutoModelForSequenceClassification
    model = cls.from_config(cfg, attn_implementation="eager")
    model.eval()  # dropout off: compiled and eager must agree
    return model


def _with_tasks(model: torch.nn.Module) -> torch.nn.Module:
    """Three tasks of three kinds: Houlsby, Pfeiffer's (the FFN-only Houlsby adapter on pre-norm
    families, which refuse Pfeiffer's) without norm copies, parallel on layer 0 only."""
    b = "houlsby-ffn" if model.config.model_type in CAUSAL else "pfeiffer"
    cfgs = {
        "a": AdapterConfig.preset("houlsby", size=8),
        "b": AdapterConfig.preset(b, size=4, train_layer_norms=False),
        "c": AdapterConfig.preset("parallel", size=4, zero_init_up=False, layers=(0,)),
    }
    for i, (name, cfg) in enumerate(cfgs.items()):
        aset = add_adapter(model, name, cfg)
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in aset.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


class _Counting:
    """A compiler backend that counts the graphs it is given (each compile or recompile is one)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return aot_eager(gm, example_inputs)  # AOT autograd: the backward graph is traced too


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.adaptune.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_compiles_fullgraph_and_equals_eager(family):
    """One adapter and a mixed-task batch, forward and gradients: no graph break (fullgraph=True
    raises on one), compiled = eager within 1e-5, and one graph per kind of routing."""
    torch._dynamo.reset()
    model = _with_tasks(_model(family))
    backend = _Counting()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    batch = tiny_batch(batch=4)
    for route in ("a", ["a", "b", None, "c"], "c", ["c", "c", "b", "a"]):
        set_active(model, route)
        outs = {}
        for name, net in (("eager", model), ("compiled", compiled)):
            model.zero_grad(set_to_none=True)
            logits = net(**batch).logits
            logits.nan_to_num().square().sum().backward()
            outs[name] = (logits.detach(), _grads(model))
        (ref, ref_grads), (got, got_grads) = outs["eager"], outs["compiled"]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, equal_nan=True)
        assert set(got_grads) <= set(ref_grads) | {n for n in got_grads if not got_grads[n].any()}
        for n, g in ref_grads.items():
            torch.testing.assert_close(got_grads[n], g, rtol=1e-5, atol=1e-5)
    assert backend.graphs == 2  # one graph for one task, one for per-row tasks: no recompilation


def test_switching_adapters_and_rows_never_recompiles():
    """Inference: any active adapter, the plain base, and any assignment of rows to tasks run the
    graphs compiled first (one for a single task, one per row); each result equals eager."""
    torch._dynamo.reset()
    model = _with_tasks(_model("bert"))
    backend = _Counting()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    batch = tiny_batch(batch=4)
    routes = ["a", "b", None, "c", ["a", "b", None, "c"], ["c", "c", "a", "b"], ["a"] * 4, [None] * 4, "a"]
    with torch.no_grad():
        for route in routes:
            set_active(model, route)
            torch.testing.assert_close(compiled(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)
    assert backend.graphs == 2


def test_inductor_training_step_equals_eager():
    """The real compiler (inductor) on one family: a mixed-task forward and its gradients."""
    torch._dynamo.reset()
    model = _with_tasks(_model("bert"))
    compiled = torch.compile(model, fullgraph=True)
    batch = tiny_batch(batch=4)
    set_active(model, ["a", "c", "b", "a"])
    outs = []
    for net in (model, compiled):
        model.zero_grad(set_to_none=True)
        logits = net(**batch).logits
        logits.square().sum().backward()
        outs.append((logits.detach(), _grads(model)))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    for n, g in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][n], g, rtol=1e-5, atol=1e-5)


class _HostReads(TorchDispatchMode):
    """Counts the operators that make the host wait for a device value: ``.item()``/``bool()``
    (``_local_scalar_dense``, ``is_nonzero``), ``equal``, and data-dependent shapes (``nonzero``,
    boolean-mask indexing, ``masked_select``, ``unique``).

    One read is not ours and is kept apart: in eager mode, transformers' mask builder
    (``masking_utils``) asks whether the padding mask is all ones, to skip building the mask
    (under ``torch.compile`` it does not ask).
    """

    READS = ("_local_scalar_dense", "is_nonzero", "aten.equal", "nonzero", "masked_select", "unique")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.transformers_mask: int = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(r in str(func) for r in self.READS):
            if any("transformers/masking_utils.py" in f.filename for f in traceback.extract_stack()):
                self.transformers_mask += 1
            else:
                self.seen.append(f"{func} at {_our_frame()}")
        return func(*args, **(kwargs or {}))


def _our_frame() -> str:
    """The innermost frame outside torch: where a read came from."""
    for f in reversed(traceback.extract_stack()):
        if "/torch/" not in f.filename and "test_compile" not in f.filename:
            return f"{f.filename}:{f.lineno}"
    return "?"


def _step_batch(family: str, causal: bool, model) -> tuple[dict, dict]:
    batch = tiny_batch(batch=4)
    if causal:
        labels = batch["input_ids"].clone()
        labels[:, :3] = -100
        labels[batch["attention_mask"] == 0] = -100
        return {**batch, "labels": labels}, {"task_type": "causal-lm", "lm_index": response_index(labels)}
    return {**batch, "labels": torch.tensor([0, 1, 1, 0])}, {"task_type": "classification"}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_training_step_reads_nothing_back(family):
    """Forward, loss, backward, clipping, AdamW and the schedule: no host read, for one adapter and
    for a mixed-task batch."""
    causal = family in CAUSAL
    model = _with_tasks(_model(family, causal=causal))
    model.train()
    batch, kw = _step_batch(family, causal, model)
    opt, sched = make_optimizer(model, TrainConfig(), 10)
    for route in ("a", ["a", "b", None, "c"]):
        set_active(model, route)
        before = {n: p.detach().clone() for n, p in model.adaptune.named_parameters()}
        with _HostReads() as reads:
            loss = training_step(model, batch, opt, sched, max_grad_norm=1.0, **kw)
        assert reads.seen == [], f"{family}: the step read {reads.seen}"
        assert reads.transformers_mask <= 2  # transformers' eager-mode mask check, once per mask it builds
        assert torch.isfinite(loss)
        assert any(not torch.equal(p, before[n]) for n, p in model.adaptune.named_parameters())


def test_a_non_finite_loss_skips_the_update_on_the_device():
    """A batch whose loss is not finite: the step returns it, reads nothing back, and changes no
    weight, no AdamW moment and no step count; the next finite batch trains as usual."""
    model = _with_tasks(_model("bert"))
    set_active(model, "a")
    head = model.adaptune.sets["a"].head.classifier.weight
    opt, sched = make_optimizer(model, TrainConfig(), 10)
    good = {**tiny_batch(batch=4), "labels": torch.tensor([0, 1, 1, 0])}
    training_step(model, good, opt, sched, task_type="classification", max_grad_norm=1.0)
    kept = head.detach().clone()
    with torch.no_grad():  # a broken head: the loss is not finite
        head.fill_(float("inf"))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    with _HostReads() as reads:
        loss = training_step(model, good, opt, sched, task_type="classification", max_grad_norm=1.0)
    assert reads.seen == [] and not torch.isfinite(loss)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]), k
    with torch.no_grad():
        head.copy_(kept)
    loss = training_step(model, good, opt, sched, task_type="classification", max_grad_norm=1.0)
    assert torch.isfinite(loss) and not torch.equal(head, kept)
    assert {int(s["step"]) for s in opt.state.values()} == {2}  # the skipped step did not count


def test_compiled_runs_pad_to_a_few_lengths():
    """With --compile, batches are padded to powers of two from 16 (capped at --max-length): a
    compiled model sees a handful of shapes, not one per length."""
    from adaptune.data.batching import bucket_length

    sizes = {bucket_length(n, 128) for n in range(1, 129)}
    assert sizes == {16, 32, 64, 128}
    assert bucket_length(100, 100) == 100 and bucket_length(130, 128) == 130  # never shorter than the batch
