"""Every family of the placement table, every strategy and the ``params`` command, on both checkpoint
layouts: saved as the bare encoder/decoder (as sentence-transformers does) and with a task head."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from adaptune import STRATEGIES, add_adapter, list_adapters, train_strategy
from adaptune.core.architectures import ARCHITECTURES, pooler_module, spec_for
from adaptune.cli.parser import main
from adaptune.models.loading import load_classifier

from conftest import FAMILIES, TINY_CONFIGS, tiny_batch

LAYOUTS = ("bare", "with-head")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{(family, layout): folder} of tiny random checkpoints saved both ways."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in FAMILIES:
        for layout in LAYOUTS:
            torch.manual_seed(0)
            cfg = TINY_CONFIGS[family]()
            cls = T.AutoModel if layout == "bare" else T.AutoModelForSequenceClassification
            folder = root / f"{family}-{layout}"
            cls.from_config(cfg).save_pretrained(folder)
            out[family, layout] = folder
    return out


def _step_changes(model) -> set[str]:
    """Names of the parameters one optimiser step changes."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    out = model(**tiny_batch(), labels=torch.tensor([0, 1, 1]))
    out.loss.backward()
    opt.step()
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("family_", FAMILIES)
def test_every_strategy_trains_on_both_layouts(checkpoints, family_, strategy, layout):
    model = load_classifier(str(checkpoints[family_, layout]), 2)
    if strategy == "adapters":
        add_adapter(model, "t", "houlsby")
    counts = train_strategy(model, strategy, k=1 if strategy == "top-k" else None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert counts.trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable) > 0
    changed = _step_changes(model)
    assert changed and changed <= trainable  # nothing frozen moved
    pooler = pooler_module(model, spec_for(model))
    if strategy in ("adapters", "head", "top-k", "layernorm") and pooler is not None:
        # a pooler, where the classifier has one, belongs to the task head: trained (a copy, for adapters)
        prefix = "adaptune.sets.t.pooler." if strategy == "adapters" else "bert.pooler."
        assert any(n.startswith(prefix) for n in changed), sorted(changed)


@pytest.mark.parametrize("family_", FAMILIES)
def test_pooler_is_resolved_against_the_loaded_model(checkpoints, family_):
    """BERT's classifier reads a pooler; RoBERTa-style classifiers are built without one, whatever
    the table's row says, and a decoder has none."""
    for layout in LAYOUTS:
        model = load_classifier(str(checkpoints[family_, layout]), 2)
        pooler = pooler_module(model, ARCHITECTURES[family_])
        assert (pooler is not None) == (family_ == "bert"), (family_, layout)
        add_adapter(model, "t", "houlsby")
        assert (list_adapters(model)[0]["pooler_params"] > 0) == (family_ == "bert")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family_", FAMILIES)
def test_params_command_on_every_family(checkpoints, family_, layout, capsys):
    assert main(["params", "--model", str(checkpoints[family_, layout]), "--adapter-size", "8", "--top-k", "1"]) == 0
    out = capsys.readouterr().out
    for row in ("adapters", "full", "top-1", "layernorm", "head"):
        assert f"\n{row} " in out, out
    assert "[ok]" in out
