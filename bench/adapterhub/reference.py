"""AdapterHub's side of the interop checks; runs inside ``.venv-adapterhub`` (adapters 1.3 and its own
transformers), never imports adaptune. Driven by ``bench/adapterhub/run.py``.

  make OUT MINILM_DIR   write reference folders saved by AdapterHub's ``save_adapter`` and the
                        logits AdapterHub computes with them (``expected.json``), for a tiny
                        random BERT (saved once to OUT/tiny-bert) and for all-MiniLM-L6-v2
  check CASES.json      load folders that adaptune exported with AdapterHub's ``load_adapter`` and
                        print the logits AdapterHub computes for each case's inputs, as JSON

Both sides run eager attention, so the two transformers versions compute the base alike.
Adapter and head weights are drawn at random (std 0.3 here, not AdapterHub's near-identity init),
so that a wrongly placed or wrongly read adapter changes the logits far beyond the tolerance.
"""

import json
import shutil
import sys
from pathlib import Path

import torch

ARCHS = ("double_seq_bn", "seq_bn", "par_bn")
ACTS = ("relu", "gelu", "swish")


def _tiny_config(cls=None):
    """A 2-layer, 32-wide config of ``cls`` (default: BertConfig)."""
    import transformers as T

    return (cls or T.BertConfig)(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )


def _inputs(vocab: int, seed: int, batch: int = 3, length: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    ids[:, 0] = 2  # a first token for the classification heads to read
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return ids, mask


def _randomise(model, name: str, seed: int) -> None:
    """Adapter (and head) weights far from the identity: every placement mistake shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if f"adapters.{name}." in key or f"heads.{name}." in key or key.startswith("classifier."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _logits(model, ids, mask):
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return (out.logits if hasattr(out, "logits") else out[0]).tolist()


def _config(arch: str, act: str, reduction_factor: float, **extra):
    import adapters

    cls = {"double_seq_bn": adapters.DoubleSeqBnConfig, "seq_bn": adapters.SeqBnConfig, "par_bn": adapters.ParBnConfig}
    return cls[arch](non_linearity=act, reduction_factor=reduction_factor, **extra)


def _case(out: Path, case: str, base: str, build, ids, mask, info: dict) -> None:
    model = build()
    folder = out / case
    if folder.exists():
        shutil.rmtree(folder)
    model.save_adapter(str(folder), "t", with_head=info.get("with_head", True))
    meta = {
        "base": base,
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "logits": _logits(model, ids, mask),
    }
    (folder / "expected.json").write_text(json.dumps({**meta, **info}) + "\n")
    print(case, "written", flush=True)


def make(out: Path, minilm: str) -> None:
    import adapters
    import transformers as T

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    T.BertModel(_tiny_config()).save_pretrained(str(out / "tiny-bert"))
    tiny = str(out / "tiny-bert")
    ids, mask = _inputs(100, seed=1)

    def flex(path, config, head="classification", labels=3, seed=0, **head_kwargs):
        def build():
            model = adapters.AutoAdapterModel.from_pretrained(path, attn_implementation="eager")
            model.add_adapter("t", config=config)
            if head == "classification":
                model.add_classification_head("t", num_labels=labels, **head_kwargs)
            elif head == "multilabel":
                model.add_classification_head("t", num_labels=labels, multilabel=True, **head_kwargs)
            elif head == "tagging":
                model.add_tagging_head("t", num_labels=labels)
            model.set_active_adapters("t")
            _randomise(model, "t", seed)
            return model

        return build

    for i, arch in enumerate(ARCHS):
        for j, act in enumerate(ACTS):
            build = flex(tiny, _config(arch, act, 4), seed=10 * i + j)
            _case(out, f"tiny-{arch}-{act}", "tiny-bert", build, ids, mask, {"head": "classification"})
    _case(
        out,
        "tiny-seq_bn-multilabel",
        "tiny-bert",
        flex(tiny, _config("seq_bn", "relu", 8), "multilabel", 4),
        ids,
        mask,
        {"head": "multi-label"},
    )
    _case(
        out,
        "tiny-double_seq_bn-tagging",
        "tiny-bert",
        flex(tiny, _config("double_seq_bn", "gelu", 8), "tagging", 5),
        ids,
        mask,
        {"head": "token"},
    )
    leave = _config("par_bn", "swish", 2, leave_out=[0], scaling=2.0)
    _case(out, "tiny-par_bn-leave_out", "tiny-bert", flex(tiny, leave), ids, mask, {"head": "classification"})
    _case(
        out,
        "tiny-double_seq_bn-nohead",
        "tiny-bert",
        flex(tiny, _config("double_seq_bn", "relu", 4), None),
        ids,
        mask,
        {"head": None, "with_head": False},
    )  # logits: the last hidden state

    static = _static(T.BertForSequenceClassification, tiny, _config("seq_bn", "gelu", 4), 99)
    _case(out, "tiny-seq_bn-static", "tiny-bert", static, ids, mask, {"head": "classification"})

    for arch in ("double_seq_bn", "seq_bn"):
        _composition(out, tiny, arch, ids, mask)
    _roberta(out, ids, mask, flex)

    tok = T.AutoTokenizer.from_pretrained(minilm)
    enc = tok(["the soup was cold and bland", "great coffee, would buy again"], padding=True, return_tensors="pt")
    for i, arch in enumerate(ARCHS):
        for j, act in enumerate(ACTS):
            # reduction factor 128 (m = 3) and the one-layer head on the pooler keep the files small
            build = flex(minilm, _config(arch, act, 128), labels=2, seed=100 + 10 * i + j, layers=1, use_pooler=True)
            _case(
                out,
                f"minilm-{arch}-{act}",
                "minilm",
                build,
                enc["input_ids"],
                enc["attention_mask"],
                {"head": "classification"},
            )


def _static(cls, base: str, config, seed: int):
    """A transformers model with its own (static) head, the adapter added with ``adapters.init``."""
    import adapters

    def build():
        torch.manual_seed(0)
        model = cls.from_pretrained(base, num_labels=3, attn_implementation="eager")
        adapters.init(model)
        model.add_adapter("t", config=config)
        model.set_active_adapters("t")
        _randomise(model, "t", seed)
        return model

    return build


def _roberta(out: Path, ids, mask, flex) -> None:
    """A tiny random RoBERTa: its classifier is AdapterHub's two-layer head (no pooler)."""
    import transformers as T

    torch.manual_seed(0)
    T.RobertaModel(_tiny_config(T.RobertaConfig)).save_pretrained(str(out / "tiny-roberta"))
    base = str(out / "tiny-roberta")
    _case(
        out,
        "roberta-double_seq_bn-relu",
        "tiny-roberta",
        flex(base, _config("double_seq_bn", "relu", 4), seed=500),
        ids,
        mask,
        {"head": "classification"},
    )
    _case(
        out,
        "roberta-seq_bn-gelu-tagging",
        "tiny-roberta",
        flex(base, _config("seq_bn", "gelu", 4), "tagging", 5, seed=501),
        ids,
        mask,
        {"head": "token"},
    )

    static = _static(T.RobertaForSequenceClassification, base, _config("par_bn", "swish", 4), 502)
    _case(out, "roberta-par_bn-swish-static", "tiny-roberta", static, ids, mask, {"head": "classification"})


def _composition(out: Path, tiny: str, arch: str, ids, mask) -> None:
    """Three adapters saved one folder each, and the logits of Stack(a, b) and of Fuse(a, b, c)
    (AdapterHub's dynamic fusion, its weights drawn at random and saved with the fusion)."""
    import adapters
    from adapters.composition import Fuse, Stack

    model = adapters.AutoAdapterModel.from_pretrained(tiny, attn_implementation="eager")
    for k, n in enumerate("abc"):
        model.add_adapter(n, config=_config(arch, "relu", 4))
        _randomise(model, n, 200 + k)
    model.add_classification_head("b", num_labels=3)
    _randomise(model, "b", 300)
    folder = out / f"tiny-{arch}-composition"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for n in "abc":
        model.save_adapter(str(folder / n), n, with_head=n == "b")
    model.set_active_adapters(Stack("a", "b"))
    stack = _logits(model, ids, mask)
    model.add_adapter_fusion(Fuse("a", "b", "c"))
    model.add_classification_head("a,b,c", num_labels=3)
    g = torch.Generator().manual_seed(400)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "adapter_fusion_layer" in key or "heads.a,b,c." in key:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_adapter_fusion(str(folder / "fusion"), "a,b,c", with_head=True)
    model.set_active_adapters(Fuse("a", "b", "c"))
    fused = _logits(model, ids, mask)
    meta = {
        "base": "tiny-bert",
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "stack_logits": stack,
        "fusion_logits": fused,
    }
    (folder / "expected.json").write_text(json.dumps(meta) + "\n")
    print(folder.name, "written", flush=True)


def check(cases_file: Path) -> None:
    """For each case {folder, base, input_ids, attention_mask, head}: AdapterHub's logits."""
    import adapters

    results = {}
    for case in json.loads(cases_file.read_text()):
        model = adapters.AutoAdapterModel.from_pretrained(case["base"], attn_implementation="eager")
        name = model.load_adapter(case["folder"], set_active=True)
        ids, mask = torch.tensor(case["input_ids"]), torch.tensor(case["attention_mask"])
        results[case["name"]] = {"adapter": name, "logits": _logits(model, ids, mask)}
    print(json.dumps(results))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(Path(sys.argv[2]), sys.argv[3])
    elif sys.argv[1] == "check":
        check(Path(sys.argv[2]))
    else:
        raise SystemExit(__doc__)
