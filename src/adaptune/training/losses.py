"""The training losses, read from the device in batches: the steps leave them on the device (a read
would make the host wait for the step), and :class:`LossLog` reads those of many steps at once."""

from __future__ import annotations

import math
import time

import torch

from adaptune.errors import TrainingError

# The losses are read every REPORT_EVERY steps or REPORT_SECONDS, whichever comes first (and before
# evaluations and checkpoints); a run stops when PERSIST steps in a row (or every step so far) had
# a non-finite loss.
REPORT_EVERY = 16
REPORT_SECONDS = 10.0  # slow steps (a large model on a CPU) still show a fresh loss this often
PERSIST = 3


class LossLog:
    """Losses of the steps since the last read, and the current run of non-finite ones."""

    def __init__(self) -> None:
        # (step, loss on the device, learning rate, gradient norm on the device or None)
        self.pending: list[tuple[int, torch.Tensor, float, torch.Tensor | None]] = []
        self.bad_run: tuple[int, float, int] | None = None  # (first step, its loss, length)
        self.records: list[dict] = []  # what the last read found, step by step (for the run's log)
        self.last_read = time.perf_counter()

    def add(self, step: int, loss: torch.Tensor, lr: float = 0.0, grad_norm: torch.Tensor | None = None) -> None:
        self.pending.append((step, loss, lr, grad_norm))

    def due(self) -> bool:
        return len(self.pending) >= REPORT_EVERY or time.perf_counter() - self.last_read >= REPORT_SECONDS

    def read(self, learning_rate: float) -> tuple[float | None, list[int]]:
        """One read of the device: the last finite loss (None if none) and the skipped steps.

        Raises:
            TrainingError: the loss stayed non-finite for :data:`PERSIST` steps in a row, or for
                every step so far.
        """
        self.records, self.last_read = [], time.perf_counter()
        if not self.pending:
            return None, []
        pending, self.pending = self.pending, []
        steps = [p[0] for p in pending]
        norms = [p[3] if p[3] is not None else torch.full_like(p[1], float("nan")) for p in pending]
        values, grad_norms = torch.stack([torch.stack([p[1].float() for p in pending]), torch.stack(norms).float()])
        values, grad_norms = values.tolist(), grad_norms.tolist()  # one read of the device
        self.records = [
            {"step": n, "loss": v, "lr": p[2], "grad_norm": g}
            for n, v, p, g in zip(steps, values, pending, grad_norms)
        ]
        last, skipped = None, []
        for step, value in zip(steps, values):
            if math.isfinite(value):
                self.bad_run, last = None, value
                continue
            skipped.append(step)
            first, first_value, count = self.bad_run or (step, value, 0)
            self.bad_run = (first, first_value, count + 1)
            if count + 1 >= min(PERSIST, step):
                raise TrainingError(
                    f"loss became {first_value} at step {first} and stayed non-finite; lower the learning "
                    f"rate (now {learning_rate:g}) or check the labels"
                )
        return last, skipped
