"""One shared base model seen as the model of another kind of task.

Several tasks served on one base load it once, as a sequence classifier. A token-classification,
question-answering or multiple-choice task runs through the very same backbone module (so its
adapters, norm and pooler copies are routed by the shared model's container, and no weight is
copied) under the head of its own ``transformers`` class: :func:`task_view` builds that class
without weights (on the meta device), puts the shared backbone in place of its own, and fills its
head modules from the task's saved head tensors. A task that runs for whole batches on the shared
model itself (an AdapterFusion run) gets a view with no head of its own.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from adaptune.core.architectures import backbone, head_modules, pooler_module, spec_for
from adaptune.core.inject import get_container, using_adapters
from adaptune.core.io import mismatch
from adaptune.env import quiet_transformers
from adaptune.errors import AdapterFileError
from adaptune.models.loading import AUTO_CLASSES


class TaskView(nn.Module):
    """``view(**batch)``: the task's model: the shared model's backbone through adapter ``name``
    (for the whole batch), then ``inner``'s head."""

    def __init__(self, shared: nn.Module, name: str, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.name = inner, name
        self.__dict__["shared"] = shared  # routing only: not registered as a submodule twice
        self.training = shared.training  # evaluation restores the mode it found: the model's

    def forward(self, **batch):
        with using_adapters(self.shared, self.name):
            return self.inner(**batch)


def task_view(
    shared: nn.Module, name: str, kind: str, num_outputs: int, tensors: dict[str, torch.Tensor], where: str
) -> TaskView:
    """Adapter ``name`` of ``shared`` under a head of ``kind`` (``"token"``, ``"qa"``, ``"choice"``,
    or ``"sequence"``: the shared model's own head copy) with ``num_outputs`` outputs, its head
    filled from the adapter's saved ``tensors`` (``head.<module>.<param>``; ``where`` names their
    file in errors).

    Raises:
        AdapterFileError: the head tensors do not fit the head of that kind on this base, or the
            task needs a pooler copy the shared model was built without.
    """
    if kind == "sequence":
        return TaskView(shared, name, shared)
    import transformers

    auto = getattr(transformers, AUTO_CLASSES[kind])
    cfg = copy.deepcopy(shared.config)
    cfg.num_labels = num_outputs
    with torch.device("meta"), quiet_transformers():
        inner = auto.from_config(cfg)
    if getattr(inner, inner.base_model_prefix, None) is None:
        raise AdapterFileError(f"{where}: a {type(inner).__name__} has no backbone to share")
    setattr(inner, inner.base_model_prefix, backbone(shared))
    modules = head_modules(inner)
    want = {f"head.{m}.{k}": t for m, module in modules.items() for k, t in module.state_dict().items()}
    saved = {k: v for k, v in tensors.items() if k.startswith("head.")}
    problem = mismatch(want, saved)
    if problem:
        raise AdapterFileError(
            f"{where}: its head does not fit a {type(inner).__name__} on this base ({problem}); "
            "predict with the run alone"
        )
    container = get_container(shared)
    spec = container.spec if container is not None else spec_for(shared)
    if pooler_module(inner, spec) is None and any(k.startswith("pooler.") for k in tensors):
        raise AdapterFileError(
            f"{where}: this task trained a pooler copy, and the shared base was loaded without its pooler; "
            "predict with the run alone"
        )
    param = next(shared.parameters())
    for m, module in modules.items():
        module.to_empty(device=param.device)
        module.load_state_dict({k[len(f"head.{m}.") :]: saved[k] for k in saved if k.startswith(f"head.{m}.")})
        module.to(param.dtype)
    left = [n for n, t in [*inner.named_parameters(), *inner.named_buffers()] if t.is_meta]
    if left:
        raise AdapterFileError(f"{where}: a {type(inner).__name__} holds more than its backbone and head ({left[0]})")
    return TaskView(shared, name, inner.eval())
