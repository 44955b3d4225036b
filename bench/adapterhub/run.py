"""adaptune against AdapterHub's ``adapters`` 1.3, both directions, on the shipped all-MiniLM-L6-v2.

1. ``--fixtures``: AdapterHub (in ``.venv-adapterhub``, made on first use) saves reference
   adapters and their logits into ``tests/fixtures/adapterhub`` (``reference.py make``); the test
   suite checks adaptune against them without needing ``adapters``.
2. Import: every reference folder loaded by adaptune, logits compared with AdapterHub's; also
   AdapterHub's ``Stack(a, b)`` and dynamic ``Fuse(a, b, c)`` (its fusion folder read by
   ``load_adapterhub_fusion``) against adaptune's ``Stack`` and fusion of the same adapters.
3. Export: adaptune adapters for each placement (Houlsby = ``double_seq_bn``, Pfeiffer =
   ``seq_bn``, parallel = ``par_bn``) and non-linearity (relu, gelu, swish), with random weights
   and a two-layer head, written by ``save_adapterhub``, loaded by AdapterHub's ``load_adapter``
   (``reference.py check``); logits compared with adaptune's.

Both sides run eager attention. Writes ``bench/results/adapterhub_interop.json`` and prints a table.

Run:  .venv/bin/python bench/adapterhub/run.py [--fixtures] [--no-setup]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers as T

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from adapterhub_side_by_side import ensure_hub_venv  # noqa: E402

from adaptune import AdapterConfig, Stack, add_adapter, set_active  # noqa: E402
from adaptune.interop.adapterhub import load_adapterhub  # noqa: E402
from adaptune.interop.adapterhub_fusion import load_adapterhub_fusion  # noqa: E402
from adaptune.interop.adapterhub_export import save_adapterhub  # noqa: E402
from adaptune.models.loading import DEFAULT_MODEL, resolve_model_path  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "adapterhub"
PRESETS = {"double_seq_bn": "houlsby", "seq_bn": "pfeiffer", "par_bn": "parallel"}
TOLERANCE = 1e-5


def _model(base: str | Path, head: str | None, labels: int | None = None) -> torch.nn.Module:
    cls = {"token": T.AutoModelForTokenClassification, None: T.AutoModel}.get(
        head, T.AutoModelForSequenceClassification
    )
    kwargs = {"num_labels": labels} if labels else {}
    if head == "multi-label":
        kwargs["problem_type"] = "multi_label_classification"
    return cls.from_pretrained(str(base), attn_implementation="eager", **kwargs).eval()


def _logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return out.logits if hasattr(out, "logits") else out[0]


def check_import(minilm: str) -> list[dict]:
    rows = []
    for case in sorted(p for p in FIXTURES.iterdir() if (p / "adapter_config.json").is_file()):
        e = json.loads((case / "expected.json").read_text())
        model = _model(FIXTURES / e["base"] if e["base"].startswith("tiny-") else minilm, e["head"])
        load_adapterhub(model, case)
        diff = (_logits(model, e["input_ids"], e["attention_mask"]) - torch.tensor(e["logits"])).abs().max().item()
        rows.append({"direction": "AdapterHub -> adaptune", "case": case.name, "max_abs_diff": diff})
    for arch in ("double_seq_bn", "seq_bn"):  # Stack(a, b) and Fuse(a, b, c) computed by AdapterHub
        folder = FIXTURES / f"tiny-{arch}-composition"
        e = json.loads((folder / "expected.json").read_text())
        model = _model(FIXTURES / "tiny-bert", "classification", labels=3)
        for n in "abc":
            load_adapterhub(model, folder / n, activate=False)
        set_active(model, Stack("a", "b"))
        for what, expected in (("Stack(a, b)", e["stack_logits"]), ("Fuse(a, b, c)", e["fusion_logits"])):
            if what.startswith("Fuse"):
                load_adapterhub_fusion(model, folder / "fusion")
            diff = (_logits(model, e["input_ids"], e["attention_mask"]) - torch.tensor(expected)).abs().max().item()
            rows.append({"direction": "AdapterHub -> adaptune", "case": f"tiny-{arch} {what}", "max_abs_diff": diff})
    return rows


def check_export(hub_python: Path, minilm: str) -> list[dict]:
    tok = T.AutoTokenizer.from_pretrained(minilm)
    enc = tok(["the soup was cold and bland", "great coffee, would buy again"], padding=True)
    cases, ours = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (arch, preset) in enumerate(PRESETS.items()):
            for j, act in enumerate(("relu", "gelu", "silu")):
                model = _model(minilm, "classification", labels=3)
                cfg = AdapterConfig.preset(preset, size=8, nonlinearity=act, train_layer_norms=False)
                aset = add_adapter(model, "t", cfg)
                g = torch.Generator().manual_seed(10 * i + j)
                with torch.no_grad():  # adapters far from the identity; a head of a trained one's scale
                    for key, p in aset.named_parameters():
                        p.copy_(torch.randn(p.shape, generator=g) * (0.3 if key.startswith("adapters.") else 0.05))
                name = f"minilm-{arch}-{act}"
                ours[name] = _logits(model, enc["input_ids"], enc["attention_mask"])
                save_adapterhub(model, "t", Path(tmp) / name, labels=["neg", "neu", "pos"])
                cases.append({"name": name, "folder": str(Path(tmp) / name), "base": minilm, **dict(enc)})
        tiny = json.loads((FIXTURES / "tiny-seq_bn-relu" / "expected.json").read_text())
        roberta = str(FIXTURES / "tiny-roberta")
        for i, (arch, preset) in enumerate(PRESETS.items()):  # RoBERTa: its classifier is the 2-layer head
            model = _model(roberta, "classification", labels=3)
            aset = add_adapter(model, "t", AdapterConfig.preset(preset, size=8, train_layer_norms=False))
            g = torch.Generator().manual_seed(50 + i)
            with torch.no_grad():
                for p in aset.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            name = f"tiny-roberta-{arch}"
            ours[name] = _logits(model, tiny["input_ids"], tiny["attention_mask"])
            save_adapterhub(model, "t", Path(tmp) / name)
            ids = {"input_ids": tiny["input_ids"], "attention_mask": tiny["attention_mask"]}
            cases.append({"name": name, "folder": str(Path(tmp) / name), "base": roberta, **ids})
        (Path(tmp) / "cases.json").write_text(json.dumps(cases))
        out = subprocess.run(
            [str(hub_python), str(HERE / "reference.py"), "check", str(Path(tmp) / "cases.json")],
            capture_output=True,
            text=True,
            check=True,
        )
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    return [
        {
            "direction": "adaptune -> AdapterHub",
            "case": name,
            "max_abs_diff": (torch.tensor(theirs[name]["logits"]) - ours[name]).abs().max().item(),
            "max_abs_logit": ours[name].abs().max().item(),
        }
        for name in ours
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixtures", action="store_true", help="regenerate tests/fixtures/adapterhub first")
    p.add_argument("--no-setup", action="store_true", help="fail instead of creating .venv-adapterhub")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "adapterhub_interop.json"))
    args = p.parse_args()
    hub = ensure_hub_venv(not args.no_setup)
    minilm = resolve_model_path(DEFAULT_MODEL)
    if args.fixtures:
        subprocess.run([str(hub), str(HERE / "reference.py"), "make", str(FIXTURES), minilm], check=True)
    rows = check_import(minilm) + check_export(hub, minilm)
    print(f"| direction | case | max abs logit difference | within {TOLERANCE:g} |\n|---|---|---:|---|")
    for r in rows:
        ok = "yes" if r["max_abs_diff"] <= TOLERANCE else "NO"
        print(f"| {r['direction']} | {r['case']} | {r['max_abs_diff']:.2e} | {ok} |")
    Path(args.json).write_text(json.dumps({"tolerance": TOLERANCE, "rows": rows}, indent=2) + "\n")
    if any(r["max_abs_diff"] > TOLERANCE for r in rows):
        sys.exit("some cases differ beyond the tolerance")


if __name__ == "__main__":
    main()
