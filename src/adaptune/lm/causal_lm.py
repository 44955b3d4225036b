"""The language-modelling objective: response-only loss, held-out perplexity and token accuracy.

Batches come from :func:`adaptune.lm.chat.encode_conversations` + :func:`adaptune.data.collate`:
``labels`` is ``(B, T)`` with ``-100`` on every token that is not part of an assistant turn. The
model predicts token ``t+1`` from position ``t``, so only positions whose *next* label is trained
need logits: the columns where any row of the batch has one are passed as ``logits_to_keep``
(a 1-D position tensor, which every ``transformers`` 5 release accepts), so the vocabulary
projection (49k × 576 for SmolLM2, the largest single matrix product of the model) skips the
prompts, the template and the padding that no row needs. In training, families whose logits are the
output layer applied to the last hidden state take the loss from those hidden states a chunk of
rows at a time (:class:`_LinearCrossEntropy`), so the (N, V) logits never exist at once.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from adaptune.core.architectures import backbone
from adaptune.lm.chat import IGNORE
from adaptune.models.quantize import Int8TiedHead, dense_head
from adaptune.data.loading import bucket_batches, collate


def _keep_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions whose next token is a trained label."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


class ResponseIndex(NamedTuple):
    """Where a batch's trained response tokens are, computed from its labels where they live (the
    host, in the training loop) so that the step on the device reads nothing back.

    ``cols`` (K,): positions some row needs (passed as ``logits_to_keep``); ``rows``, ``at`` (N,):
    the row and the index into ``cols`` of each predicting position; ``targets`` (N,): its token."""

    cols: torch.Tensor
    rows: torch.Tensor
    at: torch.Tensor
    targets: torch.Tensor

    def to(self, device) -> ResponseIndex:
        return ResponseIndex(*(t.to(device, non_blocking=True) for t in self))

    def count(self, device) -> torch.Tensor:
        """How many response tokens the loss sums over, as a tensor on ``device`` (known on the host)."""
        return torch.tensor(float(self.targets.shape[0]), device=device)


def response_index(labels: torch.Tensor, row_weight: torch.Tensor | None = None) -> ResponseIndex:
    """The :class:`ResponseIndex` of ``labels`` (B, T); rows of ``row_weight`` 0 count for nothing.
    Its sizes depend on the labels' values: on a GPU this reads them back, so call it on the host copy."""
    keep = _keep_mask(labels)
    if row_weight is not None:
        keep &= row_weight[:, None].to(keep.device) != 0
    cols = keep.any(0).nonzero().squeeze(1)  # (K,)
    rows, at = keep[:, cols].nonzero(as_tuple=True)  # (N,), (N,)
    return ResponseIndex(cols, rows, at, labels[rows, cols[at] + 1])


def response_logits(
    model, batch: dict[str, torch.Tensor], labels: torch.Tensor | None = None, index: ResponseIndex | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, V)`` at the N positions that predict a response token, and those N targets
    (from ``index``, else from ``labels``)."""
    device = batch["input_ids"].device
    index = (response_index(labels) if index is None else index).to(device)
    logits = model(**batch, logits_to_keep=index.cols).logits  # (B, K, V)
    if logits.shape[1] != index.cols.shape[0]:  # a model that ignored logits_to_keep: (B, T, V)
        logits = logits[:, index.cols]
    return logits[index.rows, index.at], index.targets


def lm_loss(model, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the response tokens of ``batch``."""
    logits, targets = response_logits(model, batch, labels)
    return F.cross_entropy(logits.float(), targets)


def lm_loss_sum(
    model,
    batch: dict[str, torch.Tensor],
    labels: torch.Tensor,
    row_weight: torch.Tensor | None = None,
    index: ResponseIndex | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed cross-entropy over the response tokens of ``batch`` and how many tokens it sums
    (each row's tokens weighted by ``row_weight``, (B,); a weight-0 row counts for nothing).
    ``index``: :func:`response_index` of the labels, computed beforehand on the host."""
    if index is None:
        index = response_index(labels, row_weight)
    head = _chunkable_head(model)
    if head is None:
        logits, targets = response_logits(model, batch, index=index)
        return F.cross_entropy(logits.float(), targets, reduction="sum"), index.count(logits.device)
    device = batch["input_ids"].device
    index = index.to(device)
    weight, bias = dense_head(head)
    loss = _LinearCrossEntropy.apply(_response_hidden(model, batch, index), weight, bias, index.targets)
    return loss, index.count(device)


def _response_hidden(model, batch: dict[str, torch.Tensor], index: ResponseIndex) -> torch.Tensor:
    """(N, H): the backbone's last hidden states (no output layer) at the positions that predict a
    response token."""
    return backbone(model)(**batch).last_hidden_state[index.rows, index.cols[index.at]]


def _logit_chunks(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """For each chunk of ``hidden``'s rows: its slice, its rows and the output layer in the products'
    type, and its fp32 logits. The layer is cast once for all chunks (under autocast, to its type).
    A CPU takes small chunks (its caches); a GPU wants each product large, 64 × as many rows."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
    step = max(1, CHUNK_ELEMENTS * (1 if device == "cpu" else 64) // w.shape[0])
    for lo in range(0, hidden.shape[0], step):
        rows = slice(lo, lo + step)
        h = hidden[rows].to(dtype)
        yield rows, h, w, F.linear(h, w, b).float()


# Classes whose logits are exactly output_layer(backbone(...).last_hidden_state): no logit scaling
# or soft-capping after the product. Exact classes, not subclasses nor remote code that reports the
# same model_type.
_PLAIN_HEAD_CLASSES = ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def _chunkable_head(model) -> torch.nn.Module | None:
    """The output layer, where the loss can be computed from the backbone's hidden states chunk by
    chunk. Only for the model itself: a ``DistributedDataParallel`` or ``torch.compile`` wrapper has
    to run its own forward (gradient synchronisation, the compiled graph)."""
    if torch.compiler.is_compiling():
        return None
    import transformers  # here: importing its models at start-up would load torchao for every command

    cls = type(model)
    if cls.__name__ not in _PLAIN_HEAD_CLASSES or getattr(transformers, cls.__name__, None) is not cls:
        return None
    if backbone(model) is model or not callable(getattr(model, "get_output_embeddings", None)):
        return None
    head = model.get_output_embeddings()
    return head if isinstance(head, (torch.nn.Linear, Int8TiedHead)) else None


CHUNK_ELEMENTS = 2**22  # logits per chunk (16 MiB in fp32): the rows of a chunk × the vocabulary


class _LinearCrossEntropy(torch.autograd.Function):
    """``cross_entropy(hidden @ weightᵀ + bias, targets, reduction="sum")`` without the (N, V) logits:
    they are made a chunk of rows at a time, and each chunk's gradients are taken at once, so only
    (N, H) gradients for the hidden states (and the weight's, where it trains) outlive the chunk.
    For SmolLM2 (V = 49152) the logits of 2048 response tokens are 400 MB in fp32, and autograd
    kept three such tensors until the backward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_b = (
            torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device)
            if ctx.needs_input_grad[2]
            else None
        )
        for rows, h, w, logits in _logit_chunks(hidden, weight, bias):
            t = targets[rows]
            lse = torch.logsumexp(logits, 1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            probs[torch.arange(len(t), device=t.device), t] -= 1  # d loss / d logits
            grad_h[rows] = (probs.to(w.dtype) @ w).to(hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(probs.t(), h.float())
            if grad_b is not None:
                grad_b += probs.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (
            grad_h * grad.to(grad_h.dtype),
            None if grad_w is None else (grad_w * grad).to(w_dtype),
            None if grad_b is None else (grad_b * grad).to(b_dtype),
            None,
        )


@torch.no_grad()
def evaluate_lm(
    model, encoded: list[dict], *, batch_size: int, pad_id: int, device, dd=None, autocast_ctx=None
) -> dict:
    """``loss`` (mean over response tokens), ``perplexity`` = exp(loss) and ``token_accuracy``
    (greedy next-token matches) of ``model`` on encoded conversations.

    Under torchrun (``dd``) each rank scores every N-th conversation and the sums are gathered.
    """
    was_training = model.training
    model.eval()
    mine = list(range(len(encoded))) if dd is None else dd.shard(list(range(len(encoded))))
    total = correct = 0
    nll = 0.0
    for idx in bucket_batches(
        [len(encoded[mine[i]]["input_ids"]) for i in range(len(mine))], batch_size, shuffle=False
    ):
        batch = {k: v.to(device) for k, v in collate([encoded[mine[i]] for i in idx], pad_id).items()}
        labels = batch.pop("labels")
        batch.pop("token_type_ids", None)
        with autocast_ctx() if autocast_ctx else contextlib.nullcontext():
            batch_nll, batch_correct, count = _scored(model, batch, labels)
        nll += batch_nll
        correct += batch_correct
        total += count
    if dd is not None:
        parts = dd.gather((nll, correct, total))
        nll, correct, total = (sum(p[i] for p in parts) for i in range(3))
    model.train(was_training)
    loss = nll / max(total, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "token_accuracy": correct / max(total, 1),
        "tokens": total,
    }


def _scored(model, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[float, int, int]:
    """Summed cross-entropy, correct next-token predictions and response-token count of one batch;
    for the families of the chunked loss, a chunk of logits at a time (as in training)."""
    head = _chunkable_head(model)
    if head is None:
        logits, targets = response_logits(model, batch, labels)
        logits = logits.float()
        return (
            F.cross_entropy(logits, targets, reduction="sum").item(),
            (logits.argmax(-1) == targets).sum().item(),
            len(targets),
        )
    index = response_index(labels).to(batch["input_ids"].device)
    nll, correct = 0.0, 0
    for rows, _, _, logits in _logit_chunks(_response_hidden(model, batch, index), *dense_head(head)):
        t = index.targets[rows]
        nll += F.cross_entropy(logits, t, reduction="sum").item()
        correct += (logits.argmax(-1) == t).sum().item()
    return nll, correct, len(index.targets)


def normalise_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding punctuation: how exact match compares answers."""
    return " ".join(text.lower().split()).strip(" .!?,;:'\"")
