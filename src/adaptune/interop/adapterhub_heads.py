"""AdapterHub's two-layer classification head on the model families whose own classifier already is
that head: RoBERTa, XLM-RoBERTa and ELECTRA put ``dense -> activation -> out_proj`` on the first
token into ``classifier`` (no pooler), where BERT has a pooler (dense + tanh) and a linear
``classifier``. :mod:`adaptune.interop.adapterhub` reads a head as BERT's tensors (``pooler.*``,
``head.classifier.*``); these move them to and from the other layout, and check that a model's
head is of the kind the folder holds."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from adaptune.core.architectures import head_modules
from adaptune.errors import AdapterFileError

if TYPE_CHECKING:
    from adaptune.interop.adapterhub import ForeignAdapter

# the activation of each family's own classification head
HEAD_ACTIVATION = {"bert": "tanh", "roberta": "tanh", "xlm-roberta": "tanh", "electra": "gelu"}
_POOLER, _LINEAR = "pooler.pooler.dense", "head.classifier"


def has_dense_head(classifier: nn.Module | None) -> bool:
    """A ``classifier`` of the RoBERTa kind (``dense`` then ``out_proj``)."""
    return classifier is not None and hasattr(classifier, "dense") and hasattr(classifier, "out_proj")


def to_model_layout(model: nn.Module, classifier: nn.Module | None, head: dict, activation: str, where) -> dict:
    """BERT-layout head tensors as the model's: unchanged for a linear classifier (a two-layer head
    needs BERT's tanh pooler), moved into ``classifier.dense`` / ``.out_proj`` for the dense kind."""
    family = getattr(model.config, "model_type", None)
    if f"{_LINEAR}.dense.weight" in head:  # a static head of a RoBERTa-like model: already its layout
        return head
    two = f"{_POOLER}.weight" in head
    if not has_dense_head(classifier):
        if two and activation != "tanh":
            raise AdapterFileError(
                f"{where}: a two-layer head with activation_function={activation!r} cannot be expressed on a "
                f"{family} model (its pooler applies tanh)"
            )
        return head
    if not two or activation != HEAD_ACTIVATION.get(family):
        raise AdapterFileError(
            f"{where}: a {family} classifier is dense -> {HEAD_ACTIVATION.get(family)} -> out_proj on the first "
            f"token; this head ({'two layers, ' + activation if two else 'one layer on the pooler'}) cannot be "
            "expressed on it"
        )
    out = {}
    for kind in ("weight", "bias"):
        out[f"{_LINEAR}.dense.{kind}"] = head[f"{_POOLER}.{kind}"]
        out[f"{_LINEAR}.out_proj.{kind}"] = head[f"{_LINEAR}.{kind}"]
    return out


def from_model_layout(classifier: nn.Module, pooler: nn.Module | None) -> tuple[list[nn.Linear], bool]:
    """The linear layers of the model's head as AdapterHub's (first, last), and whether they form
    the two-layer head on the first token (else one layer on the model's pooler)."""
    if has_dense_head(classifier):
        return [classifier.dense, classifier.out_proj], True
    if not isinstance(classifier, nn.Linear):
        raise AdapterFileError(f"a {type(classifier).__name__} head is not written as an AdapterHub head")
    return ([pooler.dense, classifier], True) if pooler is not None else ([classifier], False)


def model_head_kind(model: nn.Module) -> str | None:
    """The kind of head a transformers model carries, as the folders name it (None: no head)."""
    cls = type(model).__name__
    if cls.endswith("ForTokenClassification"):
        return "token"
    if cls.endswith("ForSequenceClassification"):
        multi = getattr(model.config, "problem_type", None) == "multi_label_classification"
        return "multi-label" if multi else "classification"
    return None


def model_head_tensors(model: nn.Module, foreign: ForeignAdapter, path: Path) -> dict[str, torch.Tensor]:
    """The head saved in an AdapterHub folder as tensors of ``model``'s own head (RoBERTa-like
    families hold the two-layer head in their classifier); refused for a model with another head."""
    head = foreign.head
    if model_head_kind(model) not in (head, "multi-label" if head == "classification" else head):
        raise AdapterFileError(
            f"{path} carries a {head} head, but the model is a {type(model).__name__}; load the base as "
            f"{'AutoModelForTokenClassification' if head == 'token' else 'AutoModelForSequenceClassification'} "
            "(CLI: --task-type), or pass with_head=False"
        )
    classifier = head_modules(model).get("classifier")
    return to_model_layout(model, classifier, foreign.head_tensors, foreign.head_activation, path)
